"""alibaba/Megatron-LLaMA as data: what its `tools/checkpoint_conversion/llama_checkpoint_conversion.py` writes
(formats.md 3.4-3.5, addendum).

The legacy key tree with `*_layernorm` norms; QKV fused per TP rank as [q_r; k_r; v_r] in HF rotary order (not
grouped); `lm_head.weight` a plain Linear holding the full unpadded vocab on every TP rank; the embedding padded
with copies of its last row. `args` is a small SimpleNamespace without norm eps or rope theta, so those come from
a config.json / params.json next to the checkpoint.
"""

from __future__ import annotations

from megallama.formats.megatron.legacy import ENCODER
from megallama.formats.megatron.rules import Kind, Layout, Rule
from megallama.names import EMBED, FINAL_NORM, LM_HEAD

LAYER_RULES = (
    Rule(ENCODER + "layers.{j}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",),
         Kind.REPLICATED),
    Rule(ENCODER + "layers.{j}.self_attention.query_key_value.weight",
         ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"), Kind.QKV_BLOCKS),
    Rule(ENCODER + "layers.{j}.self_attention.dense.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
         Kind.ROW),
    Rule(ENCODER + "layers.{j}.post_attention_layernorm.weight",
         ("model.layers.{i}.post_attention_layernorm.weight",), Kind.REPLICATED),
    Rule(ENCODER + "layers.{j}.mlp.dense_h_to_4h.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), Kind.GATE_UP),
    Rule(ENCODER + "layers.{j}.mlp.dense_4h_to_h.weight", ("model.layers.{i}.mlp.down_proj.weight",), Kind.ROW),
)

ALIBABA = Layout(
    name="alibaba", layer_rules=LAYER_RULES,
    embedding=Rule("language_model.embedding.word_embeddings.weight", (EMBED,), Kind.VOCAB),
    final_norm=Rule(ENCODER + "final_layernorm.weight", (FINAL_NORM,), Kind.REPLICATED),
    output=Rule("lm_head.weight", (LM_HEAD,), Kind.REPLICATED),
    flags=("--RMSNorm", "--causal-lm", "--make-vocab-size-divisible-by 1"),
)
