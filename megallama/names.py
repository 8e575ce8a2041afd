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
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def layer_names(i: int) -> list[str]:
    return [t.format(i=i) for t in LAYER_TEMPLATES]


def canonical_names(spec: ModelSpec) -> list[str]:
    """Every canonical tensor of `spec`, in model order."""
    names = [EMBED]
    for i in range(spec.num_layers):
        names += layer_names(i)
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
    kv = spec.num_kv_heads * spec.head_dim
    per_layer = {
        "input_layernorm.weight": (h,), "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
        "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {EMBED: (v, h), FINAL_NORM: (h,)}
    if not spec.tie_embeddings:
        shapes[LM_HEAD] = (v, h)
    for i in range(spec.num_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    return shapes
