"""Tiny LLaMA checkpoints and tokenizers built locally: for tests, `make demo`, `make bench` and `doctor`.

Nothing is downloaded. Each preset mirrors one LLaMA generation's architecture at toy size.
"""

from __future__ import annotations

import json
from pathlib import Path

from megallama.spec import ModelSpec

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
_BASE = dict(hidden_size=64, num_layers=4, num_heads=4, ffn_hidden_size=176, vocab_size=320)
PRESETS: dict[str, ModelSpec] = {
    # LLaMA-1: MHA, eps 1e-6, theta 10000, untied.
    "llama1": ModelSpec(**_BASE, num_kv_heads=4, norm_eps=1e-6, max_position_embeddings=2048),
    # Llama-2 70B style: GQA.
    "llama2": ModelSpec(**_BASE, num_kv_heads=2, norm_eps=1e-5, max_position_embeddings=4096),
    # Llama 3.1: GQA, theta 500000, llama3 rope scaling.
    "llama3": ModelSpec(**_BASE, num_kv_heads=2, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                        max_position_embeddings=131072),
    # Llama 3.2 1B/3B style: tied embeddings, rope scaling factor 32.
    "tied": ModelSpec(**_BASE, num_kv_heads=2, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True,
                      rope_scaling={**LLAMA3_SCALING, "factor": 32.0}, max_position_embeddings=131072),
}
# The LLaMA-shaped families (docs/models.md) at toy size: every extra on, windows shorter than a test sequence.
FAMILY_PRESETS: dict[str, ModelSpec] = {
    # Mistral v0.1: sliding window on every layer.
    "mistral": ModelSpec(**_BASE, num_kv_heads=2, norm_eps=1e-5, sliding_window=7, max_position_embeddings=4096,
                         architecture="MistralForCausalLM"),
    # Qwen2 / 2.5 small: q/k/v biases, tied embeddings, theta 1e6, a window on the upper layers only.
    "qwen2": ModelSpec(**_BASE, num_kv_heads=2, norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True,
                       qkv_bias=True, sliding_window=5, sliding_window_layers=(2, 3), max_position_embeddings=4096,
                       architecture="Qwen2ForCausalLM"),
    # Qwen3 dense: per-head q/k RMSNorm, head_dim 24 != 64 / 4.
    "qwen3": ModelSpec(**_BASE, num_kv_heads=2, norm_eps=1e-6, rope_theta=1000000.0, qk_norm="rms",
                       explicit_head_dim=24, max_position_embeddings=4096, architecture="Qwen3ForCausalLM"),
    # LLaMA config seen in the wild: attention_bias + mlp_bias, explicit head_dim 8 != 64 / 4.
    "llama-bias": ModelSpec(**_BASE, num_kv_heads=2, norm_eps=1e-5, qkv_bias=True, o_bias=True, mlp_bias=True,
                            explicit_head_dim=8, max_position_embeddings=4096),
}


def corpus_lines(limit: int = 4000) -> list[str]:
    """Deterministic English-ish text from the Python standard library's docstrings (always installed)."""
    import argparse
    import collections
    import email
    import functools
    import json as json_mod
    import logging
    import pathlib
    import textwrap

    lines: list[str] = []
    for mod in (argparse, collections, functools, logging, email, json_mod, pathlib, textwrap):
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                lines += [ln.strip() for ln in doc.splitlines() if len(ln.strip()) > 20]
    seen, unique = set(), []
    for ln in lines:
        if ln not in seen:
            seen.add(ln)
            unique.append(ln)
    return unique[:limit]


def train_tokenizer(out_dir: Path, vocab_size: int = 320, extra_lines: list[str] | None = None) -> Path:
    """Train a SentencePiece BPE `tokenizer.model` (LLaMA-style: unk 0, bos 1, eos 2) on local text."""
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = corpus_lines() + list(extra_lines or [])
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        hard_vocab_limit=True, minloglevel=2, add_dummy_prefix=True, remove_extra_whitespaces=False,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def make_hf_checkpoint(out_dir: Path, preset: str | ModelSpec = "llama2", *, dtype: str = "float32", seed: int = 0,
                       tokenizer: bool = True, shard_bytes: str | None = None,
                       tokenizer_lines: list[str] | None = None) -> Path:
    """Write a random-weight model of the spec's family (LlamaForCausalLM, Qwen2ForCausalLM, ...) with
    `save_pretrained` (safetensors) plus a tokenizer.model.

    Weights use a larger init than HF's default, random norm scales and biases, so a misplaced tensor changes
    logits.
    """
    import torch
    import transformers

    spec = ({**PRESETS, **FAMILY_PRESETS}[preset] if isinstance(preset, str) else preset)
    spec = spec.replace(dtype=dtype)
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    cfg = spec.to_hf_config()
    cfg.pop("architectures"), cfg.pop("model_type"), cfg.pop("dtype"), cfg.pop("torch_dtype")
    config = transformers.AutoConfig.for_model(spec.family, **cfg)
    model = getattr(transformers, spec.architecture)(config)  # the family's own class (LlamaForCausalLM, ...)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # non-zero (Qwen2 initialises them to 0, which hides a dropped bias)
                p.copy_(0.5 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    if tokenizer:
        train_tokenizer(out_dir, vocab_size=spec.vocab_size, extra_lines=tokenizer_lines)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
             "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}, indent=2))
    return out_dir


# Llama 4 at toy size: experts on layers 1 and 3 (dense 0 and 2, as Maverick interleaves), NoPE on layer 2,
# explicit head_dim (4 x 24 != 64), Scout's rope scaling, and a chunk size / floor scale shorter than a test
# sequence so chunked attention and temperature tuning really run.
LLAMA4_TEXT = dict(
    vocab_size=320, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5, num_local_experts=4,
    num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=True, no_rope_layers=[1, 1, 0, 1],
    attention_chunk_size=16, attn_temperature_tuning=True, floor_scale=8, attn_scale=0.1,
    max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
)
TINY_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                   projector_output_dim=64, pixel_shuffle_ratio=0.5)


def make_llama4_checkpoint(out_dir: Path, *, multimodal: bool = False, seed: int = 0, tokenizer: bool = True,
                           dtype: str = "float32", **text_overrides) -> Path:
    """A random-weight Llama4ForCausalLM (or, `multimodal`, Llama4ForConditionalGeneration with a tiny vision
    tower) saved with `save_pretrained`, plus a SentencePiece tokenizer.model."""
    import torch
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    text = Llama4TextConfig(**{**LLAMA4_TEXT, **text_overrides})
    if multimodal:
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=text.to_dict(), vision_config=TINY_VISION))
    else:
        model = Llama4ForCausalLM(text)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "experts.gate_up_proj" in name or "experts.down_proj" in name:
                p.copy_(torch.randn_like(p) / p.shape[-2] ** 0.5)  # input-major [E, in, out]
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer:
        train_tokenizer(out_dir, vocab_size=text.vocab_size)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
             "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}, indent=2))
    return out_dir
