"""LoRA / DoRA adapters on megatron-core linears, and HF PEFT adapter folders out and in."""
