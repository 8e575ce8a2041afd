"""The Megatron-LLaMA fork of the reference README (MinfanZhao/Megatron-LM_, `llama_sft.sh`) as data: what its
`tools/llama/checkpoint_convert_from_llama_pth.py` writes and its training saves (formats.md 3.0, 3.4, addendum).

The legacy GPTModel key tree with `*_rmsnorm` norms; QKV fused per head [nh, 3, dh] (MHA only: the grouped
rule with ng = nh), q/k rows left in Meta's interleaved rotary order (`--rope-style llama`); zero padding rows;
`args: None`, so the architecture comes from a params.json / config.json next to the checkpoint.
"""

from __future__ import annotations

from megallama.formats.megatron.legacy import ENCODER
from megallama.formats.megatron.rules import Kind, Layout, Rule
from megallama.names import EMBED, FINAL_NORM, LM_HEAD

LAYER_RULES = (
    Rule(ENCODER + "layers.{j}.input_rmsnorm.weight", ("model.layers.{i}.input_layernorm.weight",),
         Kind.REPLICATED),
    Rule(ENCODER + "layers.{j}.self_attention.query_key_value.weight",
         ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"), Kind.QKV),
    Rule(ENCODER + "layers.{j}.self_attention.dense.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
         Kind.ROW),
    Rule(ENCODER + "layers.{j}.post_attention_rmsnorm.weight",
         ("model.layers.{i}.post_attention_layernorm.weight",), Kind.REPLICATED),
    Rule(ENCODER + "layers.{j}.mlp.dense_h_to_4h.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), Kind.GATE_UP),
    Rule(ENCODER + "layers.{j}.mlp.dense_4h_to_h.weight", ("model.layers.{i}.mlp.down_proj.weight",), Kind.ROW),
)

LLAMA_FORK = Layout(
    name="llama-fork", layer_rules=LAYER_RULES,
    embedding=Rule("language_model.embedding.word_embeddings.weight", (EMBED,), Kind.VOCAB),
    final_norm=Rule(ENCODER + "final_rmsnorm.weight", (FINAL_NORM,), Kind.REPLICATED),
    output=Rule("language_model.output_layer.weight", (LM_HEAD,), Kind.VOCAB),
    rotary_interleaved=True,
    flags=("--use-rmsnorm", "--swiglu", "--llama-swiglu", "--rope-style llama", "--no-query-key-layer-scaling",
           "--finetune"),
)
