"""The LLaMA-shaped families as data: how each spells its extras in config.json, and what Megatron can load.

    family   architecture         extras over LLaMA (ModelSpec fields)
    llama    LlamaForCausalLM     head_dim (explicit_head_dim), attention_bias (qkv_bias + o_bias), mlp_bias
    mistral  MistralForCausalLM   head_dim, sliding_window (all layers; null = none)
    qwen2    Qwen2ForCausalLM     q/k/v biases always; use_sliding_window + max_window_layers / layer_types
    qwen3    Qwen3ForCausalLM     q_norm/k_norm (qk_norm "rms"), head_dim (default 128), attention_bias, window

No torch here: plain functions on dicts, used by `ModelSpec.from_hf_config` / `to_hf_config`.
"""

from __future__ import annotations

from typing import Any

from megallama.errors import InputError

FAMILIES = {  # HF architectures[0] -> model_type
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Llama4ForCausalLM": "llama4_text",  # Llama 4 text (issue 18): read and written by megallama/llama4.py
    "Llama4ForConditionalGeneration": "llama4",  # its multimodal checkpoint: the text part is converted
}
# transformers' config defaults where a family's differ from "absent means off" (configuration_*.py)
MISTRAL_WINDOW_DEFAULT = 4096  # MistralConfig.sliding_window
QWEN_WINDOW_DEFAULT = 4096  # Qwen2Config / Qwen3Config.sliding_window (used only with use_sliding_window)
QWEN_MAX_WINDOW_LAYERS_DEFAULT = 28
QWEN3_HEAD_DIM_DEFAULT = 128
# keys the base (LLaMA) config.json carries that a family's config class does not have
NOT_IN = {"mistral": ("attention_bias", "mlp_bias", "pretraining_tp"), "qwen2": ("attention_bias", "mlp_bias",
          "pretraining_tp"), "qwen3": ("mlp_bias", "pretraining_tp")}


def architecture_of(cfg: dict) -> str:
    """The supported architecture a config.json describes; InputError naming what it is otherwise."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    by_type = {t: a for a, t in FAMILIES.items()}
    arch = archs[0] if archs else by_type.get(model_type or "llama")
    if arch not in FAMILIES or (model_type is not None and model_type != FAMILIES[arch]):
        raise InputError(f"config.json describes {archs or None} / model_type {model_type!r}; supported: "
                         f"{', '.join(FAMILIES)} (docs/models.md)")
    return arch


def family_fields(cfg: dict, arch: str, *, num_layers: int) -> dict[str, Any]:
    """The ModelSpec fields a family's config.json sets beyond LLaMA's."""
    family = FAMILIES[arch]
    out: dict[str, Any] = {"architecture": arch}
    head_dim = cfg.get("head_dim")
    if family == "qwen3" and head_dim is None:
        head_dim = QWEN3_HEAD_DIM_DEFAULT
    if head_dim is not None and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        out["explicit_head_dim"] = int(head_dim)
    if family in ("llama", "qwen3"):
        out["qkv_bias"] = out["o_bias"] = bool(cfg.get("attention_bias", False))
    if family == "llama":
        out["mlp_bias"] = bool(cfg.get("mlp_bias", False))
    if family == "qwen2":
        out["qkv_bias"] = True  # Qwen2Attention: q/k/v with bias=True, o_proj without
    if family == "qwen3":
        out["qk_norm"] = "rms"
    if family == "mistral":
        out["sliding_window"] = cfg.get("sliding_window", MISTRAL_WINDOW_DEFAULT)
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        out.update(qwen_window(cfg, num_layers=num_layers))
    if out.get("sliding_window") is not None:
        out["sliding_window"] = int(out["sliding_window"])
    return out


def qwen_window(cfg: dict, *, num_layers: int) -> dict[str, Any]:
    """Qwen2/3: layer i slides when `layer_types[i]` says so, else when i >= max_window_layers (transformers)."""
    window = cfg.get("sliding_window", QWEN_WINDOW_DEFAULT)
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
            raise InputError(f"config.json layer_types {types!r}: expected {num_layers} entries of "
                             "'sliding_attention' / 'full_attention'")
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        first = cfg.get("max_window_layers", QWEN_MAX_WINDOW_LAYERS_DEFAULT)
        layers = tuple(range(first, num_layers))
    if window is None or not layers:
        return {}
    return {"sliding_window": window, "sliding_window_layers": None if len(layers) == num_layers else layers}


def family_config(spec) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(keys to set, keys to drop) that turn the LLaMA config.json of `spec` into its family's."""
    family = spec.family
    keys: dict[str, Any] = {"architectures": [spec.architecture], "model_type": family, "head_dim": spec.head_dim}
    if family in ("llama", "qwen3"):
        keys["attention_bias"] = spec.qkv_bias
    if family == "llama":
        keys["mlp_bias"] = spec.mlp_bias
    if family == "mistral":
        keys["sliding_window"] = spec.sliding_window
    if family in ("qwen2", "qwen3"):
        layers = [i for i in range(spec.num_layers) if spec.windowed(i)]
        suffix = bool(layers) and layers == list(range(layers[0], spec.num_layers))
        keys.update(use_sliding_window=spec.sliding_window is not None,
                    sliding_window=spec.sliding_window,
                    max_window_layers=layers[0] if suffix else spec.num_layers,
                    layer_types=["sliding_attention" if spec.windowed(i) else "full_attention"
                                 for i in range(spec.num_layers)])
    return keys, NOT_IN.get(family, ())


def family_problems(spec) -> list[str]:
    """What a spec asks for that megatron-core cannot build (or that no supported family has), by name."""
    problems = []
    if spec.architecture not in FAMILIES:
        problems.append(f"architecture {spec.architecture!r} is not supported (supported: {', '.join(FAMILIES)})")
    # megatron-core has two bias switches: add_qkv_bias (linear_qkv only) and add_bias_linear (every linear).
    if spec.o_bias != spec.mlp_bias or (spec.mlp_bias and not spec.qkv_bias):
        problems.append(f"biases q/k/v={spec.qkv_bias}, o_proj={spec.o_bias}, mlp={spec.mlp_bias}: megatron-core "
                        "biases o_proj and the MLP only together (add_bias_linear), so attention_bias needs "
                        "mlp_bias and vice versa")
    if spec.qk_norm not in (None, "rms", "l2"):
        problems.append(f"qk_norm {spec.qk_norm!r}: expected 'rms' or 'l2'")
    if spec.sliding_window is not None and spec.sliding_window < 1:
        problems.append(f"sliding_window {spec.sliding_window} must be >= 1")
    if spec.sliding_window_layers is not None and any(not 0 <= i < spec.num_layers
                                                      for i in spec.sliding_window_layers):
        problems.append(f"sliding_window_layers {spec.sliding_window_layers} outside 0..{spec.num_layers - 1}")
    return problems
