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
# Rows with `when` exist only for the families that have them (docs/models.md): biases are split with their
# weights (q/k/v biases grouped by query group like the rows of linear_qkv, gate/up biases like fc1's rows),
# the row-parallel linears' biases are whole on every rank (added after the all-reduce), q/k norms are per
# head_dim and replicated. HF applies q_norm/k_norm before rotary, on half-split vectors as stored here, so
# their weights need no rotary permutation.
ATTN, MLP = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
LAYER_RULES = (
    Rule("decoder.layers.{j}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), Kind.REPLICATED),
    Rule("decoder.layers.{j}.self_attention.linear_proj.weight", (ATTN + "o_proj.weight",), Kind.ROW,
         extra_state=True),
    Rule("decoder.layers.{j}.self_attention.linear_proj.bias", (ATTN + "o_proj.bias",), Kind.REPLICATED,
         when="o_bias"),
    Rule("decoder.layers.{j}.self_attention.linear_qkv.weight",
         (ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"), Kind.QKV, extra_state=True),
    Rule("decoder.layers.{j}.self_attention.linear_qkv.bias",
         (ATTN + "q_proj.bias", ATTN + "k_proj.bias", ATTN + "v_proj.bias"), Kind.QKV, when="qkv_bias"),
    Rule("decoder.layers.{j}.self_attention.q_layernorm.weight", (ATTN + "q_norm.weight",), Kind.REPLICATED,
         when="qk_norm_weights"),
    Rule("decoder.layers.{j}.self_attention.k_layernorm.weight", (ATTN + "k_norm.weight",), Kind.REPLICATED,
         when="qk_norm_weights"),
    Rule("decoder.layers.{j}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         Kind.REPLICATED),
    Rule("decoder.layers.{j}.mlp.linear_fc1.weight", (MLP + "gate_proj.weight", MLP + "up_proj.weight"),
         Kind.GATE_UP, extra_state=True),
    Rule("decoder.layers.{j}.mlp.linear_fc1.bias", (MLP + "gate_proj.bias", MLP + "up_proj.bias"), Kind.GATE_UP,
         when="mlp_bias"),
    Rule("decoder.layers.{j}.mlp.linear_fc2.weight", (MLP + "down_proj.weight",), Kind.ROW, extra_state=True),
    Rule("decoder.layers.{j}.mlp.linear_fc2.bias", (MLP + "down_proj.bias",), Kind.REPLICATED, when="mlp_bias"),
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
