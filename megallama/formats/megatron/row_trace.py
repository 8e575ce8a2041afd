"""Which byte ranges of the sources make a native tensor, found by running the real transform on row numbers.

Every Kind but ROW builds its tensor from whole dim-0 rows of its sources: a fused QKV stacks q, k and v row
blocks per query group, gate/up two row blocks, a vocab shard a block of embedding rows, a norm the whole
vector. Running `to_rank` (or `from_ranks`) on tensors holding each source row's number instead of its values
says, row by row, where each output row comes from; consecutive rows of one source are one contiguous byte
range of a C-contiguous tensor. The ranges are therefore decided by the same code that decides the tensor
path's values, and `rawcopy` moves them file to file:

    QKV, TP 2, rank 0, 4 query groups:  [q rows g0 | k g0 | v g0 | q g1 | k g1 | v g1]  -> 6 ranges
    GATE_UP, TP 2, rank 1:              [gate rows F/2..F | up rows F/2..F]           -> 2 ranges

ROW (dim-1 slices) is not a row stack (at TP 1 it is the whole tensor); vocab padding rows are zeros that lie in
no file: both give None.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

from megallama.formats.megatron.rules import Kind, from_ranks, to_rank
from megallama.formats.rawcopy import RawChain, RawRange, byte_slice, chain
from megallama.spec import ModelSpec

Raw = RawRange | RawChain
Run = tuple[int, int, int]  # (source index, first row, rows)


def traced_runs(fn: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
                shapes: Sequence[tuple[int, ...]]) -> list[list[Run]] | None:
    """For each tensor `fn` returns, its rows as runs of consecutive source rows; None if a row is no source's
    row (zero padding). `fn` gets one int64 tensor per source shaped [rows, 1, ...] holding row numbers."""
    starts, ids = [], []
    base = 1  # 0 marks a row made of zeros
    for shape in shapes:
        rows = shape[0]
        starts.append(base)
        ids.append(torch.arange(base, base + rows, dtype=torch.int64).reshape(rows, *(1,) * (len(shape) - 1)))
        base += rows
    out = []
    for t in fn(ids):
        assert t.numel() == (t.shape[0] if t.dim() else 1), "only row stacks can be traced"
        flat = t.reshape(-1)
        if flat.numel() == 0 or bool((flat == 0).any()):
            return None
        # a new run where a row does not follow the previous one, or a source starts
        new = torch.ones_like(flat, dtype=torch.bool)
        new[1:] = flat[1:] != flat[:-1] + 1
        new |= torch.isin(flat, torch.tensor(starts, dtype=torch.int64))
        first = torch.nonzero(new).reshape(-1).tolist() + [flat.numel()]
        runs = []
        for a, b in zip(first[:-1], first[1:], strict=True):
            v = int(flat[a])
            source = bisect.bisect_right(starts, v) - 1
            runs.append((source, v - starts[source], b - a))
        out.append(runs)
    return out


def _row_bytes(raw: Raw) -> int:
    return raw.nbytes // raw.shape[0]


def _gather(runs: list[Run], sources: Sequence[Raw], dtype: str, shape: tuple[int, ...]) -> Raw:
    parts: list[RawRange] = []
    for source, row, rows in runs:
        step = _row_bytes(sources[source])
        parts += byte_slice(sources[source], row * step, (row + rows) * step)
    return chain(parts, dtype, shape)


def rank_raw(kind: Kind, sources: Sequence[Raw], spec: ModelSpec, *, tp_rank: int, tp: int,
             padded_vocab_size: int) -> Raw | None:
    """Where the bytes of `to_rank(kind, sources)` lie in the source files, or None (ROW, padding)."""
    if kind is Kind.ROW and tp == 1:
        return sources[0]  # the whole tensor
    if kind is Kind.ROW or not sources or any(s.shape[0] == 0 for s in sources):
        return None
    dtype = sources[0].dtype
    if any(s.dtype != dtype for s in sources):
        return None
    shapes = [s.shape for s in sources]
    out_shape: list[tuple[int, ...]] = []

    def fn(ids):
        t = to_rank(kind, ids, spec, tp_rank=tp_rank, tp=tp, padded_vocab_size=padded_vocab_size)
        out_shape.append((t.shape[0], *shapes[0][1:]))
        return [t]

    traced = traced_runs(fn, shapes)
    return None if traced is None else _gather(traced[0], sources, dtype, out_shape[0])


def canonical_raw(kind: Kind, parts: Sequence[Raw], spec: ModelSpec, *, which: int, vocab_size: int) -> Raw | None:
    """Where the bytes of canonical tensor number `which` of `from_ranks(kind, parts)` lie, or None (ROW)."""
    if kind is Kind.ROW and len(parts) == 1:
        return parts[0]  # the whole tensor
    if kind is Kind.ROW or not parts or (kind is Kind.REPLICATED and len(parts) > 1):
        return None
    dtype = parts[0].dtype
    shapes = [p.shape for p in parts]
    out_shape: list[tuple[int, ...]] = []

    def fn(ids):
        outs = from_ranks(kind, ids, spec, vocab_size=vocab_size)
        out_shape.append((outs[which].shape[0], *shapes[0][1:]))
        return [outs[which]]

    traced = traced_runs(fn, shapes)
    return None if traced is None else _gather(traced[0], parts, dtype, out_shape[0])
