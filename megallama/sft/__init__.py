"""Supervised fine-tuning on megatron-core: data, training loop, checkpoints."""
