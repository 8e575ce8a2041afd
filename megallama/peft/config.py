"""The `peft:` block of the sft config: which adapter, which linears, and its validation.

    peft:
      method: lora          # none | lora | dora
      rank: 16
      alpha: 32             # scale = alpha / rank
      dropout: 0.0          # on the adapter's input, in [0, 1)
      targets: [linear_qkv, linear_proj, linear_fc1, linear_fc2]   # or HF names: q_proj, ..., down_proj
      init_from: null       # an HF PEFT adapter folder to continue (megallama.peft.hf_adapter)

Targets are megatron-core's fused linears. An HF name maps to the fused linear that holds it; a fused linear is
adapted as a whole, so the HF names of one fused linear come all together or not at all (q_proj alone would
need a masked B: refused with the set to write instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from megallama.errors import InputError

METHODS = ("none", "lora", "dora")
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # in model order
# Megatron module -> (path inside a TransformerLayer, parallel style, the HF projections it fuses)
MODULES = {
    "linear_qkv": ("self_attention.linear_qkv", "column", ("q_proj", "k_proj", "v_proj")),
    "linear_proj": ("self_attention.linear_proj", "row", ("o_proj",)),
    "linear_fc1": ("mlp.linear_fc1", "column", ("gate_proj", "up_proj")),
    "linear_fc2": ("mlp.linear_fc2", "row", ("down_proj",)),
}
ALIASES = {hf: meg for meg, (_, _, hfs) in MODULES.items() for hf in hfs}  # q_proj -> linear_qkv, ...
DEFAULT_TARGETS = list(TARGETS)


@dataclass(frozen=True)
class PeftConfig:
    method: str = "none"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)  # Megatron names, model order
    init_from: str | None = None

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def dora(self) -> bool:
        return self.method == "dora"


def resolve_targets(names) -> tuple[str, ...]:
    """Megatron target names (model order) from Megatron and/or HF names; InputError for unknown names or an
    incomplete set of the HF names of one fused linear."""
    if isinstance(names, str):
        names = [n for n in names.replace("[", "").replace("]", "").split(",")]
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise InputError("peft.targets is empty: name at least one of " + ", ".join(TARGETS))
    unknown = [n for n in names if n not in MODULES and n not in ALIASES]
    if unknown:
        raise InputError(f"peft.targets: unknown target {unknown[0]!r}: expected Megatron names "
                         f"{', '.join(TARGETS)} or HF names {', '.join(ALIASES)}")
    chosen = {ALIASES.get(n, n) for n in names}
    for meg in chosen:
        hf = [n for n in names if ALIASES.get(n) == meg]
        fused = MODULES[meg][2]
        if hf and meg not in names and set(hf) != set(fused):
            raise InputError(f"peft.targets names {', '.join(sorted(hf))} but megatron-core fuses "
                             f"{', '.join(fused)} into one {meg}: adapt all of them ({', '.join(fused)} or {meg})")
    return tuple(t for t in TARGETS if t in chosen)


def peft_problems(block: dict) -> list[str]:
    """Everything wrong with a `peft:` block, as one-line messages (empty when it is fine or method is none)."""
    problems = []
    if block.get("method") not in METHODS:
        return [f"peft.method is {block.get('method')!r}: expected one of {', '.join(METHODS)}"]
    if block["method"] == "none":
        return []
    rank, alpha, dropout = block.get("rank"), block.get("alpha"), block.get("dropout")
    if not isinstance(rank, int) or rank <= 0:
        problems.append(f"peft.rank must be an integer > 0 (got {rank})")
    if alpha is None or alpha <= 0:
        problems.append(f"peft.alpha must be > 0 (got {alpha})")
    if dropout is None or not 0 <= dropout < 1:
        problems.append(f"peft.dropout must lie in [0, 1) (got {dropout})")
    try:
        resolve_targets(block.get("targets") or [])
    except InputError as e:
        problems.append(str(e))
    return problems


def peft_config(block: dict | None) -> PeftConfig:
    """The validated PeftConfig of a `peft:` block (None or method none: disabled)."""
    if not block or block.get("method", "none") == "none":
        return PeftConfig()
    problems = peft_problems(block)
    if problems:
        raise InputError("; ".join(problems))
    return PeftConfig(method=block["method"], rank=int(block["rank"]), alpha=float(block["alpha"]),
                      dropout=float(block["dropout"]), targets=resolve_targets(block["targets"]),
                      init_from=block.get("init_from"))


def adapter_shapes(spec, target: str) -> tuple[int, int]:
    """(in_features, out_features) of the whole (TP1) linear `target` of one layer of `spec`."""
    q_out = spec.num_heads * spec.head_dim
    return {"linear_qkv": (spec.hidden_size, q_out + 2 * spec.num_kv_heads * spec.head_dim),
            "linear_proj": (q_out, spec.hidden_size),
            "linear_fc1": (spec.hidden_size, 2 * spec.ffn_hidden_size),
            "linear_fc2": (spec.ffn_hidden_size, spec.hidden_size)}[target]


def trainable_parameters(spec, peft: PeftConfig) -> int:
    """Adapter parameters of the whole model: rank x (in + out) per targeted linear, plus out for DoRA."""
    per_layer = 0
    for target in peft.targets:
        fan_in, fan_out = adapter_shapes(spec, target)
        per_layer += peft.rank * (fan_in + fan_out) + (fan_out if peft.dora else 0)
    return per_layer * spec.num_layers
