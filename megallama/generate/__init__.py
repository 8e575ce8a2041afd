"""megallama generate: text from a Megatron checkpoint on megatron-core at its own TP x PP."""
