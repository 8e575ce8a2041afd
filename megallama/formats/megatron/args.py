"""The `args` Namespace a Megatron checkpoint carries, its launch flags, and a ModelSpec read back from it
(or from the config file beside a fork's checkpoint whose args lack it).

Megatron-LM (core_v0.16.1) reads these fields from a checkpoint's `args`; every one is saved, so that
`--use-checkpoint-args`, `check_checkpoint_args` and `tools/checkpoint` (which re-applies every saved field to its
own args, then reads `sequence_parallel` and `apply_query_key_layer_scaling` directly) all work (formats.md 4.3).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from megallama.errors import InputError
from megallama.formats.base import TORCH_DTYPES
from megallama.spec import LLAMA3_ROPE_DEFAULTS, ModelSpec

# megatron/training/checkpointing.py: load_args_from_checkpoint (`--use-checkpoint-args`)
READ_BY_LOAD_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type",
    "add_position_embedding", "use_rotary_position_embeddings", "rotary_base", "rotary_percent",
    "rotary_interleaved", "add_bias_linear", "add_qkv_bias", "squared_relu", "swiglu",
    "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization", "apply_query_key_layer_scaling",
    "attention_dropout", "hidden_dropout", "hybrid_override_pattern", "spec", "hybrid_attention_ratio",
    "hybrid_mlp_ratio", "num_experts", "heterogeneous_layers_config_path",
    "heterogeneous_layers_config_encoded_json", "tokenizer_model", "tokenizer_type", "tiktoken_pattern",
    "padded_vocab_size", "ckpt_format", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
)
# checkpointing.py: check_checkpoint_args (every non-finetune load) and load_checkpoint
READ_BY_CHECK = (
    "num_layers", "hidden_size", "num_attention_heads", "add_position_embedding", "max_position_embeddings",
    "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type", "data_parallel_random_init",
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
)
READ_BY_LOAD_CHECKPOINT = (
    "consumed_train_samples", "skipped_train_samples", "consumed_valid_samples", "world_size", "data_parallel_size",
    "no_save_rng", "no_save_optim", "ckpt_fully_parallel_save",
)
# tools/checkpoint/{loader_base,loader_legacy,saver_base,saver_legacy}.py (check_for_arg and direct reads)
READ_BY_TOOLS = (
    "fp16", "bf16", "params_dtype", "normalization", "sequence_parallel", "apply_query_key_layer_scaling",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "hidden_size", "seq_length",
    "num_attention_heads", "max_position_embeddings", "position_embedding_type", "tokenizer_type", "swiglu",
)
# Read there too, but only for MoE / Mamba / hybrid models or training features a converted dense LLaMA does not
# have; absent means "off" to Megatron, while a saved value would override the run's own default.
NOT_SAVED = (
    "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk", "moe_token_dispatcher_type", "moe_router_pre_softmax",
    "moe_grouped_gemm", "moe_shared_expert_intermediate_size", "moe_router_score_function",
    "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor", "moe_latent_size", "mamba_state_dim",
    "mamba_head_dim", "mamba_num_groups", "mamba_num_heads", "is_hybrid_model", "expert_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "global_batch_size",
)
MEGATRON_READS = tuple(dict.fromkeys(READ_BY_LOAD_ARGS + READ_BY_CHECK + READ_BY_LOAD_CHECKPOINT + READ_BY_TOOLS))
TRANSFORMER_IMPLS = ("local", "transformer_engine")


def megatron_args(spec: ModelSpec, *, tp: int, pp: int, padded_vocab_size: int, divisible_by: int,
                  iteration: int = 0, tokenizer_type: str | None = None, tokenizer_model: str | None = None,
                  seq_length: int | None = None, transformer_impl: str = "local",
                  **overrides) -> argparse.Namespace:
    """The `args` Megatron checks and `--use-checkpoint-args` restores (formats.md 4.3), plain types only so
    that `torch.load(weights_only=True)` reads them. Values equal Megatron-LM's defaults where a converted
    checkpoint has no say (dropout, sequence parallel, MoE off)."""
    seq = seq_length or min(spec.max_position_embeddings, 4096)
    args = argparse.Namespace(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads, num_query_groups=spec.num_kv_heads,
        group_query_attention=spec.num_kv_heads < spec.num_heads, kv_channels=spec.head_dim,
        seq_length=seq, max_position_embeddings=spec.max_position_embeddings,
        position_embedding_type="rope", add_position_embedding=True, use_rotary_position_embeddings=True,
        rotary_base=int(spec.rope_theta), rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=spec.rope_scaling is not None,
        rope_scaling_factor=float(spec.rope_scaling["factor"]) if spec.rope_scaling else 8.0,
        normalization="RMSNorm", layernorm_epsilon=spec.norm_eps, norm_epsilon=spec.norm_eps, swiglu=True,
        squared_relu=False, add_bias_linear=spec.o_bias, add_qkv_bias=spec.qkv_bias and not spec.o_bias,
        qk_layernorm=spec.qk_norm == "rms", window_size=window_size(spec), window_attn_skip_freq=window_layers(spec),
        untie_embeddings_and_output_weights=not spec.tie_embeddings,
        apply_layernorm_1p=False, apply_query_key_layer_scaling=False, attention_dropout=0.0, hidden_dropout=0.0,
        num_experts=None, spec=None, hybrid_override_pattern=None, hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0,
        heterogeneous_layers_config_path=None, heterogeneous_layers_config_encoded_json=None,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        sequence_parallel=False, world_size=tp * pp, data_parallel_size=1, data_parallel_random_init=False,
        make_vocab_size_divisible_by=divisible_by, padded_vocab_size=padded_vocab_size, vocab_size=spec.vocab_size,
        tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
        tiktoken_pattern="v2" if tokenizer_type == "TikTokenizer" else None, params_dtype=TORCH_DTYPES[spec.dtype],
        fp16=spec.dtype == "float16", bf16=spec.dtype == "bfloat16", ckpt_format="torch",
        transformer_impl=transformer_impl, ckpt_fully_parallel_save=False, no_save_optim=None, no_save_rng=None,
        consumed_train_samples=0, skipped_train_samples=0, consumed_valid_samples=0, iteration=iteration,
    )
    vars(args).update(overrides)
    return args


def window_size(spec: ModelSpec) -> tuple[int, int] | None:
    """megatron-core's (left, right) window of HF's sliding_window W: query i sees keys i - (W - 1) ... i."""
    return None if spec.sliding_window is None else (spec.sliding_window - 1, 0)


def window_layers(spec: ModelSpec) -> list[int] | None:
    """`--window-attn-skip-freq` as a per-layer pattern (1 = windowed), None when every layer is windowed."""
    if spec.sliding_window is None or spec.sliding_window_layers is None:
        return None
    return [int(spec.windowed(i)) for i in range(spec.num_layers)]


def family_flags(a: argparse.Namespace) -> list[str]:
    """The launch flags of the families' extras (docs/models.md): head_dim, biases, q/k norm, sliding window."""
    flags = [] if a.kv_channels == a.hidden_size // a.num_attention_heads else [f"--kv-channels {a.kv_channels}"]
    if not getattr(a, "add_bias_linear", False):  # biased linears (q/k/v included) are Megatron-LM's default
        flags.append("--disable-bias-linear")
        if getattr(a, "add_qkv_bias", False):
            flags.append("--add-qkv-bias")
    if getattr(a, "qk_layernorm", False):
        flags.append("--qk-layernorm")
    if getattr(a, "window_size", None):
        left, right = a.window_size
        flags.append(f"--window-size {left},{right}")
        if getattr(a, "window_attn_skip_freq", None) is not None:
            flags.append(f"--window-attn-skip-freq {shlex.quote(str(list(a.window_attn_skip_freq)))}")
    return flags


def launch_flags(args: argparse.Namespace, *, load_dir: Path | None = None) -> list[str]:
    """Megatron-LM flags matching a checkpoint's args (formats.md 4.4); one flag (with its value) per item."""
    a = args
    flags = [f"--ckpt-format {getattr(a, 'ckpt_format', 'torch')}",
             f"--transformer-impl {getattr(a, 'transformer_impl', 'local')}"]
    if load_dir is not None:
        flags += [f"--load {shlex.quote(str(load_dir))}", "--finetune", "--exit-on-missing-checkpoint"]
    flags += [f"--num-layers {a.num_layers}", f"--hidden-size {a.hidden_size}",
              f"--ffn-hidden-size {a.ffn_hidden_size}", f"--num-attention-heads {a.num_attention_heads}"]
    if a.group_query_attention:
        flags += ["--group-query-attention", f"--num-query-groups {a.num_query_groups}"]
    flags += [f"--seq-length {a.seq_length}", f"--max-position-embeddings {a.max_position_embeddings}",
              "--normalization RMSNorm", f"--norm-epsilon {a.norm_epsilon}", "--swiglu", *family_flags(a),
              "--position-embedding-type rope", f"--rotary-base {a.rotary_base}", "--rotary-percent 1.0"]
    if a.rotary_interleaved:
        flags.append("--rotary-interleaved")
    if a.use_rope_scaling:
        flags += ["--use-rope-scaling", f"--rope-scaling-factor {a.rope_scaling_factor:g}"]
    if a.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    flags += [f"--make-vocab-size-divisible-by {a.make_vocab_size_divisible_by}",
              f"--tensor-model-parallel-size {a.tensor_model_parallel_size}",
              f"--pipeline-model-parallel-size {a.pipeline_model_parallel_size}"]
    if a.tokenizer_type:
        flags.append(f"--tokenizer-type {a.tokenizer_type}")
        if a.tokenizer_type == "TikTokenizer":
            flags.append("--tiktoken-pattern v2")
    if a.tokenizer_model:
        flags.append(f"--tokenizer-model {shlex.quote(str(a.tokenizer_model))}")
    if a.tokenizer_type == "NullTokenizer":  # ids only: Megatron-LM takes the vocab from --vocab-size
        flags.append(f"--vocab-size {a.vocab_size}")
    from megallama.formats.megatron.moe import moe_flags

    flags += moe_flags(a)  # Llama 4: experts, router, MoE / NoPE layer patterns (none for a dense model)
    flags += ["--attention-dropout 0.0", "--hidden-dropout 0.0"]
    if a.bf16:
        flags.append("--bf16")
    elif a.fp16:
        flags.append("--fp16")
    return flags


# the fields a ModelSpec needs from args; without them (the forks' small or missing args) a config file must say
ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")


def args_describe_model(args) -> bool:
    """True when `args` alone gives the architecture, norm epsilon included (NVIDIA's and megallama's do)."""
    a = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    return all(a.get(k) for k in ARCHITECTURE_FIELDS) and ("norm_epsilon" in a or "layernorm_epsilon" in a)


def spec_from_args(args, *, padded_vocab_size: int, dtype: str, notes: list[str],
                   fallback_vocab: int | None = None) -> ModelSpec:
    """A ModelSpec from the `args` Namespace Megatron saves, for checkpoints without megallama.json.

    `fallback_vocab` (from the tokenizer beside the checkpoint) is the true vocab when args do not record it.
    """
    if args is None:
        raise InputError("checkpoint has neither megallama.json nor an args namespace: cannot tell its architecture")
    a = vars(args)
    wrong = {k: a.get(k) for k, want in (("normalization", "RMSNorm"), ("swiglu", True),
                                         ("position_embedding_type", "rope")) if a.get(k, want) != want}
    if wrong:
        raise InputError(f"checkpoint args {wrong} do not describe a LLaMA-shaped model (RMSNorm, SwiGLU, rope)")
    vocab = a.get("vocab_size") or a.get("orig_vocab_size") or fallback_vocab
    if not vocab:
        vocab = padded_vocab_size
        notes.append(f"true vocab unknown (no megallama.json, no args.vocab_size): keeping all {vocab} rows")
    heads = a["num_attention_heads"]
    scaling = None
    if a.get("use_rope_scaling"):
        scaling = {"rope_type": "llama3", **LLAMA3_ROPE_DEFAULTS, "factor": float(a.get("rope_scaling_factor", 8.0))}
    return ModelSpec(
        hidden_size=a["hidden_size"], num_layers=a["num_layers"], num_heads=heads,
        num_kv_heads=(a.get("num_query_groups") or heads) if a.get("group_query_attention") else heads,
        ffn_hidden_size=a["ffn_hidden_size"], vocab_size=vocab,
        norm_eps=float(a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))),
        rope_theta=float(a.get("rotary_base", 10000)), rope_scaling=scaling,
        tie_embeddings=not a.get("untie_embeddings_and_output_weights", False), dtype=dtype,
        max_position_embeddings=int(a.get("max_position_embeddings") or a.get("seq_length") or 4096),
        **family_from_args(a, heads),
    )


def family_from_args(a: dict, heads: int) -> dict:
    """The ModelSpec extras (docs/models.md) a Megatron-LM args namespace records; the HF architecture is a guess
    from them (megallama.json records the real one)."""
    bias_all, qk_norm = bool(a.get("add_bias_linear")), bool(a.get("qk_layernorm"))
    out = {"qkv_bias": bias_all or bool(a.get("add_qkv_bias")), "o_bias": bias_all, "mlp_bias": bias_all,
           "qk_norm": "rms" if qk_norm else None}
    kv = a.get("kv_channels")
    if kv and kv * heads != a["hidden_size"]:
        out["explicit_head_dim"] = int(kv)
    window = a.get("window_size")
    if window:
        out["sliding_window"] = int(window[0]) + 1
        pattern = a.get("window_attn_skip_freq")
        if pattern is not None:
            n = a["num_layers"]
            on = [bool(pattern[i]) for i in range(n)] if isinstance(pattern, list | tuple) else \
                [(i + 1) % int(pattern) != 0 for i in range(n)]
            out["sliding_window_layers"] = tuple(i for i in range(n) if on[i])
    out["architecture"] = ("Qwen3ForCausalLM" if qk_norm else "Qwen2ForCausalLM" if out["qkv_bias"] and not bias_all
                           else "MistralForCausalLM" if window else "LlamaForCausalLM")
    return out


def spec_from_config_file(root: Path, dtype: str, config: Path | None = None) -> ModelSpec | None:
    """The architecture from a config.json (HF) or params.json (Meta) placed beside a checkpoint whose args
    do not give it (the forks), or from `config` (--model-config: such a file, or a folder holding one);
    None when there is neither."""
    from megallama.formats.hf import read_json

    hf, meta = root / "config.json", root / "params.json"
    if config is not None:
        config = Path(config)
        if config.is_dir():
            hf, meta = config / "config.json", config / "params.json"
            if not hf.is_file() and not meta.is_file():
                raise InputError(f"--model-config {config} holds neither config.json (HF) nor params.json (Meta)")
        elif config.is_file():
            is_meta = "dim" in read_json(config, "expected an HF config.json or a Meta params.json")
            hf, meta = (root / "-", config) if is_meta else (config, root / "-")
        else:
            raise InputError(f"--model-config {config} does not exist")
    if hf.is_file():
        return ModelSpec.from_hf_config(read_json(hf, "expected an HF config")).replace(dtype=dtype)
    if meta.is_file():
        params = read_json(meta, "expected Meta params")
        vocab = params.get("vocab_size") if params.get("vocab_size", -1) > 0 else tokenizer_vocab(root)
        if not vocab:
            raise InputError(f"{meta} has no vocab_size and there is no tokenizer.model to count")
        return ModelSpec.from_meta_params(params, vocab_size=vocab, dtype=dtype)
    return None


def tokenizer_vocab(root: Path) -> int | None:
    """The true vocab of a SentencePiece tokenizer.model beside the checkpoint (addendum: the fork's args: None)."""
    path = root / "tokenizer.model"
    if not path.is_file():
        return None
    from megallama.formats.hf import load_sentencepiece

    sp = load_sentencepiece(path)
    return sp.vocab_size() if sp is not None else None
