"""Core attention for megatron-core's layer spec, built on torch's scaled_dot_product_attention (SDPA).

megatron-core without Transformer Engine has one core attention, the local `DotProductAttention`: an unfused
baddbmm + softmax + bmm with K/V repeated per query head, and no packed sequences. `SDPAttention` takes its
place in the layer spec (same constructor, same forward arguments, same [s, b, h] output) and computes the same
maths with one fused SDPA call per sequence:

- causal, the softmax scale 1/sqrt(head_dim) (or the config's `softmax_scale`), no dropout;
- grouped-query attention without repeating K/V (`enable_gqa`: query head i reads KV group i // (heads/groups),
  the same grouping as megatron-core's `repeat_interleave`);
- packed sequences (`PackedSeqParams`, `qkv_format="thd"`): attention stays inside each `cu_seqlens` segment;
- sliding-window attention (`config.window_size`, per layer through `window_attn_skip_freq`, as megatron-core's
  `is_layer_window_attention`): Mistral's and Qwen2's windows, exact beyond the window (`window_mask`);
- no parameters or buffers, so checkpoints keep exactly the local spec's keys.

Llama 4 (per layer, through the layer spec's params; transformers' Llama4TextAttention is the reference):

- `chunk_size` (rope layers): chunked local attention, query i sees key j iff j <= i and i // C == j // C
  (`create_chunked_causal_mask`); plain causal attention for sequences of at most C tokens;
- `temperature` = (floor_scale, attn_scale) (NoPE layers): q at position p is multiplied by
  1 + attn_scale * log1p(floor((p + 1) / floor_scale)) before the scores; 1 for p < floor_scale - 1.

Positions count from the start of each sequence (of each packed segment), as in a transformers forward without a
cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megallama.errors import InputError


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's local `DotProductAttention` (see the module docstring)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, chunk_size: int | None = None,
                 temperature: tuple[int, float] | None = None):
        super().__init__(config=config)
        self.chunk_size, self.temperature = chunk_size, temperature
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        unsupported = {"attention dropout": dropout != 0.0, "context parallelism": config.context_parallel_size != 1,
                       f"softmax_type {config.softmax_type!r}": config.softmax_type != "vanilla",
                       "query-key layer scaling": config.apply_query_key_layer_scaling}
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise InputError(f"train.attention sdpa does not support {', '.join(refused)}; use attention local or te")
        self.attn_mask_type = attn_mask_type
        from megatron.core.transformer.utils import is_layer_window_attention

        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window = tuple(config.window_size) if windowed else None  # (left, right) keys around the query
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        """query [s, b, np, hn], key/value [s, b, ng, hn] -> [s, b, np * hn]; packed: [t, np, hn] -> [t, np * hn]."""
        if attention_bias is not None:
            raise InputError("train.attention sdpa does not support an attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        s, b = query.shape[:2]
        query = self._tuned(query)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, hn]
        # megatron-core's mask is True where attention is *blocked*; SDPA's boolean mask is True where allowed.
        # Like the local path, a given mask replaces the causal one.
        mask = None if attention_mask is None else ~attention_mask
        if self.window is not None:
            window = window_mask(q.shape[2], k.shape[2], self.window, device=q.device)  # [sq, sk]
            mask = window if mask is None else mask & window
        mask = self._chunked(mask, s, query.device)
        out = self._sdpa(q, k, v, mask=mask)  # [b, np, s, hn]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, np * hn]

    def _packed(self, query, key, value, params) -> torch.Tensor:
        """thd layout: one causal SDPA per `cu_seqlens` segment, so no token sees another sample."""
        if params.qkv_format != "thd":
            raise InputError(f"train.attention sdpa packs sequences in the thd format, not {params.qkv_format!r}")
        if params.cu_seqlens_q_padded is not None or params.cu_seqlens_kv_padded is not None:
            raise InputError("train.attention sdpa does not support padded cu_seqlens (cu_seqlens_*_padded)")
        # Segment lengths on the host: a split per sample (megatron-core's thd rotary does the same).
        q_lengths = (params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).tolist()
        kv_lengths = (params.cu_seqlens_kv[1:] - params.cu_seqlens_kv[:-1]).tolist()
        outputs = []
        for q, k, v in zip(query.split(q_lengths), key.split(kv_lengths), value.split(kv_lengths), strict=True):
            q = self._tuned(q.unsqueeze(1)).squeeze(1)  # positions restart in each segment
            mask = self._chunked(None, q.shape[0], q.device)
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, n, len, hn]
            if self.window is not None:
                window = window_mask(q.shape[2], k.shape[2], self.window, device=q.device)
                mask = window if mask is None else mask & window
            outputs.append(self._sdpa(q, k, v, mask=mask)[0].transpose(0, 1))  # [len, np, hn]
        return torch.cat(outputs).flatten(1)  # [t, np * hn]

    def _sdpa(self, q, k, v, *, mask):
        """[b, np, sq, hn] x [b, ng, sk, hn] -> [b, np, sq, hn]; causal unless a mask is given."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=mask is None,
                                              scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])

    def _tuned(self, query: torch.Tensor) -> torch.Tensor:
        """Llama 4 attention temperature: [s, b, np, hn] scaled per position (NoPE layers); else unchanged."""
        if self.temperature is None:
            return query
        floor_scale, attn_scale = self.temperature
        pos = torch.arange(query.shape[0], device=query.device, dtype=torch.float32)
        scale = torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0  # [s]
        return (query * scale.view(-1, 1, 1, 1)).to(query.dtype)

    def _chunked(self, allowed: torch.Tensor | None, s: int, device) -> torch.Tensor | None:
        """Llama 4 chunked local attention (rope layers): `allowed` ([.., s, s], True = may attend) restricted to
        keys of the query's own chunk; None (plain causal) when the sequence fits in one chunk."""
        if self.chunk_size is None or (s <= self.chunk_size and allowed is None):
            return allowed
        i = torch.arange(s, device=device)
        chunk = (i[:, None] >= i[None, :]) & (i[:, None] // self.chunk_size == i[None, :] // self.chunk_size)
        return chunk if allowed is None else allowed & chunk


def window_mask(sq: int, sk: int, window: tuple[int, int], *, device=None) -> torch.Tensor:
    """[sq, sk] bool, True where query i (the last sq of sk positions) may see key j: i - left <= j <= i + right.

    megatron-core's `get_sliding_window_causal_mask` with SDPA's polarity (True = attend); (W - 1, 0) is HF's
    sliding_window W (causal, and j > i - W).
    """
    left, right = window
    i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)  # [sq, 1] absolute query positions
    j = torch.arange(sk, device=device).unsqueeze(0)  # [1, sk]
    allowed = (j <= i + right) if right >= 0 else torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:  # -1: unbounded (megatron-core's "infinite window")
        allowed &= j >= i - left
    return allowed
