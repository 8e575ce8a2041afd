"""Megatron checkpoints: one rule table per layout, one reader and one writer per checkpoint format.

    local.py         megatron-core local-spec key table, TP split rules, saved `args`
    torch_format.py  `--ckpt-format torch`: per-rank `mp_rank_*/model_optim_rng.pt` reader and writer
    torch_dist.py    `--ckpt-format torch_dist`: PyTorch DCP as megatron-core's dist_checkpointing writes it

Everything speaks canonical tensors (`megallama.names`); a new dialect is one new table plus a detector line.
"""
