"""Sequence packing (`data.pack: true`): the samples of one global batch share seq_length rows.

Packing changes where samples sit, never which samples a step trains on: each global batch (the same sample
indices as without packing) is packed into rows by first-fit decreasing, deterministically, so the loss per
trained token and every gradient equal the unpacked run's. A micro-batch of `micro_batch_size` rows becomes one
`thd` sequence of micro_batch_size x seq_length tokens with cu_seqlens marking each sample (and each row's
padding tail, as a segment of its own): attention stays inside a sample and rotary positions restart at each
sample (megatron-core's thd rotary; see `packed_micro_batch`).

A sample's length here is its positions through its last trained one: positions after it carry no loss and
are seen by no trained position (causal attention), so leaving them out changes nothing but the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megallama.sft.data import IGNORE_INDEX


def sample_lengths(labels: torch.Tensor) -> list[int]:
    """[N, seq_length] labels -> each row's positions through its last trained one (>= 1 for kept samples)."""
    trained = labels != IGNORE_INDEX
    positions = torch.arange(1, labels.shape[1] + 1).expand_as(labels)
    return (positions * trained).amax(dim=1).tolist()


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: positions into `lengths`, longest first (ties: earlier first), each placed in the
    first row with room; within a row in placement order. Deterministic."""
    rows: list[list[int]] = []
    free: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        assert 0 < lengths[k] <= capacity, (lengths[k], capacity)  # rows are cut to seq_length on loading
        row = next((r for r, room in enumerate(free) if lengths[k] <= room), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(k)
        free[row] -= lengths[k]
    return rows


@dataclass(frozen=True)
class StepLayout:
    """How one global batch is laid out: this DP rank's micro-batches and the step's token-slot accounting."""

    micro_batches: list[list]  # unpacked: lists of sample indices (-1: filler row); packed: lists of rows
    slots: int  # token slots of the whole global batch, every DP rank: rows x seq_length
    sample_tokens: int  # of those, slots holding a sample's token (through its last trained one)

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.sample_tokens / self.slots if self.slots else 0.0


def step_layout(indices: list[int], lengths: list[int], *, seq_length: int, micro_batch_size: int, dp_rank: int,
                dp_size: int, pack: bool) -> StepLayout:
    """The global batch `indices` (-1: a filler with no loss) split for DP rank `dp_rank`.

    Unpacked: one sample per row, DP rank r takes the r-th contiguous share (`dp_microbatches`). Packed: the
    samples are packed into rows and rank r takes rows r, r + DP, r + 2 DP, ...; micro_batch_size is then the
    most rows per micro-batch: each rank runs as few micro-batches as that allows, all of one shape (what the
    pipeline schedule sends between stages), topped up with empty rows where the rows do not divide evenly.
    """
    from megallama.sft.data import dp_microbatches

    samples = [i for i in indices if i >= 0]
    sample_tokens = sum(lengths[i] for i in samples)
    if not pack:
        parts = dp_microbatches(indices, dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=micro_batch_size)
        return StepLayout(parts, len(indices) * seq_length, sample_tokens)
    rows = [[samples[k] for k in row] for row in pack_rows([lengths[i] for i in samples], seq_length)]
    per_rank = -(-len(rows) // dp_size)
    count = -(-per_rank // micro_batch_size)  # micro-batches per rank
    size = -(-per_rank // count)  # rows per micro-batch, <= micro_batch_size
    rows += [[] for _ in range(dp_size * count * size - len(rows))]
    mine = rows[dp_rank::dp_size]
    parts = [mine[k: k + size] for k in range(0, len(mine), size)]
    return StepLayout(parts, len(rows) * seq_length, sample_tokens)


def packed_micro_batch(input_ids: torch.Tensor, labels: torch.Tensor, lengths: list[int], rows: list[list[int]],
                       seq_length: int) -> dict:
    """One packed micro-batch: tokens, labels, loss_mask, position_ids [1, len(rows) x seq_length], cu_seqlens
    (int32) and max_seqlen. Each row holds its samples, then its padding tail as one more segment (no loss).

    max_seqlen is the longest segment, not the row length: megatron-core sizes its rotary table by it, and a
    table as long as the whole thd sequence would make its thd rotary continue positions across samples.
    """
    tokens, targets, positions, segments = [], [], [], []
    for row in rows:
        used = 0
        for i in row:
            n = lengths[i]
            tokens.append(input_ids[i, :n])
            targets.append(labels[i, :n])
            segments.append(n)
            used += n
        if used < seq_length:  # the padding tail: its own segment, so no sample attends to it
            tokens.append(torch.zeros(seq_length - used, dtype=input_ids.dtype))
            targets.append(torch.full((seq_length - used,), IGNORE_INDEX, dtype=labels.dtype))
            segments.append(seq_length - used)
    for n in segments:
        positions.append(torch.arange(n))  # rotary positions restart per sample
    target = torch.cat(targets).unsqueeze(0)  # [1, t]
    cu_seqlens = torch.tensor([0, *torch.tensor(segments).cumsum(0).tolist()], dtype=torch.int32)
    return {"tokens": torch.cat(tokens).unsqueeze(0), "labels": target.clamp(min=0),
            "loss_mask": (target != IGNORE_INDEX).float(), "position_ids": torch.cat(positions).unsqueeze(0),
            "cu_seqlens": cu_seqlens, "max_seqlen": max(segments)}


def packing_efficiency(lengths: list[int], batches, *, seq_length: int, micro_batch_size: int, dp_size: int) -> dict:
    """Token-slot fill over `batches` (lists of sample indices) unpacked and packed, and samples per packed row."""
    slots = {False: 0, True: 0}
    tokens = samples = rows = 0
    for indices in batches:
        for pack in (False, True):
            layout = step_layout(indices, lengths, seq_length=seq_length, micro_batch_size=micro_batch_size,
                                 dp_rank=0, dp_size=dp_size, pack=pack)
            slots[pack] += layout.slots
        tokens += layout.sample_tokens
        samples += len(indices)
        rows += layout.slots // seq_length
    return {"unpacked_fill": tokens / slots[False], "packed_fill": tokens / slots[True],
            "samples_per_row": samples / rows, "steps": len(batches)}
