"""CLI skeleton, doctor and the torchrun launcher."""

import os

import pytest
from helpers import cli

from megallama import __version__
from megallama.engine.launch import torchrun_command


def test_help_lists_commands():
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("convert", "verify", "sft", "doctor"):
        assert command in result.output
    result = cli("convert", "--help")
    for command in ("hf2pth", "pth2hf", "pth2megatron", "megatron2pth", "hf2megatron", "megatron2hf",
                    "megatron2megatron"):
        assert command in result.output
    assert "layer-diff" in cli("verify", "--help").output


def test_version():
    result = cli("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_torchrun_command_defaults_and_multinode(monkeypatch):
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cmd = torchrun_command(["-m", "megallama.engine.smoke"], nproc=4, extra=["--max-restarts=0"])
    assert "--nproc-per-node=4" in cmd and "--nnodes=1" in cmd and "--master-addr=127.0.0.1" in cmd
    assert cmd[-3:] == ["--max-restarts=0", "-m", "megallama.engine.smoke"]
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    cmd = torchrun_command(["-m", "x"], nproc=8)
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"} <= set(cmd)


@pytest.mark.slow
def test_doctor_smoke_tp2_pp2_passes():
    """The real thing: 4 gloo ranks, megatron-core GPTModel at TP=2 x PP=2, forward + backward."""
    result = cli("doctor", env={**os.environ})
    assert result.exit_code == 0, result.output
    assert "megatron-core" in result.output and "PASS" in result.output
    assert "TP=2 PP=2 world=4 backend=gloo" in result.output
