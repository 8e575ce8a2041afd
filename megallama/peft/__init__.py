"""LoRA / DoRA adapters on megatron-core: the `peft:` config block (config.py), the adapter modules (lora.py),
and adapter-only run folders (store.py). HF PEFT export/import and merging live in hf_adapter.py / merge.py."""
