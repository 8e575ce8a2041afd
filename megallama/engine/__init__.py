"""Everything that runs the model: the megatron-core GPTModel builder, our core attention, the CPU bridge, torchrun."""
