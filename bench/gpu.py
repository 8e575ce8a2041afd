"""`make gpu-check`: what a CUDA machine does with megallama, in one script of about 5 minutes on one H100,
written to bench/gpu.json. Not part of CI; rehearsed without CUDA by tests/test_gpu_check.py.

Parts (each one runs even when an earlier one failed; a failure is recorded in its entry, with the output's tail):
  doctor      `megallama doctor` on NCCL: TP x PP = 2 x 1 with two GPUs or more, else 1 x 1.
  conversion  hf2pth and hf2megatron (torch_dist) of the 1B shape (2.2 GB bf16): seconds and GB/s (in + out).
  verify      `megallama verify layer-diff --dtype bf16` on the 1B shape, TP 2 with two GPUs, else TP 1.
  sft         SFT tokens/s per GPU and MFU, seq 2048, 1B shape, train.attention sdpa and (when Transformer
              Engine imports) te. MFU = tokens/s per GPU x FLOPs per token / the GPU's dense bf16 peak, FLOPs per
              token = 6 N + 12 L h s (weights forward and backward, plus causal attention scores and values:
              the rule of thumb megatron-core's published MFU uses).
  generate    `megallama generate` in bf16 with the KV cache, 1B body with a 1000-token vocab (a tokenizer that
              fits), 8 prompts x 128 new tokens: time to first token and decoding tokens/s.

Without CUDA it prints "no GPU: skipped" and exits 0 (`--dry-run` prints the plan instead). Work files go to
bench/gpu-work/ (removed after unless --keep-work).
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
GEN_PROMPTS, GEN_NEW_TOKENS = 8, 128
PART_TIMEOUT = 240  # seconds for any one command: a hang must not eat the whole GPU session
PARTS = ("doctor", "conversion", "verify", "sft", "generate")


def peak_flops(device_name: str) -> float | None:
    if os.environ.get("MEGALLAMA_PEAK_TFLOPS"):
        return float(os.environ["MEGALLAMA_PEAK_TFLOPS"]) * 1e12
    return next((peak for key, peak in BF16_PEAK if key in device_name), None)


def flops_per_token(spec, seq: int) -> float:
    """6 N (matmul weights, forward + backward) + 12 L h s (attention scores and values, causal average)."""
    return 6 * spec.num_parameters() + 12 * spec.num_layers * spec.hidden_size * seq


def mfu(tokens_per_s_per_gpu: float, spec, seq: int, peak: float | None) -> dict:
    flops = flops_per_token(spec, seq)
    return {"tokens_per_s_per_gpu": tokens_per_s_per_gpu, "flops_per_token": flops,
            "tflops_per_gpu": tokens_per_s_per_gpu * flops / 1e12,
            "mfu": tokens_per_s_per_gpu * flops / peak if peak else None}


def run(cmd: list[str], timeout: int = PART_TIMEOUT) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {timeout} s")


def tail(result: subprocess.CompletedProcess) -> str:
    return ((result.stdout or "") + (result.stderr or ""))[-2000:]


def megallama(*args: str) -> list[str]:
    return [sys.executable, "-m", "megallama", *args]


class Context:
    """What the parts share: the work folder, the 1B model, the device and its peak."""

    def __init__(self, work: Path, gpus: int, device: str, peak: float | None):
        from bench import SPEC_1B
        from megallama.spec import ModelSpec

        self.work, self.gpus, self.device, self.peak = work, gpus, device, peak
        self.spec = ModelSpec(**SPEC_1B)
        self._hf: Path | None = None

    @property
    def hf(self) -> Path:
        if self._hf is None:
            from bench import build_hf_1b

            self._hf = build_hf_1b(self.work / "hf-1b")
        return self._hf

    def megatron(self, tp: int) -> Path:
        """The 1B model as a torch-format Megatron checkpoint at TP `tp` (made once)."""
        meg = self.work / f"meg-1b-tp{tp}"
        if not (meg / "latest_checkpointed_iteration.txt").exists():
            result = run(megallama("convert", "hf2megatron", "--input-dir", str(self.hf), "--output-dir", str(meg),
                                   "--ckpt-format", "torch", "--tp", str(tp), "--force", "--no-checksums"))
            if result.returncode != 0:
                raise RuntimeError(f"conversion to TP {tp} failed: {tail(result)}")
        return meg


# ---------------------------------------------------------------- the parts
def part_doctor(ctx: Context) -> dict:
    tp = 2 if ctx.gpus >= 2 else 1
    result = run(megallama("doctor", "--tp", str(tp), "--pp", "1"))
    return {"tp": tp, "pp": 1, "exit_code": result.returncode, "passed": result.returncode == 0,
            "output": tail(result)}


def part_conversion(ctx: Context) -> dict:
    hf, out = ctx.hf, {}
    model_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    for name, cmd in (("hf2pth", ["convert", "hf2pth"]), ("hf2megatron_torch_dist", ["convert", "hf2megatron"])):
        dst = ctx.work / f"conv-{name}"
        start = time.perf_counter()
        result = run(megallama(*cmd, "--input-dir", str(hf), "--output-dir", str(dst), "--force"))
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            out[name] = {"exit_code": result.returncode, "output": tail(result)}
            continue
        written = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
        out[name] = {"seconds": seconds, "gb_per_s": (model_bytes + written) / 1e9 / seconds,
                     "gb_in": model_bytes / 1e9, "gb_out": written / 1e9}
        shutil.rmtree(dst, ignore_errors=True)
    return out


def part_verify(ctx: Context) -> dict:
    tp = 2 if ctx.gpus >= 2 else 1
    report = ctx.work / "verify.json"
    start = time.perf_counter()
    result = run(megallama("verify", "layer-diff", "--reference", str(ctx.hf), "--megatron", str(ctx.megatron(tp)),
                           "--dtype", "bf16", "--json", str(report)))
    out = {"tp": tp, "exit_code": result.returncode, "seconds": time.perf_counter() - start}
    if report.exists():
        data = json.loads(report.read_text())
        out |= {k: data.get(k) for k in ("verdict", "max_abs_logits_diff")}
    else:
        out["output"] = tail(result)
    return out


def sft_data(ctx: Context) -> Path:
    import torch

    data = ctx.work / "sft-data.jsonl"
    if not data.exists():
        gen = torch.Generator().manual_seed(0)
        with open(data, "w") as f:
            for _ in range(MICRO_BATCH * ctx.gpus * STEPS):
                ids = torch.randint(3, ctx.spec.vocab_size, (SEQ + 1,), generator=gen).tolist()
                f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    return data


def sft_command(ctx: Context, attention: str, meg: Path, data: Path, out: Path) -> list[str]:
    return megallama("sft", "--config", str(ROOT.parent / "configs/sft/tiny-cpu.yaml"), f"load={meg}",
                     f"data.train={data}", "data.eval=null", "data.format=pretokenized", f"data.seq_length={SEQ}",
                     f"train.micro_batch_size={MICRO_BATCH}", f"train.global_batch_size={MICRO_BATCH * ctx.gpus}",
                     f"train.steps={STEPS}", "train.precision=bf16", f"train.attention={attention}",
                     "train.save_interval=100000", "train.eval_interval=100000", f"output={out}", "--tp", "1",
                     "--pp", "1", "--dp", str(ctx.gpus))


def sft_rate(metrics: Path) -> float:
    """Median tokens/s over the steps after the first two (kernels and allocators warm up)."""
    rates = [r["tokens_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "tokens_per_s" in r]
    return statistics.median(rates[2:] or rates)


def part_sft(ctx: Context) -> dict:
    meg, data, results = ctx.megatron(1), sft_data(ctx), {}
    for attention in ("sdpa", "te"):
        if attention == "te" and not te_importable():
            results[attention] = {"skipped": "transformer_engine does not import"}
            continue
        out = ctx.work / f"sft-{attention}"
        shutil.rmtree(out, ignore_errors=True)
        result = run(sft_command(ctx, attention, meg, data, out))
        metrics = out / "metrics.jsonl"
        if result.returncode != 0 or not metrics.exists():
            results[attention] = {"exit_code": result.returncode, "output": tail(result)}
            continue
        results[attention] = mfu(sft_rate(metrics) / ctx.gpus, ctx.spec, SEQ, ctx.peak)
    return results


def part_generate(ctx: Context) -> dict:
    from megallama.tiny import corpus_lines, make_hf_checkpoint

    hf = make_hf_checkpoint(ctx.work / "gen-hf", ctx.spec.replace(vocab_size=1000), dtype="bfloat16")
    meg = ctx.work / "gen-meg"
    result = run(megallama("convert", "hf2megatron", "--input-dir", str(hf), "--output-dir", str(meg), "--force",
                           "--no-checksums"))
    if result.returncode != 0:
        return {"exit_code": result.returncode, "output": tail(result)}
    prompts = ctx.work / "gen-prompts.jsonl"
    lines = [line for line in corpus_lines(200) if 20 < len(line) < 200][:GEN_PROMPTS]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = ctx.work / "gen-answers.json"
    start = time.perf_counter()
    result = run(megallama("generate", "--megatron", str(meg), "--prompts", str(prompts), "--max-new-tokens",
                           str(GEN_NEW_TOKENS), "--json", str(answers)))
    if result.returncode != 0 or not answers.exists():
        return {"exit_code": result.returncode, "output": tail(result)}
    first = json.loads(answers.read_text())[0]
    return {"prompts": len(lines), "new_tokens": GEN_NEW_TOKENS, "command_seconds": time.perf_counter() - start,
            **{k: first.get(k) for k in ("time_to_first_token_s", "tokens_per_s", "generate_seconds")}}


PART_FUNCTIONS = {"doctor": part_doctor, "conversion": part_conversion, "verify": part_verify, "sft": part_sft,
                  "generate": part_generate}


def te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


# ---------------------------------------------------------------- the script
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu.json", help="Where to write the results.")
    parser.add_argument("--only", help=f"comma-separated parts: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--work", type=Path, default=ROOT / "gpu-work", help="Work folder (about 8 GB).")
    parser.add_argument("--keep-work", action="store_true", help="Keep the work folder.")
    parser.add_argument("--dry-run", action="store_true", help="Print the plan (parts, device, peak), run nothing.")
    opts = parser.parse_args(argv)
    opts.parts = [p.strip() for p in opts.only.split(",")] if opts.only else list(PARTS)
    unknown = [p for p in opts.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    return opts


def run_parts(ctx: Context, parts: list[str], functions: dict | None = None) -> dict:
    """{part: its result, with "seconds"}; an exception becomes {"error": ...} and the next part still runs."""
    functions = functions or PART_FUNCTIONS
    results = {}
    for name in parts:
        start = time.perf_counter()
        try:
            results[name] = functions[name](ctx)
        except Exception as e:  # the check must report every problem it finds, not stop at the first
            results[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        results[name]["part_seconds"] = time.perf_counter() - start
        print(f"{name}: {json.dumps(results[name])[:400]}", flush=True)
    return results


def header(device: str, gpus: int, peak: float | None, torch_version: str) -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "device": device, "gpus": gpus, "torch": torch_version,
            "bf16_peak_tflops": peak / 1e12 if peak else None, "seq_length": SEQ, "micro_batch_size": MICRO_BATCH}


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not opts.dry_run:
        print("no GPU: skipped")
        return 0
    gpus = torch.cuda.device_count() if cuda else 0
    device = torch.cuda.get_device_name(0) if cuda else "none"
    peak = peak_flops(device)
    if opts.dry_run:
        print(json.dumps({**header(device, gpus, peak, torch.__version__), "parts": opts.parts}, indent=2))
        return 0
    results = header(device, gpus, peak, torch.__version__)
    start = time.perf_counter()
    try:
        results |= run_parts(Context(opts.work, gpus, device, peak), opts.parts)
    finally:
        if not opts.keep_work:
            shutil.rmtree(opts.work, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - start
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "doctor"}, indent=2))
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
