"""What every Megatron layout table is made of: `Rule`s, their `Kind`s, a `Layout`, and the split functions.

A rule names one native key (`{j}` = stage-local layer), the canonical HF names it is made of (`{i}` = global
layer) and a `Kind`; each kind is a pair of pure functions, `to_rank` (canonical -> one TP rank's tensor) and
`from_ranks` (all TP ranks -> canonical), exact inverses (formats.md 3.5-3.8, 4.1).

    QKV, rank r of t (formats.md 3.5), groups g = r*ng/t ... (r+1)*ng/t - 1:
        [ q_{g,0} .. q_{g,qpg-1} | k_g | v_g ]  for each of the rank's groups   -> [(nh+2ng)/t * dh, h]
    QKV_BLOCKS (alibaba, formats.md 3.5): [ q rows of rank r | k rows of rank r | v rows of rank r ]
    GATE_UP, rank r (formats.md 3.6): [ gate rows r*F/t .. | up rows r*F/t .. ]  -> [2F/t, h]
    VOCAB (formats.md 3.8): rows r*Vp/t .. of the zero-padded [Vp, h]
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megallama import transforms as T
from megallama.names import EMBED, has_feature
from megallama.spec import ModelSpec


class Kind(enum.Enum):
    """How one native tensor is built from canonical tensors and divided across TP ranks."""

    REPLICATED = "replicated"  # norms (and alibaba's lm_head): the same copy on every rank
    ROW = "row"  # linear_proj / dense, linear_fc2 / dense_4h_to_h: split the input features (dim 1)
    VOCAB = "vocab"  # embedding, output layer: pad rows with zeros to Vp, then split dim 0
    QKV = "qkv"  # q, k, v fused by query group, whole groups per rank
    QKV_BLOCKS = "qkv_blocks"  # [q_r; k_r; v_r] per rank (alibaba/Megatron-LLaMA)
    GATE_UP = "gate_up"  # [gate_r; up_r] per rank


@dataclass(frozen=True)
class Rule:
    """One native state-dict key. An empty `sources` means the module exists but has no weight of its own
    (the output layer of a tied model on a single stage, TE's core_attention), so only its `_extra_state`
    is written."""

    target: str  # native key; "{j}" = stage-local layer index
    sources: tuple[str, ...]  # canonical (HF) names; "{i}" = global layer index
    kind: Kind
    extra_state: bool = False  # the module's state_dict() also has `<module>._extra_state`
    when: str | None = None  # present only for specs with this feature (names.has_feature: biases, q/k norms)

    def bind(self, i: int | None = None, j: int | None = None) -> Rule:
        return Rule(self.target.format(j=j), tuple(s.format(i=i) for s in self.sources), self.kind, self.extra_state,
                    self.when)

    @property
    def extra_state_key(self) -> str:
        return self.target.rsplit(".", 1)[0] + "._extra_state"


@dataclass(frozen=True)
class Layout:
    """One Megatron dialect as data: its key table and the few facts that are not keys."""

    name: str  # as `--layout` and megallama.json spell it
    layer_rules: tuple[Rule, ...]  # in state-dict order
    embedding: Rule
    final_norm: Rule
    output: Rule  # the untied LM head (last stage)
    tied_output: Rule | None = None  # last stage's copy of a tied embedding at PP > 1 (None: `output` from EMBED)
    rotary_interleaved: bool = False  # q/k rows stored in Meta's interleaved pair order
    te_extra_state: bool = False  # Transformer Engine modules: `_extra_state` is an (empty) uint8 tensor
    aliases: tuple[tuple[str, str], ...] = ()  # older spellings -> this table's, replaced as substrings
    flags: tuple[str, ...] = ()  # the Megatron-LM flags a run of this layout needs (README, inspect)

    def rename(self, keys: dict) -> dict:
        """A flat state dict with this layout's older spellings replaced by the table's."""
        if not self.aliases:
            return keys
        out = {}
        for key, value in keys.items():
            for old, new in self.aliases:
                key = key.replace(old, new)
            out[key] = value
        return out

    def extra_state_value(self, key: str):
        """What a freshly built model of this layout saves for `key`: None for megatron-core's own linears;
        an empty uint8 tensor for TE modules, as TE >= 2.4 writes "no FP8 state" (formats.md 4.1)."""
        if self.te_extra_state and not key.startswith("output_layer."):
            return torch.empty(0, dtype=torch.uint8)
        return None


def stage_rules(layout: Layout, spec: ModelSpec, *, pp_rank: int, pp: int, ep_rank: int = 0,
                ep: int = 1) -> list[tuple[Rule, int | None]]:
    """The bound rules of one pipeline stage, in state-dict order, each with its global layer (None outside layers).

    Tied embeddings (formats.md P9): on a single stage the output layer reuses the embedding and has no weight
    key; with PP > 1 the last stage holds its own copy, which must equal the embedding. A mixture-of-experts
    layer (Llama 4) keeps the attention half of `layout.layer_rules` and holds EP rank `ep_rank`'s experts
    (`moe.py`).
    """
    layers = T.stage_layers(spec.num_layers, pp)[pp_rank]
    rules: list[tuple[Rule, int | None]] = []
    if pp_rank == 0:
        rules.append((layout.embedding, None))
    present = extra_state_last([r for r in layout.layer_rules if has_feature(spec, r.when)])
    moe_rules: tuple[Rule, ...] = ()
    if spec.is_moe:
        from megallama.formats.megatron.moe import check_moe_layout, moe_mlp_rules

        check_moe_layout(layout.name, spec)
        attention = tuple(r for r in present if ".mlp." not in r.target)
        moe_rules = attention + moe_mlp_rules(spec, ep_rank=ep_rank, ep=ep)
    for j, i in enumerate(layers):
        table = moe_rules if spec.is_moe_layer(i) else present
        rules += [(r.bind(i=i, j=j), i) for r in table]
    if pp_rank == pp - 1:
        rules.append((layout.final_norm, None))
        out = layout.output
        if not spec.tie_embeddings:
            rules.append((out, None))
        elif pp > 1:
            rules.append((layout.tied_output or Rule(out.target, (EMBED,), Kind.VOCAB, out.extra_state), None))
        elif out.extra_state:
            rules.append((Rule(out.target, (), Kind.VOCAB, extra_state=True), None))
    return rules


def extra_state_last(rules: list[Rule]) -> list[Rule]:
    """A module's `_extra_state` follows its last tensor (a bias after its weight), as in `state_dict()` order."""
    def module(r: Rule) -> str:
        return r.target.rsplit(".", 1)[0]

    last = {module(r): n for n, r in enumerate(rules)}
    flagged = {module(r) for r in rules if r.extra_state}
    return [dataclasses.replace(r, extra_state=module(r) in flagged and last[module(r)] == n)
            for n, r in enumerate(rules)]


# ---------------------------------------------------------------- canonical -> one TP rank
def to_rank(kind: Kind, tensors: Sequence[torch.Tensor], spec: ModelSpec, *, tp_rank: int, tp: int,
            padded_vocab_size: int) -> torch.Tensor:
    """Rank `tp_rank`'s piece of the native tensor made from `tensors` (always a fresh, compact tensor)."""
    if kind is Kind.REPLICATED:
        return tensors[0].clone()
    if kind is Kind.ROW:
        return T.shard_cols(tensors[0], tp_rank, tp)
    if kind is Kind.VOCAB:
        return vocab_rows(tensors[0], tp_rank, tp, padded_vocab_size)
    if kind is Kind.GATE_UP:
        gate, up = (T.shard_rows(t, tp_rank, tp) for t in tensors)
        return T.fuse_gate_up(gate, up)  # [2F/t, h]
    if kind is Kind.QKV:
        # q rows are head-ordered and a group's heads are contiguous, so a rank's row block of q, k and v
        # holds exactly its whole groups; fuse them with the rank-local head counts.
        q, k, v = (T.shard_rows(t, tp_rank, tp) for t in tensors)
        return T.fuse_qkv(q, k, v, num_heads=spec.num_heads // tp, num_kv_heads=spec.num_kv_heads // tp)
    if kind is Kind.QKV_BLOCKS:
        return torch.cat([T.shard_rows(t, tp_rank, tp) for t in tensors])  # [(nh+2ng)/t * dh, h]
    raise AssertionError(kind)


def vocab_rows(w: torch.Tensor, tp_rank: int, tp: int, padded_vocab_size: int) -> torch.Tensor:
    """Rows tp_rank*Vp/t ... of `w` padded with zero rows to Vp, without building the padded whole."""
    per = padded_vocab_size // tp
    start = tp_rank * per
    real = w[start:min(start + per, w.shape[0])]
    out = torch.zeros(per, *w.shape[1:], dtype=w.dtype)  # [Vp/t, h]
    out[:real.shape[0]] = real
    return out


# ---------------------------------------------------------------- all TP ranks -> canonical
def from_ranks(kind: Kind, parts: Sequence[torch.Tensor], spec: ModelSpec, *,
               vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Inverse of `to_rank`: the canonical tensors (in `Rule.sources` order) from every TP rank's piece."""
    tp = len(parts)
    if kind is Kind.REPLICATED:
        return (T.unshard(list(parts), T.Split.REPLICATED).clone(),)
    if kind is Kind.ROW:
        return (T.unshard(list(parts), T.Split.ROW),)
    if kind is Kind.VOCAB:
        return (T.unpad_vocab(T.unshard(list(parts), T.Split.COLUMN), vocab_size),)
    if kind is Kind.GATE_UP:
        gates, ups = zip(*(T.split_gate_up(p) for p in parts), strict=True)
        return torch.cat(gates).contiguous(), torch.cat(ups).contiguous()
    if kind is Kind.QKV:
        split = [T.split_qkv(p, num_heads=spec.num_heads // tp, num_kv_heads=spec.num_kv_heads // tp) for p in parts]
        return tuple(torch.cat(ts).contiguous() for ts in zip(*split, strict=True))
    if kind is Kind.QKV_BLOCKS:
        q, kv = spec.num_heads * spec.head_dim // tp, spec.num_kv_heads * spec.head_dim // tp
        split = [torch.split(p, [q, kv, kv]) for p in parts]  # each rank: [q_r; k_r; v_r]
        return tuple(torch.cat(ts).contiguous() for ts in zip(*split, strict=True))
    raise AssertionError(kind)


def rank_shape(kind: Kind, spec: ModelSpec, source_shape: tuple[int, ...], *, tp: int,
               padded_vocab_size: int) -> tuple[int, ...]:
    """The per-rank shape `to_rank` produces, for validating a checkpoint before reading its tensors."""
    if kind is Kind.REPLICATED:
        return tuple(source_shape)
    if kind is Kind.ROW:
        return (source_shape[0], source_shape[1] // tp)
    if kind is Kind.VOCAB:
        return (padded_vocab_size // tp, spec.hidden_size)
    # weights [rows, h], biases [rows]; GATE_UP's source is the gate (a dense MLP's, an expert's or the shared one's)
    if kind is Kind.GATE_UP:
        return (2 * source_shape[0] // tp, *source_shape[1:])
    if kind in (Kind.QKV, Kind.QKV_BLOCKS):
        return ((spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim // tp, *source_shape[1:])
    raise AssertionError(kind)
