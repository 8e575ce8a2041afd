"""The megatron-core GPTModel Transformer Engine layout (`--transformer-impl transformer_engine`, Megatron-LM's
default), torch format (formats.md 4.1).

Same tensors as the local spec, but each pre-norm is fused into the linear after it (`layer_norm_weight`), and
every TE module saves `_extra_state` (FP8 metadata; an empty uint8 tensor when there is none, TE >= 2.4), also
the weightless core attention and, with TE 2 norms, the final norm. The output layer is megatron-core's own
ColumnParallelLinear, whose `_extra_state` stays None.
"""

from __future__ import annotations

from megallama.formats.megatron.local import EMBEDDING_RULE, OUTPUT_RULE
from megallama.formats.megatron.rules import Kind, Layout, Rule
from megallama.names import FINAL_NORM

A, M = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
# The families' rows (`when`) as in local.py; TE's fused linears keep `bias` beside `weight`, and its q/k norms
# (TENorm) save `_extra_state` like the final norm.
LAYER_RULES = (
    Rule("decoder.layers.{j}.self_attention.core_attention.weight", (), Kind.REPLICATED, extra_state=True),
    Rule("decoder.layers.{j}.self_attention.linear_proj.weight", (A + "o_proj.weight",), Kind.ROW, extra_state=True),
    Rule("decoder.layers.{j}.self_attention.linear_proj.bias", (A + "o_proj.bias",), Kind.REPLICATED, when="o_bias"),
    Rule("decoder.layers.{j}.self_attention.linear_qkv.layer_norm_weight",
         ("model.layers.{i}.input_layernorm.weight",), Kind.REPLICATED),
    Rule("decoder.layers.{j}.self_attention.linear_qkv.weight",
         (A + "q_proj.weight", A + "k_proj.weight", A + "v_proj.weight"), Kind.QKV, extra_state=True),
    Rule("decoder.layers.{j}.self_attention.linear_qkv.bias", (A + "q_proj.bias", A + "k_proj.bias", A + "v_proj.bias"),
         Kind.QKV, when="qkv_bias"),
    Rule("decoder.layers.{j}.self_attention.q_layernorm.weight", (A + "q_norm.weight",), Kind.REPLICATED,
         extra_state=True, when="qk_norm_weights"),
    Rule("decoder.layers.{j}.self_attention.k_layernorm.weight", (A + "k_norm.weight",), Kind.REPLICATED,
         extra_state=True, when="qk_norm_weights"),
    Rule("decoder.layers.{j}.mlp.linear_fc1.layer_norm_weight",
         ("model.layers.{i}.post_attention_layernorm.weight",), Kind.REPLICATED),
    Rule("decoder.layers.{j}.mlp.linear_fc1.weight", (M + "gate_proj.weight", M + "up_proj.weight"), Kind.GATE_UP,
         extra_state=True),
    Rule("decoder.layers.{j}.mlp.linear_fc1.bias", (M + "gate_proj.bias", M + "up_proj.bias"), Kind.GATE_UP,
         when="mlp_bias"),
    Rule("decoder.layers.{j}.mlp.linear_fc2.weight", (M + "down_proj.weight",), Kind.ROW, extra_state=True),
    Rule("decoder.layers.{j}.mlp.linear_fc2.bias", (M + "down_proj.bias",), Kind.REPLICATED, when="mlp_bias"),
)

TE = Layout(
    name="mcore-te", layer_rules=LAYER_RULES, embedding=EMBEDDING_RULE,
    final_norm=Rule("decoder.final_layernorm.weight", (FINAL_NORM,), Kind.REPLICATED, extra_state=True),
    output=OUTPUT_RULE, te_extra_state=True,
    flags=("--transformer-impl transformer_engine", "--ckpt-format torch"),
)
