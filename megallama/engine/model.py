"""The one place a ModelSpec becomes a megatron-core GPTModel (local spec), shared by verify, sft and doctor.

Core attention is chosen by name (`ATTENTIONS`): `sdpa` (default; megallama.engine.attention.SDPAttention), `local`
(megatron-core's DotProductAttention) or `te` (Transformer Engine's fused/flash TEDotProductAttention). Only the
core attention changes: the linears and norms stay the local spec's, so every choice loads the same checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megallama.errors import InputError
from megallama.formats.base import TORCH_DTYPES
from megallama.spec import ModelSpec


def transformer_config(spec: ModelSpec, *, dtype: str = "float32", sequence_parallel: bool = False,
                       recompute: str | None = None, **overrides):
    """megatron-core TransformerConfig for a LLaMA model at the current TP x PP."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    params_dtype = TORCH_DTYPES[dtype]
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,  # SwiGLU: silu(first half of fc1) * second half
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        # Fused kernels need CUDA (and apex/TE); the unfused paths compute the same maths.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu_initialization=not torch.cuda.is_available(),
        rotary_interleaved=False,  # checkpoints hold q/k in HF half-split order (formats.md 2.2)
        **family_config(spec),
    )
    from megallama.engine.llama4 import moe_config

    kwargs.update(moe_config(spec, **overrides.pop("moe", {})))  # Llama 4: experts, router, NoPE pattern
    if recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    elif recompute not in (None, "none"):
        raise InputError(f"unknown activation recompute {recompute!r}: expected none, selective or full")
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def family_config(spec: ModelSpec) -> dict:
    """TransformerConfig fields of the families' extras (docs/models.md): biases, q/k norm, sliding window."""
    check_family_supported(spec)
    config = dict(add_bias_linear=spec.o_bias, add_qkv_bias=spec.qkv_bias and not spec.o_bias,
                  qk_layernorm=spec.qk_norm == "rms")
    if spec.sliding_window is not None:
        # HF: query i sees keys j with i - j < W; megatron-core's (left, right) window: i - left <= j <= i + right
        config["window_size"] = (spec.sliding_window - 1, 0)
        if spec.sliding_window_layers is not None:  # 1 = windowed, by layer (megatron-core's custom pattern)
            config["window_attn_skip_freq"] = [int(spec.windowed(i)) for i in range(spec.num_layers)]
    return config


def check_family_supported(spec: ModelSpec) -> None:
    """Refuse by name what the engine cannot build for this spec (the rest is refused by ModelSpec itself)."""
    if spec.qk_norm == "l2" and not spec.architecture.startswith("Llama4"):  # built by engine/llama4.py only
        raise InputError(f"qk_norm {spec.qk_norm!r} is built for Llama 4 only (per rope layer, engine/llama4.py)")


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm that megatron-core's sequence parallelism accepts (the local spec's norm refuses it).

    Built by megatron-core like every spec norm: `(config, hidden_size, eps=...)`, other keywords ignored. The
    maths is torch.nn.RMSNorm's, per token, so it runs unchanged on the [s/TP, b, h] slice each TP rank holds;
    under sequence parallelism each rank's weight gradient covers only its slice of the sequence, and the
    `sequence_parallel` attribute makes megatron-core's finalize_model_grads sum those gradients across TP.
    State dict: the same single `weight` as torch.nn.RMSNorm, so checkpoints load either way.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)  # as WrappedTorchNorm builds it (fp32; Float16Module casts)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True  # what finalize_model_grads looks for


ATTENTIONS = ("sdpa", "local", "te")


def check_attention(name: str) -> None:
    """InputError unless core attention `name` can run on this machine (`te`: CUDA and Transformer Engine)."""
    import importlib.util

    if name not in ATTENTIONS:
        raise InputError(f"unknown attention {name!r}: expected one of {', '.join(ATTENTIONS)}")
    if name == "te" and (not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None):
        raise InputError("attention te needs a CUDA GPU with Transformer Engine installed "
                         "(pip install transformer-engine[pytorch]); use attention sdpa or local here")


def core_attention(name: str) -> type:
    """The core-attention module class for `train.attention`; InputError when it cannot run here."""
    check_attention(name)
    if name == "sdpa":
        from megallama.engine.attention import SDPAttention

        return SDPAttention
    if name == "local":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return DotProductAttention
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return TEDotProductAttention


def gpt_layer_spec(config, attention: str = "sdpa"):
    """The local GPT layer spec with the chosen core attention; with sequence parallelism a block spec whose three
    norms (input, pre-MLP and the block's final one) are SequenceParallelRMSNorm."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    attn = layer.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules,
                                                                    core_attention=core_attention(attention)))
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, self_attention=attn))
    if not config.sequence_parallel:
        return layer
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(
        layer.submodules, input_layernorm=SequenceParallelRMSNorm, pre_mlp_layernorm=SequenceParallelRMSNorm))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)


class MaskPaddedVocab(torch.autograd.Function):
    """logits[..., start:] = -inf, in place (no copy of the logits). The backward passes the gradient through
    unchanged rather than zeroing those columns (another full copy): only the cross entropy reads the masked
    logits, and its gradient there is exactly 0 already (softmax exp(-inf) = 0, and a padded id is never a label)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, start: int) -> torch.Tensor:
        logits[..., start:] = float("-inf")
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def llama_gpt_model_class():
    """megatron-core's GPTModel whose language-model loss leaves out the padded vocabulary (built lazily: importing
    megatron-core is slow and not every command needs it)."""
    from megatron.core.models.gpt import GPTModel

    class LlamaGPTModel(GPTModel):
        """GPTModel + `true_vocab_size`. Called with labels, it returns the per-token loss [b, s] over the true
        vocabulary only: the output layer's padded rows (vocab padded to a multiple of 128 x TP) are set to -inf
        before the softmax, otherwise their logits would enter the normaliser and the loss would depend on TP.
        The loss is computed on the [s, b, V/TP] logits as megatron-core lays them out, which saves the copies
        that returning [b, s, V/TP] logits costs (a transpose forward, two backward)."""

        true_vocab_size: int

        def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            from megatron.core import parallel_state as ps

            logits = logits.float()  # the softmax in fp32 (a copy only in bf16/fp16 runs)
            part = logits.shape[-1]  # [s, b, Vp / tp]
            first = ps.get_tensor_model_parallel_rank() * part
            if first + part > self.true_vocab_size:
                logits = MaskPaddedVocab.apply(logits, max(self.true_vocab_size - first, 0))
            return super().compute_language_model_loss(labels, logits)

    return LlamaGPTModel


def check_rope_supported(spec: ModelSpec) -> None:
    """megatron-core makes only the llama3 `factor` configurable; the other three are hard-coded."""
    from megallama.spec import check_rope_for_megatron

    check_rope_for_megatron(spec)


def build_gpt_model(spec: ModelSpec, *, padded_vocab_size: int, dtype: str = "float32", pre_process: bool | None = None,
                    post_process: bool | None = None, max_seq_length: int | None = None, attention: str = "sdpa",
                    **config_overrides):
    """A megatron-core GPTModel (local spec, `attention` core attention) for this process's pipeline stage, on this
    process's device.

    Requires `megallama.engine.runtime.init_distributed()` first. Pre/post-process default to this rank's stage.
    """
    from megatron.core import parallel_state

    from megallama.engine import llama4
    from megallama.engine.runtime import device

    if not spec.architecture.startswith("Llama4"):  # Llama 4: the spec's frequencies are set below
        check_rope_supported(spec)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    faults = config_overrides.pop("llama4_faults", {})  # negative controls only (tests): see llama4.block_spec
    config = transformer_config(spec, dtype=dtype, **config_overrides)
    if llama4.needs_layer_specs(spec):  # layers differ (MoE / dense, rope / NoPE): one spec per layer
        norm = SequenceParallelRMSNorm if config.sequence_parallel else None
        layer_spec = llama4.block_spec(config, spec, attention, norm=norm, **faults)
    else:
        layer_spec = gpt_layer_spec(config, attention)
    model = llama_gpt_model_class()(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size,
        max_sequence_length=max_seq_length or spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(spec.rope_theta),
        rope_scaling=spec.rope_scaling is not None,
        rope_scaling_factor=float(spec.rope_scaling["factor"]) if spec.rope_scaling else 8.0,
    )
    if spec.architecture.startswith("Llama4"):
        llama4.set_rope_frequencies(model, spec)
    model.true_vocab_size = spec.vocab_size
    return model.to(device())
