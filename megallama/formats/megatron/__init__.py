"""Megatron checkpoints: one rule table per layout, one reader and one writer per checkpoint format.

    rules.py         the table vocabulary: Rule, Kind (with its to_rank / from_ranks pair), Layout, stage_rules
    local.py         megatron-core local spec (`--transformer-impl local`)              read + written
    te.py            megatron-core Transformer Engine spec (`--transformer-impl transformer_engine`)  read + written
    legacy.py        NVIDIA legacy GPTModel (`--use-legacy-models`), old spellings as aliases         read
    llama_fork.py    the Megatron-LLaMA fork of the reference README (rmsnorm names, Meta rotary)     read
    alibaba.py       alibaba/Megatron-LLaMA (replicated unpadded lm_head, [q_r; k_r; v_r] QKV)      read
    detect.py        which layout a checkpoint is, from its keys: one line per layout
    args.py          the saved `args` Namespace (every field Megatron-LM reads), launch flags, spec from args
    torch_format.py  `--ckpt-format torch`: per-rank `mp_rank_*/model_optim_rng.pt` reader and writer

Everything speaks canonical tensors (`megallama.names`); a new dialect is one new table plus a detector line.
"""
