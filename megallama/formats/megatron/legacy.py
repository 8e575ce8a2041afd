"""NVIDIA Megatron-LM's legacy GPTModel (`--use-legacy-models`, `megatron/legacy/model`, removed in core_v0.18)
as data (formats.md 3.3-3.4, addendum "what the real legacy converters write").

Keys are those of the flattened `model` dict (`model['language_model']['encoder']['layers.0....']`). QKV is
grouped by query group and the MLP is [gate_r; up_r], exactly as in megatron-core; padding rows are copies of the
last real row (dropped on read). Older checkpoints spell `encoder` as `transformer`, `self_attention` as
`attention` and the norms `*_layernorm`; those are read as aliases.
"""

from __future__ import annotations

from megallama.formats.megatron.rules import Kind, Layout, Rule
from megallama.names import EMBED, FINAL_NORM, LM_HEAD

ENCODER = "language_model.encoder."
LAYER_RULES = (
    Rule(ENCODER + "layers.{j}.input_norm.weight", ("model.layers.{i}.input_layernorm.weight",), Kind.REPLICATED),
    Rule(ENCODER + "layers.{j}.self_attention.query_key_value.weight",
         ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"), Kind.QKV),
    Rule(ENCODER + "layers.{j}.self_attention.dense.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
         Kind.ROW),
    Rule(ENCODER + "layers.{j}.post_attention_norm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         Kind.REPLICATED),
    Rule(ENCODER + "layers.{j}.mlp.dense_h_to_4h.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), Kind.GATE_UP),
    Rule(ENCODER + "layers.{j}.mlp.dense_4h_to_h.weight", ("model.layers.{i}.mlp.down_proj.weight",), Kind.ROW),
)

LEGACY = Layout(
    name="legacy", layer_rules=LAYER_RULES,
    embedding=Rule("language_model.embedding.word_embeddings.weight", (EMBED,), Kind.VOCAB),
    final_norm=Rule(ENCODER + "final_norm.weight", (FINAL_NORM,), Kind.REPLICATED),
    output=Rule("language_model.output_layer.weight", (LM_HEAD,), Kind.VOCAB),
    tied_output=Rule("word_embeddings_for_head.weight", (EMBED,), Kind.VOCAB),
    aliases=(("language_model.transformer.", ENCODER), (".attention.", ".self_attention."),
             (".input_layernorm.", ".input_norm."), (".post_attention_layernorm.", ".post_attention_norm."),
             (ENCODER + "final_layernorm.", ENCODER + "final_norm.")),
    flags=("--use-legacy-models", "--ckpt-format torch"),
)
