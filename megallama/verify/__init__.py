"""verify layer-diff: the Megatron model against the reference implementation, layer by layer, with a verdict."""
