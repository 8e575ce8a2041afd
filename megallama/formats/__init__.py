"""One reader and one writer per on-disk format, all speaking canonical (HF-named) tensors."""
