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

LAYER_RULES = (
    Rule("decoder.layers.{j}.self_attention.core_attention.weight", (), Kind.REPLICATED, extra_state=True),
    Rule("decoder.layers.{j}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
         Kind.ROW, extra_state=True),
    Rule("decoder.layers.{j}.self_attention.linear_qkv.layer_norm_weight",
         ("model.layers.{i}.input_layernorm.weight",), Kind.REPLICATED),
    Rule("decoder.layers.{j}.self_attention.linear_qkv.weight",
         ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"), Kind.QKV, extra_state=True),
    Rule("decoder.layers.{j}.mlp.linear_fc1.layer_norm_weight",
         ("model.layers.{i}.post_attention_layernorm.weight",), Kind.REPLICATED),
    Rule("decoder.layers.{j}.mlp.linear_fc1.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), Kind.GATE_UP,
         extra_state=True),
    Rule("decoder.layers.{j}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), Kind.ROW,
         extra_state=True),
)

TE = Layout(
    name="mcore-te", layer_rules=LAYER_RULES, embedding=EMBEDDING_RULE,
    final_norm=Rule("decoder.final_layernorm.weight", (FINAL_NORM,), Kind.REPLICATED, extra_state=True),
    output=OUTPUT_RULE, te_extra_state=True,
    flags=("--transformer-impl transformer_engine", "--ckpt-format torch"),
)
