"""A Meta-style reference LLaMA, written as meta-llama/llama `llama/model.py` is: the ground truth for verify.

RMSNorm computed in fp32, interleaved-pair rotary as complex multiplication (with Llama 3.1 `apply_scaling` from
the spec's rope_scaling), GQA through `repeat_kv`, SwiGLU, causal mask. Parameters carry Meta's names
(`layers.{i}.attention.wq.weight`, ...) and Meta's rotary row order. Example:

    model = MetaReference.from_meta_dir(Path("llama-2-7b"))
    capture = {}
    logits = model(torch.tensor([[1, 450, 4996]]), capture=capture)   # capture["layers.0.attention"], ...
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megallama.spec import ModelSpec, normalize_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # Meta normalises in fp32, casts back, then scales
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def apply_scaling(freqs: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling (formats.md 2.6), with the spec's factors rather than Meta's hard-coded 8."""
    factor, low, high = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_len = rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, freqs / factor, freqs)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, (1 - smooth) * freqs / factor + smooth * freqs, scaled)


def rope_frequencies(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies f_j, shape [head_dim / 2]: compare these directly, short prompts hide a wrong factor."""
    dim = spec.head_dim
    freqs = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    return apply_scaling(freqs, spec.rope_scaling) if spec.rope_scaling else freqs


def precompute_freqs_cis(spec: ModelSpec, end: int, device: torch.device | None = None) -> torch.Tensor:
    """Complex rotations e^{i t f_j}, shape [end, head_dim / 2]."""
    angles = torch.outer(torch.arange(end, dtype=torch.float32), rope_frequencies(spec)).to(device)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotate adjacent pairs (2i, 2i+1) of each head: Meta's interleaved convention (formats.md 2.2)."""
    # [b, s, n, dh] -> [b, s, n, dh/2] complex; freqs [s, dh/2] broadcast over batch and heads
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, s, ng, dh] -> [b, s, ng * n_rep, dh]: KV group g serves query heads g*n_rep ... (g+1)*n_rep - 1."""
    b, s, ng, dh = x.shape
    return x if n_rep == 1 else x[:, :, :, None, :].expand(b, s, ng, n_rep, dh).reshape(b, s, ng * n_rep, dh)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.wq = nn.Linear(spec.hidden_size, spec.num_heads * spec.head_dim, bias=False)
        self.wk = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=False)
        self.wv = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=False)
        self.wo = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        n_rep = self.n_heads // self.n_kv_heads
        # [b, s, n, dh] -> [b, n, s, dh]
        q, k, v = (t.transpose(1, 2) for t in (q, repeat_kv(k, n_rep), repeat_kv(v, n_rep)))
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + mask  # [b, n, s, s]
        scores = F.softmax(scores.float(), dim=-1).type_as(q)
        out = (scores @ v).transpose(1, 2).reshape(b, s, -1)  # [b, s, n*dh]
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.w1 = nn.Linear(spec.hidden_size, spec.ffn_hidden_size, bias=False)  # gate
        self.w2 = nn.Linear(spec.ffn_hidden_size, spec.hidden_size, bias=False)  # down
        self.w3 = nn.Linear(spec.hidden_size, spec.ffn_hidden_size, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attention = Attention(spec)
        self.feed_forward = FeedForward(spec)
        self.attention_norm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.ffn_norm = RMSNorm(spec.hidden_size, spec.norm_eps)


class MetaReference(nn.Module):
    """Meta's Transformer without KV cache; `forward` can record every intermediate verify compares."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.output = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    @classmethod
    def from_state_dict(cls, spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> MetaReference:
        """Build from Meta-named, Meta-ordered tensors (strict: every tensor present, nothing extra)."""
        with torch.device("meta"):  # no random init: the tensors are assigned as they are
            model = cls(spec)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    @classmethod
    def from_reader(cls, reader, *, dtype: str | None = None) -> MetaReference:
        """From any canonical reader (HF, Meta, Megatron): tensors are turned back into Meta names and order."""
        from megallama.formats.meta import iter_meta_tensors

        dtype = normalize_dtype(dtype)
        state = {rule.meta: t for rule, t in iter_meta_tensors(reader, dtype=dtype)}
        return cls.from_state_dict(reader.spec.replace(dtype=dtype or reader.spec.dtype), state)

    @classmethod
    def from_meta_dir(cls, path: Path, *, dtype: str | None = None) -> MetaReference:
        from megallama.formats.meta import open_meta

        with open_meta(Path(path)) as reader:
            return cls.from_reader(reader, dtype=dtype)

    def forward(self, tokens: torch.Tensor, capture: dict | None = None) -> torch.Tensor:
        """tokens [b, s] -> fp32 logits [b, s, V]. `capture`, if given, receives the intermediates by name."""
        seq = tokens.shape[1]
        record = capture.__setitem__ if capture is not None else (lambda name, value: None)
        h = self.tok_embeddings(tokens)
        record("embedding", h)
        freqs_cis = precompute_freqs_cis(self.spec, seq, h.device)
        mask = torch.triu(torch.full((seq, seq), float("-inf"), device=h.device), diagonal=1).to(h.dtype)
        for i, layer in enumerate(self.layers):
            attn = layer.attention(layer.attention_norm(h), freqs_cis, mask)
            record(f"layers.{i}.attention", attn)
            h = h + attn
            mlp = layer.feed_forward(layer.ffn_norm(h))
            record(f"layers.{i}.mlp", mlp)
            h = h + mlp
            record(f"layers.{i}", h)
        h = self.norm(h)
        record("norm", h)
        logits = self.output(h).float()
        record("logits", logits)
        return logits
