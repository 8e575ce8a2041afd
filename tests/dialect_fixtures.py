"""Megatron dialect checkpoints built from an HF model by test code, following formats.md §3-4 and its addendum
directly (plain torch reshapes), independent of megallama's rule tables, so the readers are checked against the
documented layouts rather than against themselves."""

from __future__ import annotations

import argparse
import io
import json
import pickle
import shutil
import types
from pathlib import Path

import torch
from helpers import hf_model

from megallama.spec import ModelSpec

DIALECTS = ("te", "legacy", "legacy_old", "fork", "fork_distopt", "alibaba")


# ---------------------------------------------------------------- documented fusions, per TP rank
def grouped_qkv(q, k, v, spec: ModelSpec, tp: int) -> list[torch.Tensor]:
    """formats.md 3.5: per query group [q heads of g; k_g; v_g]; rank r holds groups r*ng/t ..."""
    ng, dh, h = spec.num_kv_heads, spec.head_dim, spec.hidden_size
    full = torch.cat([q.reshape(ng, -1, h), k.reshape(ng, dh, h), v.reshape(ng, dh, h)], dim=1)  # [ng, (qpg+2)dh, h]
    return [c.reshape(-1, h).clone() for c in full.chunk(tp, dim=0)]


def per_head_qkv(q, k, v, spec: ModelSpec, tp: int) -> list[torch.Tensor]:
    """The fork (formats.md 3.0): [nh, 3, dh] per head, MHA."""
    nh, dh, h = spec.num_heads, spec.head_dim, spec.hidden_size
    full = torch.stack([q.reshape(nh, dh, h), k.reshape(nh, dh, h), v.reshape(nh, dh, h)], dim=1)  # [nh, 3, dh, h]
    return [c.reshape(-1, h).clone() for c in full.chunk(tp, dim=0)]


def block_qkv(q, k, v, spec: ModelSpec, tp: int) -> list[torch.Tensor]:
    """alibaba (formats.md 3.5): [q rows of rank r; k rows of rank r; v rows of rank r]."""
    return [torch.cat([q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]]) for r in range(tp)]


def meta_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta's interleaved pairs (the inverse of transformers' convert script permute)."""
    out, h = w.shape
    return w.reshape(heads, 2, out // heads // 2, h).transpose(1, 2).reshape(out, h).contiguous()


def gate_up(gate, up, tp: int) -> list[torch.Tensor]:
    return [torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]) for r in range(tp)]


def row(w, tp: int) -> list[torch.Tensor]:
    return [c.clone() for c in w.chunk(tp, dim=1)]


def vocab(w, tp: int, padded: int, fill: str) -> list[torch.Tensor]:
    extra = padded - w.shape[0]
    pad = w[-1:].expand(extra, -1) if fill == "last" else torch.zeros(extra, w.shape[1], dtype=w.dtype)
    return [c.clone() for c in torch.cat([w, pad]).chunk(tp)]


def padded_size(v: int, tp: int, d: int) -> int:
    return -(-v // (d * tp)) * d * tp


# ---------------------------------------------------------------- one rank's dict per dialect
def _stage(spec: ModelSpec, pp: int, s: int) -> range:
    per = spec.num_layers // pp
    return range(s * per, (s + 1) * per)


def te_rank(sd, spec, *, tp, pp, t, s, padded, extra) -> dict:
    """megatron-core TE spec, formats.md 4.1; `extra(n)` gives the n-th `_extra_state` value."""
    m: dict = {}
    n = iter(range(10_000))
    if s == 0:
        m["embedding.word_embeddings.weight"] = vocab(sd["model.embed_tokens.weight"], tp, padded, "zero")[t]
    for j, i in enumerate(_stage(spec, pp, s)):
        p, L = f"decoder.layers.{j}.", f"model.layers.{i}."
        m[p + "self_attention.core_attention._extra_state"] = extra(next(n))
        m[p + "self_attention.linear_proj.weight"] = row(sd[L + "self_attn.o_proj.weight"], tp)[t]
        m[p + "self_attention.linear_proj._extra_state"] = extra(next(n))
        m[p + "self_attention.linear_qkv.layer_norm_weight"] = sd[L + "input_layernorm.weight"].clone()
        m[p + "self_attention.linear_qkv.weight"] = grouped_qkv(
            sd[L + "self_attn.q_proj.weight"], sd[L + "self_attn.k_proj.weight"], sd[L + "self_attn.v_proj.weight"],
            spec, tp)[t]
        m[p + "self_attention.linear_qkv._extra_state"] = extra(next(n))
        m[p + "mlp.linear_fc1.layer_norm_weight"] = sd[L + "post_attention_layernorm.weight"].clone()
        m[p + "mlp.linear_fc1.weight"] = gate_up(sd[L + "mlp.gate_proj.weight"], sd[L + "mlp.up_proj.weight"], tp)[t]
        m[p + "mlp.linear_fc1._extra_state"] = extra(next(n))
        m[p + "mlp.linear_fc2.weight"] = row(sd[L + "mlp.down_proj.weight"], tp)[t]
        m[p + "mlp.linear_fc2._extra_state"] = extra(next(n))
    if s == pp - 1:
        m["decoder.final_layernorm.weight"] = sd["model.norm.weight"].clone()
        m["decoder.final_layernorm._extra_state"] = extra(next(n))
        m["output_layer.weight"] = vocab(sd["lm_head.weight"], tp, padded, "zero")[t]
        m["output_layer._extra_state"] = None
    return m


def legacy_rank(sd, spec, *, tp, pp, t, s, padded, names: dict, qkv, fill: str, interleaved=False,
                head: str = "output_layer") -> dict:
    """The legacy GPTModel tree (formats.md 3.3-3.4): model['language_model'][...], encoder keys flat."""
    enc, lm = {}, {}
    if s == 0:
        lm["embedding"] = {"word_embeddings": {"weight": vocab(sd["model.embed_tokens.weight"], tp, padded, fill)[t]}}
    for j, i in enumerate(_stage(spec, pp, s)):
        p, L, att = f"layers.{j}.", f"model.layers.{i}.", names["attention"]
        q, k = sd[L + "self_attn.q_proj.weight"], sd[L + "self_attn.k_proj.weight"]
        if interleaved:
            q, k = meta_rotary(q, spec.num_heads), meta_rotary(k, spec.num_kv_heads)
        enc[p + names["input"] + ".weight"] = sd[L + "input_layernorm.weight"].clone()
        enc[p + att + ".query_key_value.weight"] = qkv(q, k, sd[L + "self_attn.v_proj.weight"], spec, tp)[t]
        enc[p + att + ".query_key_value._extra_state"] = None
        enc[p + att + ".dense.weight"] = row(sd[L + "self_attn.o_proj.weight"], tp)[t]
        enc[p + names["post"] + ".weight"] = sd[L + "post_attention_layernorm.weight"].clone()
        enc[p + "mlp.dense_h_to_4h.weight"] = gate_up(sd[L + "mlp.gate_proj.weight"], sd[L + "mlp.up_proj.weight"],
                                                      tp)[t]
        enc[p + "mlp.dense_4h_to_h.weight"] = row(sd[L + "mlp.down_proj.weight"], tp)[t]
    model = {"language_model": lm}
    if s == pp - 1:
        enc[names["final"] + ".weight"] = sd["model.norm.weight"].clone()
        if head == "output_layer":
            lm["output_layer"] = {"weight": vocab(sd["lm_head.weight"], tp, padded, fill)[t]}
        else:  # alibaba: a plain Linear with the full unpadded vocab on every rank
            model["lm_head"] = {"weight": sd["lm_head.weight"].clone()}
    lm[names["encoder"]] = enc
    return model


NVIDIA = {"encoder": "encoder", "attention": "self_attention", "input": "input_norm", "post": "post_attention_norm",
          "final": "final_norm"}
NVIDIA_OLD = {"encoder": "transformer", "attention": "attention", "input": "input_layernorm",
              "post": "post_attention_layernorm", "final": "final_layernorm"}
FORK = {"encoder": "encoder", "attention": "self_attention", "input": "input_rmsnorm",
        "post": "post_attention_rmsnorm", "final": "final_rmsnorm"}
ALIBABA = {"encoder": "encoder", "attention": "self_attention", "input": "input_layernorm",
           "post": "post_attention_layernorm", "final": "final_layernorm"}


def _extra_state_variants(n: int):
    """Every encoding of "no FP8 state" TE has saved (formats.md 4.1), in turn."""
    return [None, io.BytesIO(pickle.dumps(None)), torch.frombuffer(bytearray(pickle.dumps(None)), dtype=torch.uint8),
            torch.empty(0, dtype=torch.uint8)][n % 4]


def _nvidia_args(spec: ModelSpec, tp: int, pp: int, padded: int, **extra) -> argparse.Namespace:
    """Megatron-LM's own args as a training run saves them: no true vocab, only the padded one."""
    return argparse.Namespace(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads, num_query_groups=spec.num_kv_heads,
        group_query_attention=spec.num_kv_heads < spec.num_heads, max_position_embeddings=spec.max_position_embeddings,
        seq_length=2048, position_embedding_type="rope", rotary_base=int(spec.rope_theta), normalization="RMSNorm",
        norm_epsilon=spec.norm_eps, swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, padded_vocab_size=padded,
        make_vocab_size_divisible_by=128, params_dtype=torch.float32, fp16=False, bf16=False, **extra)


def build(dialect: str, hf_dir: Path, out: Path, *, tp: int, pp: int) -> Path:
    """Write `dialect`'s checkpoint of the HF model at `hf_dir` into `out` (a new folder)."""
    spec, sd = hf_model(hf_dir)
    v = spec.vocab_size
    out.mkdir(parents=True)
    shutil.copy(hf_dir / "tokenizer.model", out / "tokenizer.model")
    iteration, model_name, top = "release", "model_optim_rng.pt", {"checkpoint_version": 3.0, "iteration": 0}
    if dialect == "te":
        padded = padded_size(v, tp, 128)
        top["args"] = _nvidia_args(spec, tp, pp, padded, transformer_impl="transformer_engine")
        make = lambda t, s: te_rank(sd, spec, tp=tp, pp=pp, t=t, s=s, padded=padded,  # noqa: E731
                                    extra=_extra_state_variants)
    elif dialect in ("legacy", "legacy_old"):
        padded, iteration = padded_size(v, tp, 128), "1"
        top.update(args=_nvidia_args(spec, tp, pp, padded), iteration=1, num_floating_point_operations_so_far=0)
        names = NVIDIA if dialect == "legacy" else NVIDIA_OLD
        make = lambda t, s: legacy_rank(sd, spec, tp=tp, pp=pp, t=t, s=s, padded=padded, names=names,  # noqa: E731
                                        qkv=grouped_qkv, fill="last")
    elif dialect in ("fork", "fork_distopt"):
        padded = padded_size(v, tp, 128)
        top.update(args=None, rng_state=None)
        (out / "params.json").write_text(json.dumps({"dim": spec.hidden_size, "n_layers": spec.num_layers,
                                                     "n_heads": spec.num_heads, "norm_eps": spec.norm_eps,
                                                     "multiple_of": 16, "vocab_size": -1}))
        if dialect == "fork_distopt":
            model_name = "model_rng.pt"
        make = lambda t, s: legacy_rank(sd, spec, tp=tp, pp=pp, t=t, s=s, padded=padded, names=FORK,  # noqa: E731
                                        qkv=per_head_qkv, fill="zero", interleaved=True)
    elif dialect == "alibaba":
        padded = padded_size(v, tp, 1)
        del top["iteration"]
        top.update(args=types.SimpleNamespace(num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                                              num_attention_heads=spec.num_heads, orig_vocab_size=v,
                                              padded_vocab_size=padded, tensor_model_parallel_size=tp),
                   optimizer={"dummy": True})
        shutil.copy(hf_dir / "config.json", out / "config.json")
        make = lambda t, s: legacy_rank(sd, spec, tp=tp, pp=pp, t=t, s=s, padded=padded, names=ALIBABA,  # noqa: E731
                                        qkv=block_qkv, fill="last", head="lm_head")
    else:
        raise ValueError(dialect)
    it_dir = out / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    for s in range(pp):
        for t in range(tp):
            rank_dir = it_dir / (f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{s:03d}")
            rank_dir.mkdir(parents=True)
            torch.save({**top, "model": make(t, s)}, rank_dir / model_name)
            if dialect == "fork_distopt":  # the optimizer shard of DP rank 0, in its own folder
                (it_dir / f"{rank_dir.name}_000").mkdir()
                torch.save({"optimizer": {}}, it_dir / f"{rank_dir.name}_000" / "optim.pt")
    (out / "latest_checkpointed_iteration.txt").write_text(iteration)
    return out
