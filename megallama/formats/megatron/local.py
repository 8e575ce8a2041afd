"""The megatron-core local-spec layout as data: the key table, its split rules, and the args Megatron checks.

One table serves both directions (formats.md 4.1, 5.4). A rule names the mcore key (`{j}` = stage-local layer),
the canonical HF names it is made of (`{i}` = global layer) and a `Kind`; each kind is a pair of pure functions,
`to_rank` (canonical -> one TP rank's tensor) and `from_ranks` (all TP ranks -> canonical), exact inverses.

    linear_qkv, rank r of t (formats.md 3.5), groups g = r*ng/t ... (r+1)*ng/t - 1:
        [ q_{g,0} .. q_{g,qpg-1} | k_g | v_g ]  for each of the rank's groups   -> [(nh+2ng)/t * dh, h]
    linear_fc1, rank r (formats.md 3.6):
        [ gate rows r*F/t .. | up rows r*F/t .. ]                               -> [2F/t, h]
    embedding / output_layer (formats.md 3.8): rows r*Vp/t .. of the zero-padded [Vp, h]
"""

from __future__ import annotations

import argparse
import enum
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megallama import transforms as T
from megallama.errors import InputError
from megallama.formats.base import TORCH_DTYPES
from megallama.names import EMBED, FINAL_NORM, LM_HEAD
from megallama.spec import LLAMA3_ROPE_DEFAULTS, ModelSpec


class Kind(enum.Enum):
    """How one mcore tensor is built from canonical tensors and divided across TP ranks."""

    REPLICATED = "replicated"  # norms: the same copy on every rank
    ROW = "row"  # linear_proj, linear_fc2: split the input features (dim 1)
    VOCAB = "vocab"  # embedding, output_layer: pad rows with zeros to Vp, then split dim 0
    QKV = "qkv"  # q, k, v fused by query group, whole groups per rank
    GATE_UP = "gate_up"  # [gate_r; up_r] per rank


@dataclass(frozen=True)
class Rule:
    """One mcore state-dict key. An empty `sources` means the module exists but has no weight of its own
    (the output layer of a tied model on a single stage), so only its `_extra_state` is written."""

    target: str  # mcore local-spec key; "{j}" = stage-local layer index
    sources: tuple[str, ...]  # canonical (HF) names; "{i}" = global layer index
    kind: Kind
    extra_state: bool = False  # the module's state_dict() also has `<module>._extra_state` (None, local spec)

    def bind(self, i: int | None = None, j: int | None = None) -> Rule:
        return Rule(self.target.format(j=j), tuple(s.format(i=i) for s in self.sources), self.kind, self.extra_state)

    @property
    def extra_state_key(self) -> str:
        return self.target.rsplit(".", 1)[0] + "._extra_state"


# Order = the order of megatron-core 0.16's `GPTModel.state_dict()` (linear_proj is registered before linear_qkv).
LAYER_RULES = (
    Rule("decoder.layers.{j}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), Kind.REPLICATED),
    Rule("decoder.layers.{j}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
         Kind.ROW, extra_state=True),
    Rule("decoder.layers.{j}.self_attention.linear_qkv.weight",
         ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"), Kind.QKV, extra_state=True),
    Rule("decoder.layers.{j}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         Kind.REPLICATED),
    Rule("decoder.layers.{j}.mlp.linear_fc1.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), Kind.GATE_UP,
         extra_state=True),
    Rule("decoder.layers.{j}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), Kind.ROW,
         extra_state=True),
)
EMBEDDING_RULE = Rule("embedding.word_embeddings.weight", (EMBED,), Kind.VOCAB)
FINAL_NORM_RULE = Rule("decoder.final_layernorm.weight", (FINAL_NORM,), Kind.REPLICATED)
OUTPUT_RULE = Rule("output_layer.weight", (LM_HEAD,), Kind.VOCAB, extra_state=True)


def stage_rules(spec: ModelSpec, *, pp_rank: int, pp: int) -> list[tuple[Rule, int | None]]:
    """The bound rules of one pipeline stage, in state-dict order, each with its global layer (None outside layers).

    Tied embeddings (formats.md P9): on a single stage the output layer reuses the embedding and has no weight
    key; with PP > 1 the last stage holds its own copy, which must equal the embedding.
    """
    layers = T.stage_layers(spec.num_layers, pp)[pp_rank]
    rules: list[tuple[Rule, int | None]] = []
    if pp_rank == 0:
        rules.append((EMBEDDING_RULE, None))
    for j, i in enumerate(layers):
        rules += [(r.bind(i=i, j=j), i) for r in LAYER_RULES]
    if pp_rank == pp - 1:
        rules.append((FINAL_NORM_RULE, None))
        if not spec.tie_embeddings:
            rules.append((OUTPUT_RULE, None))
        elif pp > 1:
            rules.append((Rule(OUTPUT_RULE.target, (EMBED,), Kind.VOCAB, extra_state=True), None))
        else:
            rules.append((Rule(OUTPUT_RULE.target, (), Kind.VOCAB, extra_state=True), None))
    return rules


# ---------------------------------------------------------------- canonical -> one TP rank
def to_rank(kind: Kind, tensors: Sequence[torch.Tensor], spec: ModelSpec, *, tp_rank: int, tp: int,
            padded_vocab_size: int) -> torch.Tensor:
    """Rank `tp_rank`'s piece of the mcore tensor made from `tensors` (always a fresh, compact tensor)."""
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
    if kind is Kind.GATE_UP:
        return (2 * spec.ffn_hidden_size // tp, spec.hidden_size)
    if kind is Kind.QKV:
        return ((spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim // tp, spec.hidden_size)
    raise AssertionError(kind)


# ---------------------------------------------------------------- args and launch flags
def megatron_args(spec: ModelSpec, *, tp: int, pp: int, padded_vocab_size: int, divisible_by: int,
                  iteration: int = 0, tokenizer_type: str | None = None, tokenizer_model: str | None = None,
                  seq_length: int | None = None, **overrides) -> argparse.Namespace:
    """The `args` Megatron checks and `--use-checkpoint-args` restores (formats.md 4.3), plain types only so
    that `torch.load(weights_only=True)` reads them."""
    seq = seq_length or min(spec.max_position_embeddings, 4096)
    args = argparse.Namespace(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads, num_query_groups=spec.num_kv_heads,
        group_query_attention=spec.num_kv_heads < spec.num_heads, kv_channels=spec.head_dim,
        seq_length=seq, max_position_embeddings=spec.max_position_embeddings,
        position_embedding_type="rope", add_position_embedding=True, use_rotary_position_embeddings=True,
        rotary_base=int(spec.rope_theta), rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=spec.rope_scaling is not None,
        rope_scaling_factor=float(spec.rope_scaling["factor"]) if spec.rope_scaling else 8.0,
        normalization="RMSNorm", layernorm_epsilon=spec.norm_eps, norm_epsilon=spec.norm_eps, swiglu=True,
        add_bias_linear=False, add_qkv_bias=False, untie_embeddings_and_output_weights=not spec.tie_embeddings,
        apply_layernorm_1p=False, apply_query_key_layer_scaling=False, attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        make_vocab_size_divisible_by=divisible_by, padded_vocab_size=padded_vocab_size, vocab_size=spec.vocab_size,
        tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, params_dtype=TORCH_DTYPES[spec.dtype],
        fp16=spec.dtype == "float16", bf16=spec.dtype == "bfloat16", ckpt_format="torch", transformer_impl="local",
        consumed_train_samples=0, consumed_valid_samples=0, iteration=iteration,
    )
    vars(args).update(overrides)
    return args


def launch_flags(args: argparse.Namespace, *, load_dir: Path | None = None) -> list[str]:
    """Megatron-LM flags matching a checkpoint's args (formats.md 4.4); one flag (with its value) per item."""
    a = args
    flags = [f"--ckpt-format {getattr(a, 'ckpt_format', 'torch')}", "--transformer-impl local"]
    if load_dir is not None:
        flags += [f"--load {shlex.quote(str(load_dir))}", "--finetune", "--exit-on-missing-checkpoint"]
    flags += [f"--num-layers {a.num_layers}", f"--hidden-size {a.hidden_size}",
              f"--ffn-hidden-size {a.ffn_hidden_size}", f"--num-attention-heads {a.num_attention_heads}"]
    if a.group_query_attention:
        flags += ["--group-query-attention", f"--num-query-groups {a.num_query_groups}"]
    flags += [f"--seq-length {a.seq_length}", f"--max-position-embeddings {a.max_position_embeddings}",
              "--normalization RMSNorm", f"--norm-epsilon {a.norm_epsilon}", "--swiglu", "--disable-bias-linear",
              "--position-embedding-type rope", f"--rotary-base {a.rotary_base}", "--rotary-percent 1.0"]
    if a.use_rope_scaling:
        flags += ["--use-rope-scaling", f"--rope-scaling-factor {a.rope_scaling_factor:g}"]
    if a.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    flags += [f"--make-vocab-size-divisible-by {a.make_vocab_size_divisible_by}",
              f"--tensor-model-parallel-size {a.tensor_model_parallel_size}",
              f"--pipeline-model-parallel-size {a.pipeline_model_parallel_size}"]
    if a.tokenizer_type:
        flags.append(f"--tokenizer-type {a.tokenizer_type}")
        if a.tokenizer_type == "TikTokenizer":
            flags.append("--tiktoken-pattern v2")
    if a.tokenizer_model:
        flags.append(f"--tokenizer-model {shlex.quote(str(a.tokenizer_model))}")
    flags += ["--attention-dropout 0.0", "--hidden-dropout 0.0"]
    if a.bf16:
        flags.append("--bf16")
    elif a.fp16:
        flags.append("--fp16")
    return flags


def spec_from_args(args, *, padded_vocab_size: int, dtype: str, notes: list[str]) -> ModelSpec:
    """A ModelSpec from the `args` Namespace Megatron saves, for checkpoints without megallama.json."""
    if args is None:
        raise InputError("checkpoint has neither megallama.json nor an args namespace: cannot tell its architecture")
    a = vars(args)
    wrong = {k: a.get(k) for k, want in (("normalization", "RMSNorm"), ("swiglu", True), ("add_bias_linear", False),
                                         ("position_embedding_type", "rope")) if a.get(k, want) != want}
    if wrong:
        raise InputError(f"checkpoint args {wrong} do not describe a LLaMA model (RMSNorm, SwiGLU, no bias, rope)")
    vocab = a.get("vocab_size")
    if not vocab:
        vocab = padded_vocab_size
        notes.append(f"true vocab unknown (no megallama.json, no args.vocab_size): keeping all {vocab} rows")
    heads = a["num_attention_heads"]
    scaling = None
    if a.get("use_rope_scaling"):
        scaling = {"rope_type": "llama3", **LLAMA3_ROPE_DEFAULTS, "factor": float(a.get("rope_scaling_factor", 8.0))}
    return ModelSpec(
        hidden_size=a["hidden_size"], num_layers=a["num_layers"], num_heads=heads,
        num_kv_heads=(a.get("num_query_groups") or heads) if a.get("group_query_attention") else heads,
        ffn_hidden_size=a["ffn_hidden_size"], vocab_size=vocab,
        norm_eps=float(a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))),
        rope_theta=float(a.get("rotary_base", 10000)), rope_scaling=scaling,
        tie_embeddings=not a.get("untie_embeddings_and_output_weights", False), dtype=dtype,
        max_position_embeddings=int(a.get("max_position_embeddings") or a.get("seq_length") or 4096),
    )
