"""The saved `args` Namespace: every field Megatron-LM core_v0.16.1 reads from a checkpoint is there, with the
value a dense LLaMA run needs; and readers (convert, verify) take rotary_interleaved from args too."""

from __future__ import annotations

import torch
from helpers import small_spec

from megallama.convert import convert
from megallama.formats.megatron.args import NOT_SAVED, megatron_args
from megallama.formats.megatron.torch_format import load_rank_file, open_megatron

# Read with getattr/attribute access by Megatron-LM core_v0.16.1 (source files named per group).
LOAD_ARGS_FROM_CHECKPOINT = [  # megatron/training/checkpointing.py, --use-checkpoint-args
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type",
    "add_position_embedding", "use_rotary_position_embeddings", "rotary_base", "rotary_percent",
    "rotary_interleaved", "add_bias_linear", "add_qkv_bias", "squared_relu", "swiglu",
    "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization", "apply_query_key_layer_scaling",
    "attention_dropout", "hidden_dropout", "hybrid_override_pattern", "spec", "hybrid_attention_ratio",
    "hybrid_mlp_ratio", "num_experts", "heterogeneous_layers_config_path",
    "heterogeneous_layers_config_encoded_json", "tokenizer_model", "tokenizer_type", "tiktoken_pattern",
    "padded_vocab_size", "ckpt_format", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size"]
CHECK_CHECKPOINT_ARGS = ["num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
                         "max_position_embeddings", "make_vocab_size_divisible_by", "padded_vocab_size",
                         "tokenizer_type", "data_parallel_random_init", "tensor_model_parallel_size",
                         "pipeline_model_parallel_size"]
LOAD_CHECKPOINT = ["consumed_train_samples", "skipped_train_samples", "consumed_valid_samples", "world_size",
                   "data_parallel_size", "no_save_rng", "no_save_optim", "ckpt_fully_parallel_save"]
TOOLS_CHECKPOINT = [  # tools/checkpoint/{loader_base,loader_legacy,saver_base,saver_legacy}.py
    "fp16", "bf16", "params_dtype", "normalization", "sequence_parallel", "apply_query_key_layer_scaling",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "hidden_size", "seq_length",
    "num_attention_heads", "max_position_embeddings", "position_embedding_type", "tokenizer_type", "swiglu"]

E = small_spec(dtype="bfloat16")


def test_every_field_megatron_reads_is_saved(hf_dirs, tmp_path):
    out = convert(hf_dirs["llama2"], tmp_path / "meg", src_format="hf", dst_format="megatron", tp=2, pp=2,
                  ckpt_format="torch").output
    args = load_rank_file(out / "release/mp_rank_01_001/model_optim_rng.pt")["args"]
    saved = vars(args)
    wanted = LOAD_ARGS_FROM_CHECKPOINT + CHECK_CHECKPOINT_ARGS + LOAD_CHECKPOINT + TOOLS_CHECKPOINT
    assert [f for f in wanted if f not in saved] == []
    assert [f for f in NOT_SAVED if f in saved] == []  # absent = Megatron's own default (dense, no MoE)
    # what tools/checkpoint's saver reads directly (core_v0.16.1 crashed here) and what a dense LLaMA needs
    assert (args.sequence_parallel, args.apply_query_key_layer_scaling, args.num_experts) == (False, False, None)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.world_size) == (2, 2, 4)
    assert (args.no_save_optim, args.no_save_rng, args.ckpt_format, args.transformer_impl) == (True, True, "torch",
                                                                                               "local")
    assert args.tokenizer_type == "Llama2Tokenizer" and args.padded_vocab_size == 512


def test_args_values_follow_the_spec():
    args = megatron_args(E, tp=1, pp=1, padded_vocab_size=128, divisible_by=128, transformer_impl="transformer_engine",
                         sequence_parallel=True)
    assert args.params_dtype == torch.bfloat16 and args.bf16 and not args.fp16
    assert args.sequence_parallel and args.transformer_impl == "transformer_engine"
    assert args.group_query_attention and args.num_query_groups == 2 and args.kv_channels == 16


def test_rotary_interleaved_is_read_from_args_without_a_manifest(hf_dirs, tmp_path):
    """A Megatron-LM checkpoint (no megallama.json) trained with --rotary-interleaved keeps Meta's q/k order."""
    from megallama.verify.data import prepare

    out = convert(hf_dirs["llama2"], tmp_path / "meg", src_format="hf", dst_format="megatron",
                  ckpt_format="torch").output
    (out / "megallama.json").unlink()
    rank = out / "release/mp_rank_00/model_optim_rng.pt"
    ckpt = torch.load(rank, weights_only=False)
    ckpt["args"].rotary_interleaved = True
    torch.save(ckpt, rank)
    with open_megatron(out) as reader:
        assert reader.rotary_interleaved
    assert prepare(hf_dirs["llama2"], out, seq_len=8, batch=1).rotary_interleaved
