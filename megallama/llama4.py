"""Llama 4 (text) configuration: transformers' `Llama4TextConfig` <-> ModelSpec.

Read from a `Llama4ForCausalLM` config.json (model_type "llama4_text") or from the `text_config` of a multimodal
`Llama4ForConditionalGeneration` one (model_type "llama4"; the vision tower is not part of the spec). Defaults for
absent keys are transformers 5.25's (= Scout). No torch import: plain data.
"""

from __future__ import annotations

from megallama.errors import InputError

# transformers 5.25 Llama4TextConfig defaults (Scout), used for keys a config.json leaves out
TEXT_DEFAULTS = {
    "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "num_experts_per_tok": 1, "num_local_experts": 16, "interleave_moe_layer_step": 1,
    "use_qk_norm": True, "router_aux_loss_coef": 0.001, "no_rope_layer_interval": 4, "attention_chunk_size": 8192,
    "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "rope_theta": 500000.0,
}
VISION_KEYS = ("vision_model.", "multi_modal_projector.")  # the multimodal checkpoint's non-text weights


def text_config(cfg: dict) -> dict:
    """The text part of a Llama 4 config.json; InputError for a vision-only one."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "llama4_vision_model" or any("Vision" in a for a in archs):
        raise InputError(f"config.json describes {archs or cfg.get('model_type')}: a vision-only Llama 4 "
                         "checkpoint has no language model to convert")
    if cfg.get("model_type") == "llama4" or "Llama4ForConditionalGeneration" in archs:
        text = cfg.get("text_config")
        if not isinstance(text, dict) or not text:
            raise InputError("config.json is a Llama4ForConditionalGeneration without a text_config: a vision-only "
                             "checkpoint has no language model to convert")
        return {"dtype": cfg.get("dtype") or cfg.get("torch_dtype"), **text}
    return cfg


def spec_from_llama4_config(cls, cfg: dict):
    """A ModelSpec from a Llama4ForCausalLM / Llama4ForConditionalGeneration config.json."""
    from megallama.spec import HF_NUMBERS, _normalize_rope_scaling, check_numbers, normalize_dtype

    multimodal = cfg.get("model_type") == "llama4" or "Llama4ForConditionalGeneration" in (cfg.get("architectures")
                                                                                          or [])
    t = {**TEXT_DEFAULTS, **{k: v for k, v in text_config(cfg).items() if v is not None}}
    check_numbers("config.json", t, {**HF_NUMBERS, "intermediate_size_mlp": int, "num_local_experts": int,
                                     "num_experts_per_tok": int, "interleave_moe_layer_step": int,
                                     "attention_chunk_size": int, "floor_scale": int, "attn_scale": float})
    if t.get("attention_bias"):
        raise InputError("config.json has attention_bias: biased Llama 4 variants are not supported")
    if t.get("hidden_act", "silu") != "silu":
        raise InputError(f"config.json hidden_act {t['hidden_act']!r}: Llama 4 uses silu")
    if t["num_experts_per_tok"] != 1:
        raise InputError(f"config.json num_experts_per_tok {t['num_experts_per_tok']}: Llama 4 routes top-1 "
                         "(megatron-core applies router scores to the expert input only for top-1)")
    n = t["num_hidden_layers"]
    moe_layers = t.get("moe_layers")
    if moe_layers is None:
        step = t["interleave_moe_layer_step"]
        moe_layers = list(range(step - 1, n, step))
    no_rope = t.get("no_rope_layers") or [int((i + 1) % t["no_rope_layer_interval"] != 0) for i in range(n)]
    if len(no_rope) < n:
        raise InputError(f"config.json no_rope_layers has {len(no_rope)} entries for {n} layers")
    rope = dict(t.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or t.get("rope_theta")
    scaling = _normalize_rope_scaling(t.get("rope_scaling") or (rope or None))
    return cls(
        hidden_size=t["hidden_size"], num_layers=n, num_heads=t["num_attention_heads"],
        num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        ffn_hidden_size=t["intermediate_size_mlp"], vocab_size=t["vocab_size"], norm_eps=float(t["rms_norm_eps"]),
        rope_theta=float(theta), rope_scaling=scaling, tie_embeddings=bool(t["tie_word_embeddings"]),
        dtype=normalize_dtype(t.get("dtype") or t.get("torch_dtype") or "bfloat16"),
        max_position_embeddings=int(t["max_position_embeddings"]), bos_token_id=t.get("bos_token_id"),
        eos_token_id=t.get("eos_token_id"),
        explicit_head_dim=int(t["head_dim"]), qk_norm="l2" if t["use_qk_norm"] else None,
        architecture="Llama4ForConditionalGeneration" if multimodal else "Llama4ForCausalLM",
        num_experts=int(t["num_local_experts"]), moe_layers=tuple(int(i) for i in moe_layers),
        moe_ffn_hidden_size=int(t["intermediate_size"]), shared_expert_ffn_hidden_size=int(t["intermediate_size"]),
        moe_top_k=int(t["num_experts_per_tok"]), nope_layers=tuple(i for i in range(n) if not no_rope[i]),
        attention_chunk_size=int(t["attention_chunk_size"]) if t.get("attention_chunk_size") else None,
        attn_temperature_tuning=bool(t["attn_temperature_tuning"]), floor_scale=int(t["floor_scale"]),
        attn_scale=float(t["attn_scale"]), router_aux_loss_coef=float(t["router_aux_loss_coef"]),
    )


def llama4_text_config(spec) -> dict:
    """A Llama4ForCausalLM config.json (model_type llama4_text) that transformers 5.x loads. The vision tower of a
    multimodal source is not carried, so the written model is always the text-only Llama4ForCausalLM."""
    rope_parameters = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope_parameters = {**spec.rope_scaling, "rope_theta": spec.rope_theta}
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "intermediate_size": spec.moe_ffn_hidden_size, "intermediate_size_mlp": spec.ffn_hidden_size,
        "vocab_size": spec.vocab_size, "rms_norm_eps": spec.norm_eps, "rope_parameters": rope_parameters,
        "tie_word_embeddings": spec.tie_embeddings, "max_position_embeddings": spec.max_position_embeddings,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "num_local_experts": spec.num_experts, "num_experts_per_tok": spec.moe_top_k,
        "moe_layers": list(spec.moe_layers), "interleave_moe_layer_step": _step(spec),
        "use_qk_norm": spec.qk_norm == "l2",
        "no_rope_layers": [int(spec.uses_rope(i)) for i in range(spec.num_layers)],
        "attention_chunk_size": spec.attention_chunk_size, "attn_temperature_tuning": spec.attn_temperature_tuning,
        "floor_scale": spec.floor_scale, "attn_scale": spec.attn_scale,
        "router_aux_loss_coef": spec.router_aux_loss_coef, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id, "dtype": spec.dtype,
    }


def _step(spec) -> int:
    """interleave_moe_layer_step matching moe_layers when they are regular (else 1; moe_layers wins in HF)."""
    layers = list(spec.moe_layers)
    for step in range(1, spec.num_layers + 1):
        if layers == list(range(step - 1, spec.num_layers, step)):
            return step
    return 1


def moe_pattern(spec) -> str:
    """One character per layer: E = experts (MoE), D = dense MLP; for `inspect`."""
    return "".join("E" if spec.is_moe_layer(i) else "D" for i in range(spec.num_layers))


def rope_pattern(spec) -> str:
    """One character per layer: R = rotary (chunked, qk-normed), N = NoPE (global, temperature-tuned)."""
    return "".join("R" if spec.uses_rope(i) else "N" for i in range(spec.num_layers))


def hf_reference_class(path) -> tuple[type, object] | None:
    """(transformers class, text-model getter or None) for a Llama 4 HF folder; None for other models."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(path) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "llama4" or "Llama4ForConditionalGeneration" in archs:
        from transformers import Llama4ForConditionalGeneration

        return Llama4ForConditionalGeneration, lambda model: model.language_model
    if cfg.get("model_type") == "llama4_text" or "Llama4ForCausalLM" in archs:
        from transformers import Llama4ForCausalLM

        return Llama4ForCausalLM, None
    return None
