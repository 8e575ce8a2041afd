"""The megatron-core GPTModel local-spec layout (`--transformer-impl local`) as data (formats.md 4.1, 5.4).

The rule vocabulary (`Rule`, `Kind`, `to_rank`, `from_ranks`, ...) lives in `rules.py`, the saved `args` in
`args.py`; both are re-exported here for the callers that know this module as "the mcore layout".
"""

from __future__ import annotations

from megallama.formats.megatron.args import launch_flags, megatron_args, spec_from_args  # noqa: F401
from megallama.formats.megatron.rules import (  # noqa: F401
    Kind,
    Layout,
    Rule,
    from_ranks,
    rank_shape,
    to_rank,
    vocab_rows,
)
from megallama.formats.megatron.rules import stage_rules as layout_stage_rules
from megallama.names import EMBED, FINAL_NORM, LM_HEAD
from megallama.spec import ModelSpec

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

LOCAL = Layout(
    name="mcore-local", layer_rules=LAYER_RULES, embedding=EMBEDDING_RULE, final_norm=FINAL_NORM_RULE,
    output=OUTPUT_RULE, flags=("--transformer-impl local", "--ckpt-format torch"),
)


def stage_rules(spec: ModelSpec, *, pp_rank: int, pp: int) -> list[tuple[Rule, int | None]]:
    """The local spec's bound rules of one pipeline stage (see `rules.stage_rules`)."""
    return layout_stage_rules(LOCAL, spec, pp_rank=pp_rank, pp=pp)
