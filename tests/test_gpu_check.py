"""`make gpu-check` (bench/gpu.py) rehearsed without CUDA: argument parsing, the MFU arithmetic, the JSON shape
(every part reports, a failing part does not stop the others), the metrics parsing, and the conversion commands
it runs, for real, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402

from megallama.spec import ModelSpec  # noqa: E402

SPEC = ModelSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=100)


def test_arguments():
    opts = gpu.parse_args([])
    assert opts.parts == list(gpu.PARTS) and opts.out == gpu.ROOT / "gpu.json" and not opts.dry_run
    assert gpu.parse_args(["--only", "sft, generate"]).parts == ["sft", "generate"]
    with pytest.raises(SystemExit) as e:
        gpu.parse_args(["--only", "sft,nccl"])
    assert e.value.code == 2


def test_mfu_arithmetic():
    n = SPEC.num_parameters()
    got = gpu.mfu(1000.0, SPEC, 16, 989e12)
    assert got["flops_per_token"] == 6 * n + 12 * 2 * 64 * 16
    assert got["tflops_per_gpu"] == pytest.approx(1000.0 * got["flops_per_token"] / 1e12)
    assert got["mfu"] == pytest.approx(1000.0 * got["flops_per_token"] / 989e12)
    assert gpu.mfu(1000.0, SPEC, 16, None)["mfu"] is None  # unknown GPU: no invented peak
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and gpu.peak_flops("NVIDIA H100 PCIe") == 756e12


def test_every_part_reports_even_after_a_failure():
    def broken(ctx):
        raise RuntimeError("NCCL init failed")

    results = gpu.run_parts(None, ["doctor", "sft"], {"doctor": broken, "sft": lambda ctx: {"sdpa": {"mfu": 0.4}}})
    assert results["doctor"]["error"] == "RuntimeError: NCCL init failed"
    assert results["sft"]["sdpa"] == {"mfu": 0.4}
    assert all(r["part_seconds"] >= 0 for r in results.values())
    head = gpu.header("NVIDIA H100 80GB HBM3", 1, 989e12, "2.13")
    assert json.loads(json.dumps({**head, **results}))["bf16_peak_tflops"] == 989.0


def test_sft_metrics_and_command(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "tokens_per_s": v} for i, v in enumerate([10.0, 50.0, 100.0, 120.0, 110.0])]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"eval_loss": 1.0}]))
    assert gpu.sft_rate(metrics) == 110.0  # the first two steps warm up

    class Ctx:
        gpus = 2

    cmd = gpu.sft_command(Ctx(), "te", Path("meg"), Path("d.jsonl"), Path("out"))
    assert "train.attention=te" in cmd and "train.precision=bf16" in cmd and cmd[-2:] == ["--dp", "2"]
    assert f"train.global_batch_size={gpu.MICRO_BATCH * 2}" in cmd


def test_dry_run_without_cuda_prints_the_plan(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--only", "sft"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["parts"] == ["sft"] and plan["gpus"] == 0 and plan["bf16_peak_tflops"] is None


def test_conversion_part_runs_its_commands(hf_dir, tmp_path):
    """The conversion part and the TP-1 checkpoint the verify and sft parts load, run on the tiny model (CPU)."""
    ctx = gpu.Context(tmp_path, gpus=1, device="cpu", peak=None)
    ctx._hf = Path(hf_dir)
    got = gpu.part_conversion(ctx)
    for name in ("hf2pth", "hf2megatron_torch_dist"):
        assert got[name]["gb_per_s"] > 0 and got[name]["gb_out"] > 0, got
    assert (ctx.megatron(1) / "latest_checkpointed_iteration.txt").exists()
