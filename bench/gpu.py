"""`make gpu-check`: what a CUDA machine does with megallama, written to bench/gpu.json. Not part of CI.

1. `megallama doctor` on NCCL (TP x PP = 2 x 1 with two GPUs or more, else 1 x 1);
2. `megallama verify layer-diff` in bf16 at TP 2 on the 1B shape (needs two GPUs);
3. SFT tokens/s per GPU and MFU at seq 2048 on the 1B shape, with `train.attention=sdpa` and, when Transformer
   Engine is importable, `te`. MFU = tokens/s per GPU x FLOPs per token / the GPU's bf16 dense peak, with
   FLOPs per token = 6 N + 12 L h s (weights, forward and backward, plus causal attention scores; the rule of
   thumb megatron-core's published MFU uses).

Without CUDA it prints "no GPU: skipped" and exits 0. Work files go to bench/gpu-work/ (removed after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

# Dense bf16 peak FLOP/s by device name (vendor datasheets, without sparsity). MEGALLAMA_PEAK_TFLOPS overrides.
BF16_PEAK = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
             ("A800", 312e12), ("L40S", 362e12), ("A10", 125e12), ("B200", 2250e12))
SEQ, MICRO_BATCH, STEPS = 2048, 4, 12


def peak_flops(device_name: str) -> float | None:
    if os.environ.get("MEGALLAMA_PEAK_TFLOPS"):
        return float(os.environ["MEGALLAMA_PEAK_TFLOPS"]) * 1e12
    return next((peak for key, peak in BF16_PEAK if key in device_name), None)


def flops_per_token(spec, seq: int) -> float:
    """6 N (matmul weights, forward + backward) + 12 L h s (attention scores and values, causal average)."""
    return 6 * spec.num_parameters() + 12 * spec.num_layers * spec.hidden_size * seq


def run(cmd: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def megallama(*args: str) -> list[str]:
    return [sys.executable, "-m", "megallama", *args]


def doctor(gpus: int) -> dict:
    tp = 2 if gpus >= 2 else 1
    result = run(megallama("doctor", "--tp", str(tp), "--pp", "1"))
    return {"tp": tp, "pp": 1, "exit_code": result.returncode, "passed": result.returncode == 0,
            "output": (result.stdout + result.stderr)[-2000:]}


def verify_bf16(work: Path, hf: Path, gpus: int) -> dict:
    if gpus < 2:
        return {"skipped": "verify at TP 2 needs two GPUs"}
    pth, meg, report = work / "pth-1b", work / "meg-1b-tp2", work / "verify.json"
    for cmd in (megallama("convert", "hf2pth", "--input-dir", str(hf), "--output-dir", str(pth), "--force"),
                megallama("convert", "pth2megatron", "--input-dir", str(pth), "--output-dir", str(meg), "--tp", "2",
                          "--force")):
        if run(cmd).returncode != 0:
            return {"error": f"conversion failed: {' '.join(cmd)}"}
    start = time.perf_counter()
    result = run(megallama("verify", "layer-diff", "--reference", str(hf), "--megatron", str(meg), "--dtype", "bf16",
                           "--json", str(report)))
    out = {"exit_code": result.returncode, "seconds": time.perf_counter() - start}
    if report.exists():
        data = json.loads(report.read_text())
        out |= {k: data.get(k) for k in ("verdict", "max_abs_logits_diff")}
    else:
        out["output"] = (result.stdout + result.stderr)[-2000:]
    return out


def sft_throughput(work: Path, hf: Path, spec, attention: str, gpus: int, peak: float | None) -> dict:
    import torch

    meg1 = work / "meg-1b-tp1"
    if not (meg1 / "latest_checkpointed_iteration.txt").exists():
        pth = work / "pth-1b"
        if not (pth / "params.json").exists():
            run(megallama("convert", "hf2pth", "--input-dir", str(hf), "--output-dir", str(pth), "--force"))
        run(megallama("convert", "pth2megatron", "--input-dir", str(pth), "--output-dir", str(meg1), "--force"))
    data = work / "sft-data.jsonl"
    if not data.exists():
        gen = torch.Generator().manual_seed(0)
        with open(data, "w") as f:
            for _ in range(MICRO_BATCH * gpus * STEPS):
                ids = torch.randint(3, spec.vocab_size, (SEQ + 1,), generator=gen).tolist()
                f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    out = work / f"sft-{attention}"
    shutil.rmtree(out, ignore_errors=True)
    result = run(megallama("sft", "--config", str(ROOT.parent / "configs/sft/tiny-cpu.yaml"), f"load={meg1}",
                           f"data.train={data}", "data.eval=null", "data.format=pretokenized",
                           f"data.seq_length={SEQ}", f"train.micro_batch_size={MICRO_BATCH}",
                           f"train.global_batch_size={MICRO_BATCH * gpus}", f"train.steps={STEPS}",
                           "train.precision=bf16", f"train.attention={attention}", "train.save_interval=100000",
                           "train.eval_interval=100000", f"output={out}", "--tp", "1", "--pp", "1",
                           "--dp", str(gpus)))
    metrics = out / "metrics.jsonl"
    if result.returncode != 0 or not metrics.exists():
        return {"exit_code": result.returncode, "output": (result.stdout + result.stderr)[-2000:]}
    rates = [r["tokens_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "tokens_per_s" in r]
    per_gpu = statistics.median(rates[2:] or rates) / gpus  # the first steps warm up kernels and allocators
    flops = flops_per_token(spec, SEQ)
    return {"tokens_per_s_per_gpu": per_gpu, "tflops_per_gpu": per_gpu * flops / 1e12,
            "mfu": per_gpu * flops / peak if peak else None, "flops_per_token": flops}


def te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu.json", help="Where to write the results.")
    opts = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no GPU: skipped")
        return 0
    from bench import SPEC_1B, build_hf_1b
    from megallama.spec import ModelSpec

    gpus, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    spec = ModelSpec(**SPEC_1B)
    work = ROOT / "gpu-work"
    results = {"date": time.strftime("%Y-%m-%d"), "device": name, "gpus": gpus, "torch": torch.__version__,
               "bf16_peak_tflops": peak / 1e12 if peak else None, "seq_length": SEQ, "micro_batch_size": MICRO_BATCH}
    try:
        hf = build_hf_1b(work / "hf-1b")
        results["doctor"] = doctor(gpus)
        results["verify_bf16_tp2"] = verify_bf16(work, hf, gpus)
        results["sft"] = {a: sft_throughput(work, hf, spec, a, gpus, peak) for a in ("sdpa", "te")
                          if a == "sdpa" or te_importable()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "doctor"}, indent=2))
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
