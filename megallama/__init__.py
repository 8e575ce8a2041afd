"""megallama: LLaMA weights <-> Megatron checkpoints, verified, fine-tuned on megatron-core."""

__version__ = "0.1.0"
