"""Pure tensor transforms, each with an exact inverse (formats.md sections 2-3).

They take tensors and ints and return tensors: no paths, no process groups, no progress bars.
`INVERSE` pairs every forward function with its inverse; tests round-trip every pair.
"""

from __future__ import annotations

import enum

import torch


# ---------------------------------------------------------------- rotary order (formats.md 2.2)
# Meta rotates adjacent pairs (2i, 2i+1) of each head; HF/mcore-default rotate i with i + head_dim/2.
# The fix is a row permutation inside each head: evens first, then odds.
def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved-pair rows -> HF half-split rows. `n_heads` = num_heads for q, num_kv_heads for k."""
    rows, cols = w.shape[0], w.shape[1:]
    half = rows // n_heads // 2
    # [n, dh/2, 2, ...] -> [n, 2, dh/2, ...]
    return w.reshape(n_heads, half, 2, *cols).transpose(1, 2).reshape(rows, *cols).contiguous()


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split rows -> Meta interleaved-pair rows (inverse of `meta_to_hf_rotary`)."""
    rows, cols = w.shape[0], w.shape[1:]
    half = rows // n_heads // 2
    # [n, 2, dh/2, ...] -> [n, dh/2, 2, ...]
    return w.reshape(n_heads, 2, half, *cols).transpose(1, 2).reshape(rows, *cols).contiguous()


# ---------------------------------------------------------------- fused QKV (formats.md 3.5)
#   group g of ng:  [ q_{g*qpg} ... q_{g*qpg+qpg-1} | k_g | v_g ]   each block head_dim rows
#   full matrix:    [ng, q_per_group + 2, head_dim, hidden]
# A TP rank holds a contiguous run of whole groups, so the same functions work on one rank's slice
# when given that rank's head counts.
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int,
             num_kv_heads: int) -> torch.Tensor:
    """q [nh*dh, h], k/v [ng*dh, h] -> megatron linear_qkv [(nh+2ng)*dh, h], grouped by query group."""
    head_dim = q.shape[0] // num_heads
    hidden = q.shape[1:]
    qpg = num_heads // num_kv_heads
    q = q.reshape(num_kv_heads, qpg * head_dim, *hidden)  # [ng, qpg*dh, h]
    k = k.reshape(num_kv_heads, head_dim, *hidden)  # [ng, dh, h]
    v = v.reshape(num_kv_heads, head_dim, *hidden)  # [ng, dh, h]
    return torch.cat([q, k, v], dim=1).reshape(-1, *hidden).contiguous()  # [ng*(qpg+2)*dh, h]


def split_qkv(qkv: torch.Tensor, *, num_heads: int,
              num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`: megatron linear_qkv -> (q, k, v)."""
    qpg = num_heads // num_kv_heads
    head_dim = qkv.shape[0] // (num_kv_heads * (qpg + 2))
    hidden = qkv.shape[1:]
    grouped = qkv.reshape(num_kv_heads, (qpg + 2) * head_dim, *hidden)  # [ng, (qpg+2)*dh, h]
    q, k, v = torch.split(grouped, [qpg * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *hidden).contiguous(), k.reshape(-1, *hidden).contiguous(),
            v.reshape(-1, *hidden).contiguous())


# ---------------------------------------------------------------- SwiGLU fc1 (formats.md 3.6)
# mcore computes silu(first half) * second half of each rank's fc1 output: [gate_r; up_r].
def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate [F, h], up [F, h] (one TP rank's rows) -> linear_fc1 [2F, h]."""
    return torch.cat([gate, up], dim=0).contiguous()


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_gate_up`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


# ---------------------------------------------------------------- vocab padding (formats.md 3.8, P8)
def pad_vocab(w: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows up to `padded_rows` (zero rows give logit 0 and never duplicate a real token)."""
    if padded_rows < w.shape[0]:
        raise ValueError(f"cannot pad {w.shape[0]} rows down to {padded_rows}")
    pad = torch.zeros(padded_rows - w.shape[0], *w.shape[1:], dtype=w.dtype)
    return torch.cat([w, pad], dim=0).contiguous()


def unpad_vocab(w: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of `pad_vocab`: keep the first `vocab_size` rows."""
    return w[:vocab_size].contiguous()


# ---------------------------------------------------------------- TP / MP splits
class Split(enum.Enum):
    """How a tensor is divided across tensor/model-parallel ranks."""

    REPLICATED = "replicated"  # identical copy on every rank (norms)
    COLUMN = "column"  # dim 0: output features (q/k/v, gate/up, vocab rows)
    ROW = "row"  # dim 1: input features (o_proj, down_proj; LLaMA-1/2 Meta embedding)


def shard(t: torch.Tensor, kind: Split, n: int) -> list[torch.Tensor]:
    """Split `t` into `n` contiguous, independently stored parts (cloned: never views of the whole)."""
    if kind is Split.REPLICATED:
        return [t.clone() for _ in range(n)]
    dim = 0 if kind is Split.COLUMN else 1
    if t.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split into {n} equal parts")
    return [p.clone(memory_format=torch.contiguous_format) for p in torch.chunk(t, n, dim=dim)]


def unshard(parts: list[torch.Tensor], kind: Split) -> torch.Tensor:
    """Inverse of `shard`. For REPLICATED, every part must be identical."""
    if kind is Split.REPLICATED:
        for i, p in enumerate(parts[1:], start=1):
            if not torch.equal(p, parts[0]):
                raise ValueError(f"replicated tensor differs between shard 0 and shard {i}")
        return parts[0]
    return torch.cat(parts, dim=0 if kind is Split.COLUMN else 1).contiguous()


def shard_rows(t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """Rank `rank`'s contiguous block of dim-0 rows (one COLUMN part without materialising the others)."""
    size = t.shape[0] // n
    return t[rank * size:(rank + 1) * size].clone(memory_format=torch.contiguous_format)


def shard_cols(t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """Rank `rank`'s contiguous block of dim-1 columns (one ROW part)."""
    size = t.shape[1] // n
    return t[:, rank * size:(rank + 1) * size].clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- pipeline stages (formats.md 3.9)
def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Global layer indices of each pipeline stage (even split; stage-local index = global - start)."""
    if num_layers % pp:
        raise ValueError(f"PP={pp} does not divide {num_layers} layers")
    per = num_layers // pp
    return [range(s * per, (s + 1) * per) for s in range(pp)]



INVERSE = {
    meta_to_hf_rotary: hf_to_meta_rotary,
    hf_to_meta_rotary: meta_to_hf_rotary,
    fuse_qkv: split_qkv,
    fuse_gate_up: split_gate_up,
    pad_vocab: unpad_vocab,
    shard: unshard,
}
