"""Fused Megatron adapters <-> per-projection HF PEFT adapters: pure tensor transforms (docs/peft-io.md).

An adapter around a Megatron linear adds `scale * B @ A` to its weight, A = `adapter.linear_in` [r, in],
B = `adapter.linear_out` [out, r]. Its rows of B (and of DoRA's per-row `magnitude`) are in the order of the
fused weight's rows, so they split exactly as the weight splits: the same `rules.from_ranks` / `to_rank` pair,
with the same GQA grouping (and, for a layout that stores Meta's rotary order, the same rotary permutation).

    linear_qkv  (rank r)                          q_proj, k_proj, v_proj (rank r each)
      A [r, h]                            ->        A_q = A_k = A_v = A                 (copied)
      B [ng*(qpg+2)*dh, r]  grouped:      ->        B_q [nh*dh, r], B_k, B_v [ng*dh, r] (split like W)
        [ q_g0.. | k_g | v_g ] per group g

    q_proj, k_proj, v_proj (ranks rq, rk, rv)      linear_qkv  (rank R >= rq+rk+rv)
      A_q, A_k, A_v                       ->        A = [A_q; A_k; A_v; 0]             [R, h]
      B_q, B_k, B_v                       ->        B = fuse_qkv([B_q 0 0 0], [0 B_k 0 0], [0 0 B_v 0])
                                                    block diagonal: B @ A = B_q A_q | B_k A_k | B_v A_v

gate/up <-> linear_fc1 work the same way ([gate; up] rows); o_proj <-> linear_proj and down_proj <-> linear_fc2
map one to one. DoRA's norm is taken per output row over the input dimension, so splitting rows of the magnitude
is exact too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megallama import transforms as T
from megallama.errors import InputError
from megallama.formats.megatron.local import LAYER_RULES
from megallama.formats.megatron.rules import Kind, from_ranks, to_rank
from megallama.spec import ModelSpec

LAYER_PREFIX = "decoder.layers.{L}."  # the full (TP-gathered) adapter view uses the GLOBAL layer index
A_SUFFIX, B_SUFFIX, M_SUFFIX = ".adapter.linear_in.weight", ".adapter.linear_out.weight", ".adapter.magnitude"


@dataclass(frozen=True)
class Target:
    """One adaptable Megatron linear and the HF projections its weight is made of."""

    name: str  # as peft.json `targets` spells it: linear_qkv
    module: str  # in a layer: self_attention.linear_qkv
    kind: Kind  # how the weight (and so B) is fused and split
    projections: tuple[str, ...]  # HF modules in a layer, in fusion order: self_attn.q_proj, ...


def _targets() -> dict[str, Target]:
    """Read off the mcore-local rule table, so the adapter mapping can never drift from the weight mapping."""
    out = {}
    for rule in LAYER_RULES:
        if rule.kind in (Kind.QKV, Kind.ROW, Kind.GATE_UP) and rule.target.endswith(".weight"):  # not biases
            module = rule.target.removeprefix("decoder.layers.{j}.").removesuffix(".weight")
            hf = tuple(s.removeprefix("model.layers.{i}.").removesuffix(".weight") for s in rule.sources)
            out[module.rsplit(".", 1)[1]] = Target(module.rsplit(".", 1)[1], module, rule.kind, hf)
    return out


TARGETS: dict[str, Target] = _targets()  # linear_proj, linear_qkv, linear_fc1, linear_fc2
PROJECTION_TARGET = {p.rsplit(".", 1)[1]: t for t in TARGETS.values() for p in t.projections}  # q_proj -> Target


@dataclass
class ProjAdapter:
    """One HF projection's adapter: W' = W + (B @ A) * scale; DoRA then rescales each row to `magnitude`."""

    a: torch.Tensor  # lora_A [r, in]
    b: torch.Tensor  # lora_B [out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # lora_magnitude_vector [out] (DoRA)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def fused_key(layer: int, target: Target, suffix: str) -> str:
    return LAYER_PREFIX.format(L=layer) + target.module + suffix


def hf_module(layer: int, projection: str) -> str:
    """`model.layers.3.self_attn.q_proj`: the module path under LlamaForCausalLM (PEFT keys add a prefix)."""
    return f"model.layers.{layer}.{projection}"


def split_rows(kind: Kind, fused: torch.Tensor, spec: ModelSpec, *,
               rotary_interleaved: bool = False) -> tuple[torch.Tensor, ...]:
    """Rows of a fused tensor (a weight, B, or a 1-D magnitude) -> one tensor per HF projection, exactly as the
    Megatron readers split the weight."""
    if kind is Kind.ROW:  # linear_proj / linear_fc2: one projection, rows unchanged
        return (fused,)
    parts = from_ranks(kind, [fused], spec, vocab_size=spec.vocab_size)
    if rotary_interleaved and kind is Kind.QKV:  # Meta's pair order on disk: undo it as the weight reader does
        q, k, v = parts
        parts = (T.meta_to_hf_rotary(q, spec.num_heads), T.meta_to_hf_rotary(k, spec.num_kv_heads), v)
    return tuple(parts)


def fuse_rows(kind: Kind, parts: tuple[torch.Tensor, ...], spec: ModelSpec, *,
              rotary_interleaved: bool = False) -> torch.Tensor:
    """Inverse of `split_rows`."""
    if kind is Kind.ROW:
        return parts[0]
    if rotary_interleaved and kind is Kind.QKV:
        q, k, v = parts
        parts = (T.hf_to_meta_rotary(q, spec.num_heads), T.hf_to_meta_rotary(k, spec.num_kv_heads), v)
    return to_rank(kind, list(parts), spec, tp_rank=0, tp=1, padded_vocab_size=spec.vocab_size)


# ---------------------------------------------------------------- fused (Megatron) -> per projection (HF)
def fused_to_projections(tensors: dict[str, torch.Tensor], spec: ModelSpec, *, scale: float,
                         rotary_interleaved: bool = False) -> dict[str, ProjAdapter]:
    """The full-view adapter state (`decoder.layers.{L}.<module>.adapter.*`) -> {HF module path: ProjAdapter}.

    A is copied to every projection of a fused linear; B and the magnitude are split like its weight.
    """
    out: dict[str, ProjAdapter] = {}
    for layer in range(spec.num_layers):
        for target in TARGETS.values():
            a_key = fused_key(layer, target, A_SUFFIX)
            if a_key not in tensors:
                continue
            a, b = tensors[a_key], tensors[fused_key(layer, target, B_SUFFIX)]  # [r, in], [out, r]
            mag = tensors.get(fused_key(layer, target, M_SUFFIX))  # [out] | None
            rows = _out_features(target, spec)
            if b.shape[0] != rows or a.shape[0] != b.shape[1] or (mag is not None and mag.shape != (rows,)):
                raise InputError(f"the adapter of layer {layer} {target.name} (linear_in {tuple(a.shape)}, linear_out "
                                 f"{tuple(b.shape)}) does not fit a base whose {target.name} has {rows} rows")
            bs = split_rows(target.kind, b, spec, rotary_interleaved=rotary_interleaved)
            ms = split_rows(target.kind, mag, spec, rotary_interleaved=rotary_interleaved) if mag is not None \
                else (None,) * len(bs)
            for projection, b_p, m_p in zip(target.projections, bs, ms, strict=True):
                out[hf_module(layer, projection)] = ProjAdapter(a.clone(), b_p, scale, m_p)
    return out


# ---------------------------------------------------------------- per projection (HF) -> fused (Megatron)
def fused_rank(projs: dict[str, ProjAdapter], spec: ModelSpec) -> int:
    """The rank one fused adapter needs to hold every group exactly: the largest sum of a group's ranks."""
    need = 0
    for layer in range(spec.num_layers):
        for target in TARGETS.values():
            need = max(need, sum(projs[m].rank for p in target.projections
                                 if (m := hf_module(layer, p)) in projs))
    return need


def projections_to_fused(projs: dict[str, ProjAdapter], spec: ModelSpec, *, rank: int,
                         rotary_interleaved: bool = False) -> tuple[dict[str, torch.Tensor], float]:
    """{HF module path: ProjAdapter} -> (full-view fused adapter state of one uniform `rank`, its scale).

    A group's A matrices are stacked, its B matrices placed block-diagonally, the rest zero-padded to `rank`, so
    scale * B @ A is exactly each projection's own delta; a projection whose scale differs from the common one
    has its B multiplied by the ratio. A projection missing from a group gets a zero block (its delta is zero);
    DoRA cannot do that (a magnitude would rescale its rows), so a DoRA group must be complete.
    """
    if not projs:
        raise InputError("the adapter has no LoRA weights for q/k/v/o/gate/up/down projections")
    scale = next(iter(projs.values())).scale
    out: dict[str, torch.Tensor] = {}
    for layer in range(spec.num_layers):
        for target in TARGETS.values():
            group = [projs.get(hf_module(layer, p)) for p in target.projections]
            if any(pa is not None for pa in group):
                out.update(_fuse_group(layer, target, group, spec, rank=rank, scale=scale,
                                       rotary_interleaved=rotary_interleaved))
    return out, scale


def _fuse_group(layer: int, target: Target, group: list[ProjAdapter | None], spec: ModelSpec, *, rank: int,
                scale: float, rotary_interleaved: bool) -> dict[str, torch.Tensor]:
    """One fused linear's adapter from its projections' (None: not adapted), as drawn in the module docstring."""
    dora = any(pa is not None and pa.magnitude is not None for pa in group)
    if dora and any(pa is None or pa.magnitude is None for pa in group):
        missing = [p for p, pa in zip(target.projections, group, strict=True) if pa is None or pa.magnitude is None]
        raise InputError(f"layer {layer}: a DoRA adapter on {target.name} needs all of "
                         f"{', '.join(target.projections)}; {', '.join(missing)} has none")
    present = [pa for pa in group if pa is not None]
    a = torch.zeros(rank, present[0].a.shape[1])  # [R, in]: [A_1; A_2; ...; 0]
    a[:sum(pa.rank for pa in present)] = torch.cat([pa.a.float() for pa in present])
    rows = [t.shape[0] for t in split_rows(target.kind, torch.empty(_out_features(target, spec)), spec)]
    blocks, col = [], 0
    for pa, n in zip(group, rows, strict=True):
        b = torch.zeros(n, rank)  # [out_p, R]: this projection's B in its own columns, zero elsewhere
        if pa is not None:
            b[:, col:col + pa.rank] = pa.b.float() if pa.scale == scale else pa.b.float() * (pa.scale / scale)
            col += pa.rank
        blocks.append(b)
    fuse = dict(spec=spec, rotary_interleaved=rotary_interleaved)
    out = {fused_key(layer, target, A_SUFFIX): a,
           fused_key(layer, target, B_SUFFIX): fuse_rows(target.kind, tuple(blocks), **fuse)}
    if dora:
        out[fused_key(layer, target, M_SUFFIX)] = fuse_rows(target.kind, tuple(pa.magnitude.float() for pa in group),
                                                            **fuse)
    return out


def _out_features(target: Target, spec: ModelSpec) -> int:
    """Rows of the fused weight of `target`."""
    if target.kind is Kind.QKV:
        return (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    if target.kind is Kind.GATE_UP:
        return 2 * spec.ffn_hidden_size
    return spec.hidden_size  # linear_proj, linear_fc2


def projection_shape(target: Target, spec: ModelSpec, projection: str) -> tuple[int, int]:
    """(out, in) of one HF projection's weight, for checking that an adapter fits the base."""
    rows = split_rows(target.kind, torch.empty(_out_features(target, spec)), spec)
    out = rows[target.projections.index(projection)].shape[0]
    in_features = spec.ffn_hidden_size if target.name == "linear_fc2" else spec.hidden_size
    return out, in_features
