"""Canonical tensor names: exactly HF's. With tied embeddings `lm_head.weight` is absent."""

from __future__ import annotations

import re

from megallama.spec import ModelSpec

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYER_TEMPLATES = (
    "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight",
)
# The families' optional tensors (docs/models.md), each with the ModelSpec feature that brings it.
OPTIONAL_TEMPLATES = (
    ("model.layers.{i}.self_attn.q_proj.bias", "qkv_bias"),
    ("model.layers.{i}.self_attn.k_proj.bias", "qkv_bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", "qkv_bias"),
    ("model.layers.{i}.self_attn.o_proj.bias", "o_bias"),
    ("model.layers.{i}.self_attn.q_norm.weight", "qk_norm_weights"),
    ("model.layers.{i}.self_attn.k_norm.weight", "qk_norm_weights"),
    ("model.layers.{i}.mlp.gate_proj.bias", "mlp_bias"),
    ("model.layers.{i}.mlp.up_proj.bias", "mlp_bias"),
    ("model.layers.{i}.mlp.down_proj.bias", "mlp_bias"),
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def has_feature(spec: ModelSpec, feature: str | None) -> bool:
    """Whether `spec` has the optional tensors of `feature` (a ModelSpec bias flag or "qk_norm_weights")."""
    if feature is None:
        return True
    if feature == "qk_norm_weights":
        return spec.qk_norm == "rms"  # Llama 4's L2 norm has no weights
    return bool(getattr(spec, feature))


def layer_names(i: int, spec: ModelSpec | None = None) -> list[str]:
    """Layer i's canonical tensors (with `spec`: plus its family's biases and q/k norms, in HF module order)."""
    names = [t.format(i=i) for t in LAYER_TEMPLATES]
    if spec is not None:
        names += [t.format(i=i) for t, feature in OPTIONAL_TEMPLATES if has_feature(spec, feature)]
    return names


def canonical_names(spec: ModelSpec) -> list[str]:
    """Every canonical tensor of `spec`, in model order."""
    names = [EMBED]
    for i in range(spec.num_layers):
        names += list(moe_layer_shapes(spec, i)) if spec.is_moe_layer(i) else layer_names(i, spec)
    names.append(FINAL_NORM)
    if not spec.tie_embeddings:
        names.append(LM_HEAD)
    return names


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical tensor, for validating readers before anything is written."""
    h, f, v = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = {
        "input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (h,), "self_attn.q_norm.weight": (spec.head_dim,),
        "self_attn.k_norm.weight": (spec.head_dim,), "mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,),
        "mlp.down_proj.bias": (h,),
    }
    shapes = {EMBED: (v, h), FINAL_NORM: (h,)}
    if not spec.tie_embeddings:
        shapes[LM_HEAD] = (v, h)
    for i in range(spec.num_layers):
        if spec.is_moe_layer(i):
            shapes.update(moe_layer_shapes(spec, i))
            continue
        for name in layer_names(i, spec):
            shapes[name] = per_layer[name.split(".", 3)[3]]
    return shapes


# Mixture-of-experts layers (Llama 4): HF Llama4's names, except that the experts, which HF fuses into 3-D
# `experts.gate_up_proj [E, h, 2F]` / `experts.down_proj [E, F, h]` (input-major), are canonical one nn.Linear per
# expert and projection (`experts.{e}.gate_proj.weight [F, h]`): the HF reader splits them, the HF writer fuses.
MOE_PREFIX = "model.layers.{i}.feed_forward."
ROUTER = MOE_PREFIX + "router.weight"
EXPERT = MOE_PREFIX + "experts.{e}.{proj}.weight"
SHARED_EXPERT = MOE_PREFIX + "shared_expert.{proj}.weight"


def moe_layer_shapes(spec: ModelSpec, i: int) -> dict[str, tuple[int, ...]]:
    """Canonical names and shapes of MoE layer `i`, in megatron-core's state-dict order."""
    h, fe, fs = spec.hidden_size, spec.moe_ffn_hidden_size, spec.shared_expert_ffn_hidden_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    p = f"model.layers.{i}."
    out = {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
           p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
           p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
           ROUTER.format(i=i): (spec.num_experts, h)}
    for e in range(spec.num_experts):
        out.update({EXPERT.format(i=i, e=e, proj="gate_proj"): (fe, h),
                    EXPERT.format(i=i, e=e, proj="up_proj"): (fe, h),
                    EXPERT.format(i=i, e=e, proj="down_proj"): (h, fe)})
    if fs:
        out.update({SHARED_EXPERT.format(i=i, proj="gate_proj"): (fs, h),
                    SHARED_EXPERT.format(i=i, proj="up_proj"): (fs, h),
                    SHARED_EXPERT.format(i=i, proj="down_proj"): (h, fs)})
    return out
