"""Shared, session-scoped fixtures: tiny HF checkpoints per LLaMA generation, built once, never downloaded.

Also keeps the `slow` marker honest: a test that is not marked slow and starts torchrun (directly or through a
fixture) fails, so `pytest -m "not slow"` stays a loop of a minute or two."""

from __future__ import annotations

import functools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from megallama.tiny import PRESETS, make_hf_checkpoint  # noqa: E402

_running: list = [None]  # the test item whose setup / call / teardown is under way


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _running[0] = item  # set before its fixtures are built, so a module fixture's launch is charged to it


def _slow_only(launch):
    @functools.wraps(launch)
    def guarded(*args, **kwargs):
        item = _running[0]
        if item is not None and item.get_closest_marker("slow") is None:
            raise AssertionError(f"{item.nodeid} starts torchrun but is not marked @pytest.mark.slow")
        return launch(*args, **kwargs)

    return guarded


def pytest_configure(config):
    import megallama.engine.launch as launch

    launch.run_torchrun = _slow_only(launch.run_torchrun)
    launch.stream_torchrun = _slow_only(launch.stream_torchrun)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """{'llama1' | 'llama2' | 'llama3' | 'tied': HF folder (fp32, safetensors, tokenizer.model)}."""
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_checkpoint(root / name, name) for name in PRESETS}


@pytest.fixture(scope="session")
def hf_dir(hf_dirs):
    """The LLaMA-2 GQA fixture, for tests that need just one model."""
    return hf_dirs["llama2"]
