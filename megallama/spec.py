"""ModelSpec: the one description of a LLaMA model that every format reads into and writes out of.

Read from HF `config.json` (transformers 4.x and 5.x spellings) or Meta `params.json`, never from a size table.
No torch import here: the spec is plain data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from megallama.errors import InputError
from megallama.families import FAMILIES, architecture_of, family_config, family_fields, family_problems

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}
# Meta's Llama 3.1 reference hard-codes these for `use_scaled_rope`; megatron-core hard-codes all but `factor`.
LLAMA3_ROPE_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
# (hidden_size, ffn_hidden_size) -> (multiple_of, ffn_dim_multiplier) of the official releases (formats.md 1.2).
OFFICIAL_FFN = {
    (4096, 11008): (256, None), (5120, 13824): (256, None), (6656, 17920): (256, None),
    (8192, 22016): (256, None), (8192, 28672): (4096, 1.3), (4096, 14336): (1024, 1.3),
    (16384, 53248): (4096, 1.2), (2048, 8192): (256, 1.5), (3072, 8192): (256, 1.0),
}


def normalize_dtype(name: str | None) -> str | None:
    """'bf16' / 'torch.bfloat16' / 'bfloat16' -> 'bfloat16'; None stays None."""
    if name is None:
        return None
    key = str(name).replace("torch.", "").lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise InputError(f"unsupported dtype {name!r}: expected one of fp32, bf16, fp16")
    return key


def meta_ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward size formula (formats.md 2.4)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(dim: int, ffn_hidden_size: int) -> tuple[int, float | None]:
    """Choose (multiple_of, ffn_dim_multiplier) so that Meta's formula gives exactly `ffn_hidden_size`."""
    candidates: list[tuple[int, float | None]] = []
    if (dim, ffn_hidden_size) in OFFICIAL_FFN:
        candidates.append(OFFICIAL_FFN[(dim, ffn_hidden_size)])
    candidates += [(m, None) for m in (256, 1024, 4096, 128, 64, 32, 16, 8, 4, 2, 1)]
    base = int(2 * (4 * dim) / 3)
    candidates.append((ffn_hidden_size, ffn_hidden_size / base))
    for multiple_of, mult in candidates:
        if meta_ffn_size(dim, multiple_of, mult) == ffn_hidden_size:
            return multiple_of, mult
    raise InputError(f"cannot express ffn size {ffn_hidden_size} for dim {dim} with Meta's formula")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a LLaMA-family model. Field comments give the HF / Meta names."""

    hidden_size: int  # HF hidden_size / Meta dim
    num_layers: int  # HF num_hidden_layers / Meta n_layers
    num_heads: int  # HF num_attention_heads / Meta n_heads
    num_kv_heads: int  # HF num_key_value_heads / Meta n_kv_heads (== num_heads when absent)
    ffn_hidden_size: int  # HF intermediate_size / Meta: derived from multiple_of, ffn_dim_multiplier
    vocab_size: int  # HF vocab_size / Meta vocab_size (-1 in LLaMA-1/2: taken from the tokenizer)
    norm_eps: float = 1e-5  # HF rms_norm_eps / Meta norm_eps
    rope_theta: float = 10000.0  # HF rope_theta (5.x: rope_parameters.rope_theta) / Meta rope_theta
    rope_scaling: dict | None = None  # HF rope_scaling of type llama3 / Meta use_scaled_rope
    tie_embeddings: bool = False  # HF tie_word_embeddings / Meta: none (output == tok_embeddings)
    dtype: str = "float32"  # HF torch_dtype (5.x: dtype) / Meta: the tensors' dtype
    max_position_embeddings: int = 4096  # HF max_position_embeddings / Meta max_seq_len (runtime)
    bos_token_id: int | None = 1  # HF bos_token_id
    eos_token_id: int | list | None = 2  # HF eos_token_id
    # ---- LLaMA-shaped families (issue 19; docs/models.md). Defaults = plain LLaMA.
    explicit_head_dim: int | None = None  # HF head_dim when != hidden / heads (Qwen3, Llama 4, some LLaMA) / Meta: none
    qkv_bias: bool = False  # HF attention_bias (Llama, Qwen3); Qwen2: always / Megatron add_qkv_bias
    o_bias: bool = False  # HF attention_bias (Llama, Qwen3) also biases o_proj / Megatron add_bias_linear
    mlp_bias: bool = False  # HF mlp_bias (Llama) / Megatron add_bias_linear
    qk_norm: str | None = None  # "rms": per-head RMSNorm with weights (Qwen3 q_norm/k_norm); "l2": Llama 4 use_qk_norm
    sliding_window: int | None = None  # HF sliding_window (Mistral; Qwen2/3 with use_sliding_window): keys i-W < j <= i
    sliding_window_layers: tuple[int, ...] | None = None  # 0-based windowed layers; None = all (Qwen2/3 layer_types)
    architecture: str = "LlamaForCausalLM"  # HF architectures[0], written back
    # ---- Llama 4 (issue 18; docs/llama4.md). Defaults = dense.
    num_experts: int = 0  # HF num_local_experts (0: a dense model)
    moe_layers: tuple[int, ...] = ()  # HF moe_layers (from interleave_moe_layer_step): 0-based MoE layers
    moe_ffn_hidden_size: int | None = None  # HF intermediate_size of a Llama 4 expert (dense layers: ffn_hidden_size)
    shared_expert_ffn_hidden_size: int | None = None  # Llama 4: the shared expert, HF intermediate_size too
    moe_top_k: int = 1  # HF num_experts_per_tok
    nope_layers: tuple[int, ...] = ()  # HF no_rope_layers == 0: 0-based layers without rotary (and qk norm)
    attention_chunk_size: int | None = None  # HF attention_chunk_size: chunked local attention on rope layers
    attn_temperature_tuning: bool = False  # HF attn_temperature_tuning (NoPE layers only)
    floor_scale: int = 8192  # HF floor_scale
    attn_scale: float = 0.1  # HF attn_scale
    router_aux_loss_coef: float = 0.0  # HF router_aux_loss_coef (kept for the config; sft's own default is 0)

    def __post_init__(self) -> None:
        sizes = {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "num_heads": self.num_heads,
                 "num_kv_heads": self.num_kv_heads, "ffn_hidden_size": self.ffn_hidden_size,
                 "vocab_size": self.vocab_size}
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
        if bad:
            raise InputError(f"model sizes must be positive integers: {', '.join(bad)}")
        if self.sliding_window_layers is not None:  # a JSON list (manifest) becomes the frozen tuple
            object.__setattr__(self, "sliding_window_layers", tuple(self.sliding_window_layers))
        problems = []
        if self.explicit_head_dim is None and self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        elif self.head_dim <= 0 or self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        problems += family_problems(self)
        if self.vocab_size <= 0:
            problems.append(f"vocab_size {self.vocab_size} must be positive (pass a tokenizer for vocab_size -1)")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "llama3":
            problems.append(f"unsupported rope scaling type {self.rope_scaling.get('rope_type')!r}: "
                            "only 'llama3' (Llama 3.1/3.2) is supported")
        if problems:
            raise InputError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def family(self) -> str:
        """HF model_type of the architecture: "llama", "mistral", "qwen2", "qwen3"."""
        return FAMILIES[self.architecture]

    def is_plain_llama(self) -> bool:
        """True for a LlamaForCausalLM without the families' extras: what Meta's pth format can hold."""
        return not (self.architecture != "LlamaForCausalLM" or self.explicit_head_dim or self.qkv_bias
                    or self.o_bias or self.mlp_bias or self.qk_norm or self.sliding_window)

    def windowed(self, layer: int) -> bool:
        """Whether 0-based `layer` uses sliding-window attention."""
        return self.sliding_window is not None and (self.sliding_window_layers is None
                                                    or layer in self.sliding_window_layers)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i in self.moe_layers

    def uses_rope(self, i: int) -> bool:
        return i not in self.nope_layers

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = 2 * h * q + 2 * h * kv + 2 * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        attn += 2 * self.head_dim * (self.qk_norm == "rms")
        total = 0
        for i in range(self.num_layers):
            if self.is_moe_layer(i):
                fe, fs = self.moe_ffn_hidden_size or f, self.shared_expert_ffn_hidden_size or 0
                total += attn + self.num_experts * (3 * h * fe + h) + 3 * h * fs
            else:
                total += attn + 3 * h * f + (2 * f + h) * self.mlp_bias
        return total + v * h * (1 if self.tie_embeddings else 2) + h

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelSpec:
        return _parsed("config.json", cls._from_hf_config, cfg)

    @classmethod
    def _from_hf_config(cls, cfg: dict) -> ModelSpec:
        """Read a transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`) or 5.x (`rope_parameters`,
        `dtype`) config of a LLaMA-shaped family (`families.FAMILIES`) or of Llama 4."""
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") in LLAMA4_MODEL_TYPES or any(a.startswith("Llama4") for a in archs):
            from megallama.llama4 import spec_from_llama4_config

            return spec_from_llama4_config(cls, cfg)
        arch = architecture_of(cfg)
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if k not in cfg]
        if missing:
            raise InputError(f"config.json is missing {', '.join(missing)}")
        check_numbers("config.json", cfg, HF_NUMBERS)
        if cfg.get("hidden_act", "silu") != "silu":
            raise InputError(f"config.json hidden_act {cfg['hidden_act']!r}: LLaMA uses silu")
        heads = cfg["num_attention_heads"]
        extras = family_fields(cfg, arch, num_layers=cfg["num_hidden_layers"])
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or (rope if rope else None)
        scaling = _normalize_rope_scaling(scaling)
        return cls(
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            ffn_hidden_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=normalize_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            **extras,
        )

    def to_hf_config(self) -> dict:
        """A config.json that transformers 4.x and 5.x both load (both rope spellings are written), for the
        spec's own family class (`architecture`)."""
        if self.architecture.startswith("Llama4"):
            from megallama.llama4 import llama4_text_config

            return llama4_text_config(self)
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_hidden_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.dtype,
            "dtype": self.dtype,
        }
        keys, dropped = family_config(self)
        config.update(keys)
        return {k: v for k, v in config.items() if k not in dropped}

    # ---------------------------------------------------------------- Meta params.json
    @classmethod
    def from_meta_params(cls, params: dict, *, vocab_size: int | None = None, dtype: str = "float32",
                         extra: dict | None = None) -> ModelSpec:
        return _parsed("params.json", cls._from_meta_params, params, vocab_size=vocab_size, dtype=dtype,
                       extra=extra)

    @classmethod
    def _from_meta_params(cls, params: dict, *, vocab_size: int | None = None, dtype: str = "float32",
                          extra: dict | None = None) -> ModelSpec:
        """Read params.json (optionally nested under "model"). `vocab_size` fills in Meta's -1.

        `extra` holds fields params.json cannot express (max_position_embeddings, token ids, rope scaling factor)
        as recorded by megallama's own manifest.
        """
        params = params.get("model", params)
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise InputError(f"params.json is missing {', '.join(missing)}")
        check_numbers("params.json", params, META_NUMBERS)
        dim = params["dim"]
        ffn = meta_ffn_size(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            if vocab_size is None:
                raise InputError("params.json has vocab_size -1 and no tokenizer.model to take it from")
            vocab = vocab_size
        extra = extra or {}
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = {"rope_type": "llama3", **LLAMA3_ROPE_DEFAULTS, **(extra.get("rope_scaling") or {})}
        theta = float(params.get("rope_theta", 10000.0))
        default_max = 131072 if scaling else (8192 if theta >= 500000 else 4096)
        return cls(
            hidden_size=dim,
            num_layers=params["n_layers"],
            num_heads=params["n_heads"],
            num_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            ffn_hidden_size=extra.get("ffn_hidden_size", ffn),
            vocab_size=vocab,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(extra.get("tie_embeddings", False)),
            dtype=normalize_dtype(dtype),
            max_position_embeddings=int(extra.get("max_position_embeddings", default_max)),
            bos_token_id=extra.get("bos_token_id", 1),
            eos_token_id=extra.get("eos_token_id", 2),
        )

    def to_meta_params(self) -> dict:
        """params.json whose FFN formula reproduces `ffn_hidden_size` exactly (formats.md 2.4, 2.5)."""
        multiple_of, mult = meta_ffn_params(self.hidden_size, self.ffn_hidden_size)
        params: dict[str, Any] = {
            "dim": self.hidden_size,
            "n_layers": self.num_layers,
            "n_heads": self.num_heads,
            "n_kv_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": multiple_of,
            "norm_eps": self.norm_eps,
        }
        if mult is not None:
            params["ffn_dim_multiplier"] = mult
        # Llama-2's reference ModelArgs rejects unknown keys: emit theta/scaling only when they matter.
        if self.rope_theta != 10000.0:
            params["rope_theta"] = self.rope_theta
        if self.rope_scaling:
            params["use_scaled_rope"] = True
        return params

    def meta_extra(self) -> dict:
        """What params.json cannot hold; stored in megallama.json so pth -> HF is exact."""
        return {
            "ffn_hidden_size": self.ffn_hidden_size,
            "tie_embeddings": self.tie_embeddings,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    # ---------------------------------------------------------------- manifest round trip
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: (tuple(v) if k in TUPLE_FIELDS and v is not None else v) for k, v in data.items() if k in fields}
        return cls(**data)


TUPLE_FIELDS = ("moe_layers", "nope_layers")  # JSON lists in megallama.json, tuples in the frozen spec
LLAMA4_MODEL_TYPES = ("llama4", "llama4_text")


# Numeric keys of each config file: checked by name first, so a string or list gets a message naming its key.
HF_NUMBERS = {"hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int, "num_key_value_heads": int,
              "intermediate_size": int, "vocab_size": int, "head_dim": int, "max_position_embeddings": int,
              "rms_norm_eps": float, "rope_theta": float}
META_NUMBERS = {"dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int, "vocab_size": int,
                "multiple_of": int, "norm_eps": float, "rope_theta": float, "ffn_dim_multiplier": float}


def check_numbers(source: str, data: dict, kinds: dict[str, type]) -> None:
    """Every present, non-null key of `kinds` must be a finite number of its kind; one line naming each one."""
    bad = []
    for key, kind in kinds.items():
        value = data.get(key)
        if value is None:
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (kind is int and value != int(value)):
            bad.append(f"{key} is {value!r}, expected {'an integer' if kind is int else 'a number'}")
    if bad:
        raise InputError(f"{source}: {'; '.join(bad)}")


def _parsed(source: str, parse, *args, **kwargs) -> ModelSpec:
    """Malformed values (strings for sizes, zero heads, non-numeric factors) become one InputError line."""
    try:
        return parse(*args, **kwargs)
    except InputError:
        raise
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as e:
        raise InputError(f"{source} has a malformed value: {type(e).__name__}: {e}") from None


def _normalize_rope_scaling(scaling: dict | None) -> dict | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("rope_theta", None)
    if kind == "default":
        return None
    if kind != "llama3":
        raise InputError(f"unsupported rope scaling type {kind!r}: only 'llama3' (Llama 3.1/3.2) is supported")
    out = {"rope_type": "llama3", **LLAMA3_ROPE_DEFAULTS}
    for key in LLAMA3_ROPE_DEFAULTS:
        if key in scaling:
            out[key] = float(scaling[key]) if key != "original_max_position_embeddings" else int(scaling[key])
    return out


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocab: the next multiple of divisible_by x tp (formats.md 3.8)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def check_parallel(spec: ModelSpec, *, tp: int, pp: int, ep: int = 1) -> None:
    """Refuse TP/PP/EP sizes the model cannot be split into (formats.md P21, 3.9)."""
    problems = []
    if tp < 1 or pp < 1 or ep < 1:
        problems.append(f"TP, PP and EP must be >= 1 (got TP={tp}, PP={pp}, EP={ep})")
    elif ep > 1 and not spec.is_moe:
        problems.append(f"--ep {ep}: expert parallelism needs a mixture-of-experts model; this one is dense")
    elif spec.is_moe and spec.num_experts % ep:
        problems.append(f"EP={ep} does not divide the {spec.num_experts} experts (choose an EP that divides "
                        f"{spec.num_experts})")
    else:
        if spec.num_heads % tp:
            problems.append(f"TP={tp} does not divide the {spec.num_heads} attention heads")
        if spec.num_kv_heads % tp:
            problems.append(f"TP={tp} does not divide the {spec.num_kv_heads} KV heads "
                            f"(choose a TP that divides {spec.num_kv_heads})")
        for what, size in (("FFN size", spec.ffn_hidden_size), ("expert FFN size", spec.moe_ffn_hidden_size),
                           ("shared-expert FFN size", spec.shared_expert_ffn_hidden_size)):
            if size and size % tp:
                problems.append(f"TP={tp} does not divide the {what} {size}")
        if spec.num_layers % pp:
            problems.append(f"PP={pp} does not divide the {spec.num_layers} layers")
    if problems:
        raise InputError("; ".join(problems))


def check_rope_for_megatron(spec: ModelSpec) -> None:
    """megatron-core (and Megatron-LM's --use-rope-scaling --rope-scaling-factor) make only the llama3 `factor`
    configurable; the other three are hard-coded. Any other value would rebuild another model: refused, here for
    the converters to Megatron and for every command that runs megatron-core. Llama 4 is the exception: megallama
    computes its frequencies itself (engine/llama4.py), and docs/llama4.md says the flags cannot rebuild them."""
    if spec.rope_scaling and not spec.architecture.startswith("Llama4"):
        fixed = {k: v for k, v in LLAMA3_ROPE_DEFAULTS.items() if k != "factor"}
        wrong = {k: spec.rope_scaling.get(k) for k in fixed
                 if float(spec.rope_scaling.get(k, fixed[k])) != float(fixed[k])}
        if wrong:
            raise InputError(f"rope scaling {wrong} differs from megatron-core's hard-coded llama3 values {fixed}: "
                             "Megatron-LM cannot rebuild this model")
