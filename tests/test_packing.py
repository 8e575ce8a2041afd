"""Sequence packing (megallama.sft.packing): row placement, DP split, thd micro-batches, slot accounting, and
that megatron-core's thd rotary restarts positions at each packed sample. The end-to-end loss equality of a
packed run and an unpacked one is in test_sft.py (test_packed_tp2_pp2_matches_unpacked)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from megallama.sft.data import IGNORE_INDEX, dp_microbatches
from megallama.sft.packing import pack_rows, packed_micro_batch, packing_efficiency, sample_lengths, step_layout


def test_pack_rows_is_first_fit_decreasing():
    # longest first: 8 -> row 0, 5 -> row 1, 4 -> row 1, 3 -> row 2, 2 -> row 0 (fills it)
    assert pack_rows([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    rows = pack_rows(lengths, 64)
    assert sorted(k for row in rows for k in row) == list(range(200))
    used = [sum(lengths[k] for k in row) for row in rows]
    assert max(used) <= 64 and sum(u <= 32 for u in used) <= 1  # any first fit leaves at most one row half empty
    assert rows == pack_rows(lengths, 64)  # deterministic


def test_sample_lengths_end_at_the_last_trained_position():
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 1:4] = 7  # prompt at 0, answer 1-3, then padding
    labels[1, :] = 5
    labels[2, 2] = 1
    assert sample_lengths(labels) == [4, 6, 3]


def test_step_layout_packed_and_unpacked():
    lengths = [10, 3, 7, 2, 9, 5, 4, 1]
    indices = [4, 0, 7, 2, 5, 1, 6, 3]
    plain = step_layout(indices, lengths, seq_length=12, micro_batch_size=2, dp_rank=1, dp_size=2, pack=False)
    assert plain.micro_batches == dp_microbatches(indices, dp_rank=1, dp_size=2, micro_batch_size=2)
    assert (plain.slots, plain.sample_tokens) == (8 * 12, 41)
    rows = pack_rows([lengths[i] for i in indices], 12)  # 4 rows of 12 hold the 41 tokens
    layouts = [step_layout(indices, lengths, seq_length=12, micro_batch_size=1, dp_rank=r, dp_size=2, pack=True)
               for r in range(2)]
    assert [len(layout.micro_batches) for layout in layouts] == [len(rows) // 2] * 2
    placed = [i for layout in layouts for micro in layout.micro_batches for row in micro for i in row]
    assert sorted(placed) == sorted(indices)
    assert layouts[0].slots == len(rows) * 12 and layouts[0].pad_fraction == 1 - 41 / (len(rows) * 12)
    # 3 rows over DP 2: one empty row tops them up to 2 per rank; -1 fillers (eval) are dropped
    padded = step_layout(indices[:5] + [-1] * 3, lengths, seq_length=12, micro_batch_size=2, dp_rank=0, dp_size=2,
                         pack=True)
    assert padded.slots == 4 * 12 and len(padded.micro_batches) == 1 and len(padded.micro_batches[0]) == 2
    # micro_batch_size is the most rows per micro-batch: 4 rows at micro 3 run as 2 micro-batches of 2 rows
    fewer = step_layout(indices, lengths, seq_length=12, micro_batch_size=3, dp_rank=0, dp_size=1, pack=True)
    assert [len(m) for m in fewer.micro_batches] == [2, 2] and fewer.slots == len(rows) * 12


def test_packed_micro_batch_segments_and_positions():
    input_ids = torch.arange(1, 31).view(3, 10)
    labels = input_ids + 100
    labels[0, 4:] = IGNORE_INDEX  # sample 0: 4 positions
    labels[1, :2] = IGNORE_INDEX  # sample 1: prompt of 2, answer to the end (10)
    labels[2, 3:] = IGNORE_INDEX  # sample 2: 3 positions
    lengths = sample_lengths(labels)
    batch = packed_micro_batch(input_ids, labels, lengths, [[0, 2], [1]], seq_length=10)
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 10, 20] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 10
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 21, 22, 23, 0, 0, 0, *range(11, 21)]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, *range(10)]]
    assert batch["loss_mask"].tolist() == [[1.0] * 7 + [0.0] * 5 + [1.0] * 8]
    assert batch["labels"][0, :7].tolist() == [101, 102, 103, 104, 121, 122, 123]


@pytest.mark.slow  # builds megatron-core attention on CPU: ~8 s
def test_thd_rotary_restarts_at_each_sample(monkeypatch):
    """megatron-core's thd rotary, fed packed_micro_batch's cu_seqlens and max_seqlen, rotates each sample as if
    it stood alone (positions 0, 1, ...). Attention scores under RoPE depend only on relative positions, so the
    loss alone could not tell; this checks the positions themselves."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # where RotaryEmbedding puts its table
    one_rank = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True, cp_group=one_rank)
    labels = torch.zeros(2, 16, dtype=torch.long)
    labels[0, 5:] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    lengths = sample_lengths(labels)  # [5, 9] in one row of 16: segments 5, 9 and a padding tail of 2
    batch = packed_micro_batch(torch.ones(2, 16, dtype=torch.long), labels, lengths, [[1, 0]], seq_length=16)
    q = torch.randn(16, 2, 8)  # [t, heads, head_dim]
    packed = apply_rotary_pos_emb(q, rope(batch["max_seqlen"], packed_seq=True), config,
                                  cu_seqlens=batch["cu_seqlens"], cp_group=one_rank)
    cu = batch["cu_seqlens"].tolist()
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        alone = apply_rotary_pos_emb(q[start:end, None], rope(end - start), config, cp_group=one_rank)[:, 0]
        torch.testing.assert_close(packed[start:end], alone, rtol=0, atol=0)


def test_packing_efficiency_counts_slots():
    lengths = [30, 30, 30, 30, 100, 10, 10, 10]
    stats = packing_efficiency(lengths, [list(range(8))], seq_length=100, micro_batch_size=1, dp_size=1)
    assert stats["unpacked_fill"] == 250 / 800
    assert stats["packed_fill"] == 250 / 300 and stats["samples_per_row"] == 8 / 3
