"""Llama 4 on megatron-core: the MoE config fields, a per-layer block spec, and the rotary frequencies.

megatron-core 0.16.1 has the building blocks (`MoELayer` with a shared expert, a sigmoid top-1 router,
`moe_apply_probs_on_input`, `moe_layer_freq`, `no_rope_freq`, `L2Norm`). What needs a per-layer spec:

- MoE vs dense MLP per layer (`moe_layer_freq`; the dense layers' size is `ffn_hidden_size`);
- the weightless q/k L2 norm on rope layers only (megatron-core's `qk_l2_norm` would put it on every layer):
  `L2Norm` on rope layers, `IdentityOp` on NoPE layers (no weights either way, so the keys do not change);
- our SDPA core attention with chunked local attention on rope layers and the temperature on NoPE layers
  (`attention.py`).

Rotary: Scout's llama3 scaling (factor 16, low 1, high 1, original 8192) is not what megatron-core's
`_apply_scaling` hard-codes (high 4), so the model is built without scaling and `inv_freq` is replaced by the
frequencies of the spec (`verify/reference.py: rope_frequencies`, transformers' llama3 formula).
MoE experts are megatron-core's `SequentialMLP` (grouped GEMM needs TE or CUDA).
"""

from __future__ import annotations

import dataclasses

from megallama.spec import ModelSpec

DISPATCHERS = ("alltoall", "allgather")


def moe_config(spec: ModelSpec, *, dispatcher: str = "alltoall", aux_loss_coeff: float = 0.0,
               z_loss_coeff: float | None = None) -> dict:
    """TransformerConfig fields of a Llama 4 model (empty for a dense LLaMA). Aux and z loss are off by default:
    Llama 4 trains without them in transformers."""
    if not spec.is_moe:
        return {}
    from megatron.core import parallel_state

    return dict(
        num_moe_experts=spec.num_experts, moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size,
        moe_router_topk=spec.moe_top_k, moe_router_score_function="sigmoid", moe_apply_probs_on_input=True,
        moe_router_pre_softmax=False, moe_router_enable_expert_bias=False, moe_grouped_gemm=False,
        moe_token_dispatcher_type=dispatcher,
        moe_layer_freq=[int(spec.is_moe_layer(i)) for i in range(spec.num_layers)],
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff else "none", moe_aux_loss_coeff=aux_loss_coeff,
        moe_z_loss_coeff=z_loss_coeff,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        no_rope_freq=[int(not spec.uses_rope(i)) for i in range(spec.num_layers)],
    )


def needs_layer_specs(spec: ModelSpec) -> bool:
    """True when layers differ (MoE, NoPE, chunked attention, temperature, qk norm): a per-layer block spec."""
    return bool(spec.is_moe or spec.nope_layers or spec.attention_chunk_size or spec.qk_norm == "l2"
                or spec.attn_temperature_tuning)


def block_spec(config, spec: ModelSpec, attention: str = "sdpa", norm=None, *, qk_norm_on_nope: bool = False):
    """TransformerBlockSubmodules for this pipeline stage's layers, each built for its global layer.

    `qk_norm_on_nope` puts the L2 q/k norm on NoPE layers too (megatron-core's global `qk_l2_norm`): wrong for
    Llama 4, a negative control for verify."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megallama.engine.attention import SDPAttention
    from megallama.engine.model import core_attention
    from megallama.errors import InputError

    if attention != "sdpa" and (spec.attention_chunk_size or spec.attn_temperature_tuning):
        raise InputError(f"attention {attention}: Llama 4's chunked attention and attention temperature are "
                         "implemented in the sdpa core attention only; use attention sdpa")
    core = core_attention(attention)
    offset = get_transformer_layer_offset(config)
    layers = []
    for i in range(offset, offset + get_num_layers_to_build(config)):
        rope = spec.uses_rope(i)
        layer = get_gpt_layer_local_spec(num_experts=spec.num_experts if spec.is_moe_layer(i) else None,
                                         moe_grouped_gemm=False, normalization="RMSNorm",
                                         qk_l2_norm=spec.qk_norm == "l2" and (rope or qk_norm_on_nope))
        params = {}
        if core is SDPAttention and rope and spec.attention_chunk_size:
            params["chunk_size"] = spec.attention_chunk_size
        if core is SDPAttention and not rope and spec.attn_temperature_tuning:
            params["temperature"] = (spec.floor_scale, spec.attn_scale)
        sub = layer.submodules.self_attention.submodules
        sub = dataclasses.replace(sub, core_attention=ModuleSpec(module=core, params=params) if params else core)
        if spec.qk_norm != "l2" or not (rope or qk_norm_on_nope):
            sub = dataclasses.replace(sub, q_layernorm=IdentityOp, k_layernorm=IdentityOp)
        attn = dataclasses.replace(layer.submodules.self_attention, submodules=sub)
        changes = {"self_attention": attn}
        if norm is not None:
            changes.update(input_layernorm=norm, pre_mlp_layernorm=norm)
        layers.append(dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, **changes)))
    from megatron.core.transformer import transformer_block

    # the block's final norm: the one megatron-core's own block spec uses on this machine, or the given one
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm or transformer_block.LayerNormImpl)


def set_rope_frequencies(model, spec: ModelSpec) -> None:
    """Replace megatron-core's inverse frequencies by the spec's (any llama3 factors), before the first forward."""
    from megallama.verify.reference import rope_frequencies

    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None:
        rotary.inv_freq = rope_frequencies(spec).to(device=rotary.inv_freq.device, dtype=rotary.inv_freq.dtype)
