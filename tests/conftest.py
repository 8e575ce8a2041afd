"""Shared, session-scoped fixtures: tiny HF checkpoints per LLaMA generation, built once, never downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from megallama.tiny import PRESETS, make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """{'llama1' | 'llama2' | 'llama3' | 'tied': HF folder (fp32, safetensors, tokenizer.model)}."""
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_checkpoint(root / name, name) for name in PRESETS}


@pytest.fixture(scope="session")
def hf_dir(hf_dirs):
    """The LLaMA-2 GQA fixture, for tests that need just one model."""
    return hf_dirs["llama2"]
