"""`make bench`: every figure is a ratio against an alternative measured side by side in the same run.

Parts (`python bench/bench.py --only convert,verify` runs a slice and merges it into bench/results.json):
  convert  Conversion of a 1B-shaped bf16 checkpoint (TinyLlama shape): hf2pth, pth2hf, pth2megatron --tp 2
           (torch format), hf2megatron --tp 2 (torch_dist) and megatron2hf, start-up included, against the floor:
           ONE plain copy of the command's input weight files (every byte read once and written once, as the
           conversion does), in the same page-cache state: cold (caches dropped before both, where the bench
           may: root on Linux) and hot (input cached); `sync` runs before each timed command, never inside
           it. Medians of REPEATS interleaved runs. Peak RSS; memory against the whole-model-in-RAM approach
           (transformers from_pretrained, split, torch.save).
  sft      SFT throughput on CPU: `megallama sft` TP1 x PP1 against a plain transformers + torch.optim loop, same
           model, data, batch and threads (attention sdpa).
  packing  SFT trained tokens/s with data.pack true vs false on long-tail sample lengths.
  verify   Verify wall time for the tiny and the 1B-shaped model.
  generate The whole `megallama generate` command (8 prompts x 192 new tokens, small model, TP1 and TP2 x PP2)
           against a plain transformers script doing the same work (load + batched greedy generate, KV cache).
  data     `data prepare` records/s and tokens/s at 1 and N workers against a plain encode loop; peak RSS.
  lora     LoRA rank 16 (all four linears) against full SFT on the sft anchor shape: trainable parameters,
           optimizer-state bytes, tokens/s, peak RSS, checkpoint bytes against the base.
  llama4   Conversion of a Llama-4-Scout-shaped bf16 model (full width, --llama4-layers 1 by default: 8.6 GB;
           bench/scout_model.py writes it streamed, sharded like the Hub): hf2megatron --tp 2 --ep 2 (torch_dist),
           megatron2hf back and hf2megatron --tp 2 --ep 2 --ckpt-format torch, cold and hot against the copy
           floor as in `convert`, peak RSS; the HF round trip compared bit for bit. --llama4-scale 0.05: a smoke
           run at 1/20 of every width.

Prints one table of every figure in results.json. Work files go to bench/work/ (about 13 GB at peak, removed
after unless --keep-work; a kept 1B model is reused by the next run; the llama4 part needs about 48 GB more at
one layer and removes its folder when it ends, unless --keep-work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work"
PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}


# ----------------------------------------------------------------------------- measuring
def _tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun ranks included), from /proc/PID/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def _rss(pids: list[int]) -> tuple[int, int]:
    """(resident, anonymous) bytes summed over `pids`; file-backed mmap pages count in the first only."""
    total = anon = 0
    for p in pids:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
    return total, anon


def measure(cmd: list[str], env: dict | None = None, **kwargs) -> dict:
    """Run `cmd`; wall seconds and the peak RSS of its whole process tree, sampled every 20 ms.

    (ru_maxrss is not usable here: Linux carries the parent's high-water mark into a forked child across exec.)
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or ENV,
                            **kwargs)
    peak = peak_anon = 0
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        total, anon = _rss(_tree(proc.pid))
        peak, peak_anon = max(peak, total), max(peak_anon, anon)
        time.sleep(0.02)
    reader.join()
    seconds = time.perf_counter() - start
    output = "".join(chunks)
    if proc.returncode != 0:
        raise SystemExit(f"bench step failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return {"seconds": seconds, "peak_rss": peak, "peak_anon": peak_anon, "output": output}


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def largest_file(path: Path) -> int:
    return max(p.stat().st_size for p in path.rglob("*") if p.is_file())


def megallama(*args: str) -> list[str]:
    return [PY, "-m", "megallama", *args]


# ----------------------------------------------------------------------------- inputs
SPEC_1B = dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, ffn_hidden_size=5632,
               vocab_size=32000, norm_eps=1e-5, dtype="bfloat16", max_position_embeddings=2048)


def build_hf_1b(out: Path) -> Path:
    """A TinyLlama-shaped random bf16 HF checkpoint (2.2 GB), written tensor by tensor with safetensors."""
    from safetensors.torch import save_file

    from megallama.names import expected_shapes
    from megallama.spec import ModelSpec

    spec = ModelSpec(**SPEC_1B)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in expected_shapes(spec).items():
        t = torch.randn(*shape, generator=gen, dtype=torch.float32).mul_(0.02 if len(shape) == 2 else 0.0)
        tensors[name] = (t if len(shape) == 2 else t.add_(1.0)).to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(spec.to_hf_config(), indent=2))
    return out


NAIVE_SPLIT = r"""
import sys, torch
from pathlib import Path
from transformers import LlamaForCausalLM
src, dst, tp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
model = LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
state = {k: v.clone() for k, v in model.state_dict().items()}  # the whole model in RAM
for rank in range(tp):
    shard = {}
    for k, v in state.items():
        if v.dim() == 1:
            shard[k] = v.clone()
        elif "o_proj" in k or "down_proj" in k:
            shard[k] = torch.chunk(v, tp, 1)[rank].clone()
        else:
            shard[k] = torch.chunk(v, tp, 0)[rank].clone()
    (dst / f"mp_rank_{rank:02d}").mkdir(parents=True, exist_ok=True)
    torch.save({"model": shard}, dst / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")
"""

PLAIN_TRAIN = r"""
import json, sys, time, torch
from transformers import LlamaForCausalLM
src, data, steps, micro, accum = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rows = [json.loads(l) for l in open(data)]
model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
seq = len(rows[0]["input_ids"])
times, i = [], 0
for step in range(steps):
    t0 = time.perf_counter()
    for _ in range(accum):
        batch = torch.tensor([rows[(i + j) % len(rows)]["input_ids"] for j in range(micro)])
        i += micro
        out = model(input_ids=batch, labels=batch)
        (out.loss / accum).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
tokens = micro * accum * seq
print(json.dumps({"tokens_per_s": [tokens / t for t in times[2:]]}))
"""


# ----------------------------------------------------------------------------- benchmarks
REPEATS = 3  # conversion runs are repeated, interleaved with the copy floor, and the medians reported
ONLY_CONVERSIONS: list[str] | None = None  # --conversions: a subset (each needs its input from an earlier one)
STATES = ("cold", "hot")  # page cache emptied before the run (when the bench may), or holding the input


def drop_caches() -> bool:
    """Empty the page cache (Linux, root: /proc/sys/vm/drop_caches), so the next run reads from the disk.

    Flushes dirty pages first (`sync`) so that they can be dropped; the caller does this *outside* any timed
    region. Returns False where the bench may not (not root, a container without the file writable).
    """
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def settle(state: str) -> bool:
    """Bring the machine to `state` before a timed run, outside the timing: "cold" empties the page cache, "hot"
    only flushes the previous run's dirty pages (so no run pays for another's writeback). False: cold impossible."""
    if state == "cold":
        return drop_caches()
    subprocess.run(["sync"], check=False)
    return True


def copy_floor_cmd(files: list[Path], dest: Path) -> list[str]:
    """One plain copy of `files` into the new folder `dest`: every byte read once and written once, as a
    conversion moves them (shutil.copyfile: sendfile / copy_file_range where the kernel offers it)."""
    return [PY, "-c", "import shutil, sys, os; os.makedirs(sys.argv[1]); "
            "[shutil.copyfile(f, os.path.join(sys.argv[1], os.path.basename(f))) for f in sys.argv[2:]]",
            str(dest), *map(str, files)]


def input_files(folder: Path) -> list[Path]:
    """The weight files a conversion of `folder` reads (what the copy floor copies)."""
    patterns = ("*.safetensors", "consolidated.*.pth", "*.distcp", "model_optim_rng.pt")
    return sorted(p for pat in patterns for p in folder.rglob(pat))


def warm(files: list[Path]) -> None:
    """Read `files` once, so the page cache holds them."""
    buf = bytearray(1 << 24)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def has_command(*args: str) -> bool:
    """Whether `megallama ARGS --help` exits 0 (a command another branch may add)."""
    return subprocess.run(megallama(*args, "--help"), capture_output=True, env=ENV).returncode == 0


def conversion_runs(hf: Path) -> dict[str, tuple[list[str], Path, Path]]:
    """{name: (command, its input folder, its output folder)} of the conversions the targets name, in an order
    where each input exists when its command runs (pth2hf and megatron2hf read what earlier ones wrote)."""
    pth, meg, dist = WORK / "pth-1b", WORK / "meg-1b-tp2", WORK / "meg-1b-tp2-dist"

    def conv(cmd: str, src: Path, dst: Path, *extra: str) -> tuple[list[str], Path, Path]:
        return megallama("convert", cmd, "--input-dir", str(src), "--output-dir", str(dst), "--force",
                         *extra), src, dst

    return {"hf2pth": conv("hf2pth", hf, pth),
            "pth2hf": conv("pth2hf", pth, WORK / "hf-back-1b"),
            "pth2megatron_tp2": conv("pth2megatron", pth, meg, "--tp", "2", "--ckpt-format", "torch"),
            "hf2megatron_tp2": conv("hf2megatron", hf, dist, "--tp", "2"),
            "megatron2hf": conv("megatron2hf", dist, WORK / "hf-from-dist-1b")}


def selected(runs: dict[str, tuple]) -> dict[str, tuple]:
    """`runs` narrowed to the --conversions names, where these name any of them (the convert and llama4 parts
    have commands of their own: a selection for one leaves the other whole)."""
    if not ONLY_CONVERSIONS or not set(ONLY_CONVERSIONS) & set(runs):
        return runs
    return {k: v for k, v in runs.items() if k in ONLY_CONVERSIONS}


def median_run(runs: list[dict]) -> dict:
    return {"seconds": statistics.median(r["seconds"] for r in runs), "peak_rss": max(r["peak_rss"] for r in runs),
            "peak_anon": max(r["peak_anon"] for r in runs), "all_seconds": [r["seconds"] for r in runs]}


def timed_against_copy(cmd: list[str], src: Path, *, cold: bool) -> dict[str, dict]:
    """{state: {"run": measure(cmd), "copy": measure(plain copy of src's weight files)}} for each state, copy and
    command side by side in the same state (cold only when the page cache can be emptied)."""
    out = {}
    for state in STATES:
        if state == "cold" and not cold:
            continue
        pair = {}
        for what, command in (("copy", copy_floor_cmd(input_files(src), WORK / "copy")),
                              ("run", cmd)):
            shutil.rmtree(WORK / "copy", ignore_errors=True)
            if state == "hot":  # the input in the page cache, as after a first run
                warm(input_files(src))
            settle(state)
            pair[what] = measure(command)
        shutil.rmtree(WORK / "copy", ignore_errors=True)
        out[state] = pair
    return out


def interleaved_runs(runs: dict[str, tuple[list[str], Path, Path]], *, cold: bool,
                     each_round=lambda: None) -> dict[str, dict[str, list]]:
    """{name: {"<state>_run" | "<state>_copy": [measure(...) per round]}}: REPEATS rounds, each running every
    command of `runs` against its copy floor (`timed_against_copy`), interleaved so that a slow spell of a
    shared disk hits every command alike; `each_round()` runs at the start of every round."""
    timed = {name: {f"{state}_{what}": [] for state in STATES for what in ("run", "copy")} for name in runs}
    for _ in range(REPEATS):
        each_round()
        for name, (cmd, src, _) in runs.items():
            for state, pair in timed_against_copy(cmd, src, cold=cold).items():
                for what, run in pair.items():
                    timed[name][f"{state}_{what}"].append(run)
    return timed


def conversion_step(timed: dict[str, list], src: Path, out: Path) -> dict:
    """One conversion's figures from its `interleaved_runs` entry: medians per state against the copy floor,
    GB/s over input + output bytes, peak RSS."""
    moved = folder_bytes(src, "*") + folder_bytes(out, "*")
    res = {"gb_in_plus_out": moved / 1e9, "largest_output_gb": largest_file(out) / 1e9}
    for state in STATES:
        runs_, copies = timed[f"{state}_run"], timed[f"{state}_copy"]
        if not runs_:
            res[state] = {"skipped": "the page cache cannot be emptied here (/proc/sys/vm/drop_caches)"}
            continue
        run, copy = median_run(runs_), median_run(copies)
        res[state] = {"seconds": run["seconds"], "all_seconds": run["all_seconds"],
                      "copy_seconds": copy["seconds"], "copy_all_seconds": copy["all_seconds"],
                      "x_copy": run["seconds"] / copy["seconds"], "gb_per_s": moved / 1e9 / run["seconds"],
                      "peak_rss_gb": run["peak_rss"] / 1e9, "peak_anon_gb": run["peak_anon"] / 1e9}
    return res


def bench_conversion() -> dict:
    hf = build_hf_1b(WORK / "hf-1b")
    model_bytes = folder_bytes(hf, "*.safetensors")
    runs = selected(conversion_runs(hf))
    cold = drop_caches()
    startup = []
    timed = interleaved_runs(runs, cold=cold, each_round=lambda: startup.append(
        measure([PY, "-c", "import megallama.cli, megallama.convert"])["seconds"]))
    results = {"model_gb": model_bytes / 1e9, "repeats": REPEATS, "cold_possible": cold,
               "floor": "one plain copy (shutil.copyfile) of the command's input weight files, same page-cache state",
               "startup_seconds": statistics.median(startup)}
    results |= {name: conversion_step(timed[name], src, out) for name, (_, src, out) in runs.items()}
    naive = WORK / "naive-1b-tp2"
    naive_run = measure([PY, "-c", NAIVE_SPLIT, str(hf), str(naive), "2"])
    shutil.rmtree(naive, ignore_errors=True)
    every = [r for name in runs for key, rs in timed[name].items() if key.endswith("_run") for r in rs]
    results["memory_vs_whole_model"] = {"megallama_peak_rss_gb": max(r["peak_rss"] for r in every) / 1e9,
                                        "whole_model_peak_rss_gb": naive_run["peak_rss"] / 1e9,
                                        "megallama_peak_anon_gb": max(r["peak_anon"] for r in every) / 1e9,
                                        "whole_model_peak_anon_gb": naive_run["peak_anon"] / 1e9,
                                        "ratio": max(r["peak_rss"] for r in every) / naive_run["peak_rss"],
                                        "whole_model_seconds": naive_run["seconds"]}
    return results


def ensure_megatron_1b() -> Path:
    """The 1B TP2 Megatron checkpoint `verify` compares (the convert part leaves it; alone, it is made here)."""
    meg = WORK / "meg-1b-tp2"
    if not (meg / "latest_checkpointed_iteration.txt").exists():
        runs = conversion_runs(build_hf_1b(WORK / "hf-1b"))
        for name in ("hf2pth", "pth2megatron_tp2"):
            measure(runs[name][0])
    return meg


def bench_sft_throughput() -> dict:
    from megallama.spec import ModelSpec
    from megallama.tiny import make_hf_checkpoint

    # baselines.md's CPU training anchor shape: hidden 256, 4 layers, 8 heads / 4 KV, vocab 8000.
    spec = ModelSpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=688,
                     vocab_size=8000, max_position_embeddings=1024)
    hf = make_hf_checkpoint(WORK / "sft-hf", spec, tokenizer=False)
    data = WORK / "sft-data.jsonl"
    gen = torch.Generator().manual_seed(0)
    seq, micro, accum, steps = 256, 8, 1, 12
    with open(data, "w") as f:
        for _ in range(micro * accum * steps):
            ids = torch.randint(3, spec.vocab_size, (seq + 1,), generator=gen).tolist()
            f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    pth, meg, out = WORK / "sft-pth", WORK / "sft-meg", WORK / "sft-out"
    measure(megallama("convert", "hf2pth", "--input-dir", str(hf), "--output-dir", str(pth), "--force"))
    measure(megallama("convert", "pth2megatron", "--input-dir", str(pth), "--output-dir", str(meg),
                      "--ckpt-format", "torch", "--force"))
    shutil.rmtree(out, ignore_errors=True)
    measure(megallama("sft", "--config", str(ROOT.parent / "configs/sft/tiny-cpu.yaml"), f"load={meg}",
                      f"data.train={data}", "data.eval=null", "data.format=pretokenized", f"data.seq_length={seq}",
                      f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * accum}",
                      f"train.steps={steps}", "train.precision=fp32", "train.save_interval=1000",
                      "train.eval_interval=1000", f"output={out}", "--tp", "1", "--pp", "1"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ours = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]
    plain = json.loads(measure([PY, "-c", PLAIN_TRAIN, str(hf), str(data), str(steps), str(micro),
                                str(accum)])["output"].strip().splitlines()[-1])["tokens_per_s"]
    return {"model": "hidden 256, 4 layers, 8/4 heads, vocab 8000, fp32", "attention": "sdpa", "seq_length": seq,
            "global_batch": micro * accum, "threads": os.cpu_count(),
            "megallama_tokens_per_s": statistics.median(ours), "plain_tokens_per_s": statistics.median(plain),
            "ratio": statistics.median(ours) / statistics.median(plain)}


def _dcp_bytes(it_dir: Path) -> dict[str, int]:
    """{"model": numel of the model tensors, "optimizer": bytes of the optimizer tensors} of a torch_dist folder."""
    from megallama.formats.megatron.torch_dist import DistCheckpoint

    out = {"model": 0, "optimizer": 0}
    for key, md in DistCheckpoint(it_dir).tensors.items():
        numel = 1
        for d in md.size:
            numel *= d
        if key.startswith("optimizer."):
            out["optimizer"] += numel * md.properties.dtype.itemsize
        else:
            out["model"] += numel
    return out


def bench_lora() -> dict:
    """LoRA rank 16 on all four linears against full SFT: same model, data, batch, threads (CPU, fp32). The
    anchor shape of `sft` (hidden 256, 4 layers), not the 1B shape: on a shared 2-core CPU 1B SFT steps take minutes."""
    from megallama.spec import ModelSpec
    from megallama.tiny import make_hf_checkpoint

    spec = ModelSpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=688,
                     vocab_size=8000, max_position_embeddings=1024)
    hf = make_hf_checkpoint(WORK / "lora-hf", spec, tokenizer=False)
    data = WORK / "lora-data.jsonl"
    gen = torch.Generator().manual_seed(0)
    seq, micro, steps = 256, 8, 10
    with open(data, "w") as f:
        for _ in range(micro * steps):
            ids = torch.randint(3, spec.vocab_size, (seq + 1,), generator=gen).tolist()
            f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    meg = WORK / "lora-meg"
    measure(megallama("convert", "hf2megatron", "--input-dir", str(hf), "--output-dir", str(meg), "--force"))
    runs = {}
    for name, extra in (("full", []), ("lora", ["peft.method=lora", "peft.rank=16", "peft.alpha=32"])):
        out = WORK / f"lora-out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        m = measure(megallama("sft", "--config", str(ROOT.parent / "configs/sft/tiny-cpu.yaml"), f"load={meg}",
                              f"data.train={data}", "data.eval=null", "data.format=pretokenized",
                              f"data.seq_length={seq}", f"train.micro_batch_size={micro}",
                              f"train.global_batch_size={micro}", f"train.steps={steps}", "train.precision=fp32",
                              f"train.save_interval={steps}", "train.eval_interval=1000", f"output={out}",
                              "--tp", "1", "--pp", "1", *extra))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        it_dir = out / f"iter_{steps:07d}"
        dcp = _dcp_bytes(it_dir)
        runs[name] = {"tokens_per_s": statistics.median([r["tokens_per_s"] for r in records
                                                         if "tokens_per_s" in r][2:]),
                      "peak_rss": m["peak_rss"], "trainable_parameters": dcp["model"],
                      "optimizer_state_bytes": dcp["optimizer"], "checkpoint_bytes": folder_bytes(it_dir)}
    base_bytes = folder_bytes(meg)
    return {"model": "hidden 256, 4 layers, 8/4 heads, vocab 8000, fp32", "seq_length": seq, "global_batch": micro,
            "threads": os.cpu_count(), "lora": "rank 16, alpha 32, linear_qkv/proj/fc1/fc2", "base_bytes": base_bytes,
            **{f"{name}_{k}": v for name, run in runs.items() for k, v in run.items()}}


def long_tail_lengths(n: int, *, seed: int = 0) -> list[int]:
    """SFT-like sample lengths: 20 to 1000 tokens, log-normal (median about 120, most under 200), deterministic."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=gen) * 0.8 + 4.8).round().clamp(20, 1000)
    return [int(x) for x in lengths]


def bench_packing() -> dict:
    """`megallama sft` with data.pack true vs false on a long-tail length mix (same model, data, steps, batch):
    trained tokens/s (tokens with a loss) and the padding share of the token slots."""
    from megallama.spec import ModelSpec
    from megallama.tiny import make_hf_checkpoint

    spec = ModelSpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=688,
                     vocab_size=8000, max_position_embeddings=1024)
    hf = make_hf_checkpoint(WORK / "sft-hf", spec, tokenizer=False)
    pth, meg = WORK / "sft-pth", WORK / "sft-meg"
    if not (meg / "megallama.json").exists():
        measure(megallama("convert", "hf2pth", "--input-dir", str(hf), "--output-dir", str(pth), "--force"))
        measure(megallama("convert", "pth2megatron", "--input-dir", str(pth), "--output-dir", str(meg), "--force"))
    seq, micro, global_batch, steps = 1024, 4, 16, 8
    lengths = long_tail_lengths(global_batch * steps)
    data = WORK / "sft-long-tail.jsonl"
    gen = torch.Generator().manual_seed(1)
    with open(data, "w") as f:
        for n in lengths:
            ids = torch.randint(3, spec.vocab_size, (n + 1,), generator=gen).tolist()
            f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    runs = {}
    for pack in (False, True):
        out = WORK / f"sft-pack-{pack}"
        shutil.rmtree(out, ignore_errors=True)
        measure(megallama("sft", "--config", str(ROOT.parent / "configs/sft/tiny-cpu.yaml"), f"load={meg}",
                          f"data.train={data}", "data.eval=null", "data.format=pretokenized", f"data.seq_length={seq}",
                          f"data.pack={str(pack).lower()}", f"train.micro_batch_size={micro}",
                          f"train.global_batch_size={global_batch}", f"train.steps={steps}", "train.precision=fp32",
                          "train.save_interval=1000", "train.eval_interval=1000", f"output={out}", "--tp", "1",
                          "--pp", "1"))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "trained_tokens_per_s" in r][2:]
        runs[pack] = {"trained_tokens_per_s": statistics.median(r["trained_tokens_per_s"] for r in train),
                      "pad_fraction": statistics.mean(r["pad_fraction"] for r in train),
                      "losses": [r["loss"] for r in records if "loss" in r]}
    same = max(abs(a - b) / b for a, b in zip(runs[True]["losses"], runs[False]["losses"], strict=True))
    return {"data": f"{len(lengths)} samples, lengths 20-1000 (median {statistics.median(lengths):.0f}, "
                    f"{sum(n < 200 for n in lengths) / len(lengths):.0%} under 200)",
            "seq_length": seq, "global_batch": global_batch, "micro_batch": micro,
            "unpacked": {k: v for k, v in runs[False].items() if k != "losses"},
            "packed": {k: v for k, v in runs[True].items() if k != "losses"},
            "max_relative_loss_difference": same,
            "ratio": runs[True]["trained_tokens_per_s"] / runs[False]["trained_tokens_per_s"]}


def bench_verify() -> dict:
    from megallama.tiny import make_hf_checkpoint

    tiny = make_hf_checkpoint(WORK / "tiny-hf", "llama2")
    tiny_pth, tiny_meg = WORK / "tiny-pth", WORK / "tiny-meg"
    measure(megallama("convert", "hf2pth", "--input-dir", str(tiny), "--output-dir", str(tiny_pth), "--force"))
    measure(megallama("convert", "pth2megatron", "--input-dir", str(tiny_pth), "--output-dir", str(tiny_meg),
                      "--tp", "2", "--pp", "2", "--ckpt-format", "torch", "--force"))
    results = {}
    for name, ref, meg in (("tiny_tp2_pp2", tiny, tiny_meg), ("1b_tp2", WORK / "hf-1b", ensure_megatron_1b())):
        run = measure(megallama("verify", "layer-diff", "--reference", str(ref), "--megatron", str(meg),
                                "--json", str(WORK / f"verify-{name}.json")))
        report = json.loads((WORK / f"verify-{name}.json").read_text())
        results[name] = {"seconds": run["seconds"], "peak_rss_gb": run["peak_rss"] / 1e9,
                         "verdict": report["verdict"], "max_abs_logits_diff": report["max_abs_logits_diff"]}
    return results


WHOLE_MODEL_DIST_SAVE = r"""
import sys, torch
from pathlib import Path
import megallama.engine.runtime
from megallama.formats.hf import open_hf
from megallama.formats.megatron.torch_format import rank_state_dict
from megallama.engine.model import build_gpt_model
from megallama.engine.runtime import init_distributed
from megallama.spec import padded_vocab_size

def main():
    from megatron.core import dist_checkpointing
    init_distributed()
    with open_hf(Path(sys.argv[1])) as r:
        spec = r.spec
        padded = padded_vocab_size(spec.vocab_size, 1)
        model = build_gpt_model(spec, padded_vocab_size=padded, dtype=spec.dtype)  # the whole model in RAM
        model.load_state_dict(rank_state_dict(r, spec, tp_rank=0, tp=1, pp_rank=0, pp=1, padded_vocab_size=padded))
    out = Path(sys.argv[2]) / "release"
    out.mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(out))

if __name__ == "__main__":
    main()
"""


READ_ALL = r"""
import sys
from megallama.convert import open_reader
with open_reader(sys.argv[1], "megatron") as r:
    for name in r.names():
        r.get(name)  # canonical tensor, dropped at once
"""


def bench_torch_dist() -> dict:
    """torch_dist write (hf2megatron) and read (the reader alone, and megatron2hf end to end) on the 1B shape,
    next to the torch-format writer, a whole-model megatron-core dist_checkpointing.save and the copy floor.
    Memory above "the same command on the tiny model" (imports, not tensors) is compared with the largest tensor
    written at once (the embedding / output layer); file-backed pages of the mapped input count only in RSS."""
    from megallama.tiny import make_hf_checkpoint

    hf = build_hf_1b(WORK / "hf-1b")
    tiny = make_hf_checkpoint(WORK / "tiny-hf-td", "llama2")
    dist, torch_fmt, back, whole = WORK / "dist-1b", WORK / "torch-1b", WORK / "dist-1b-hf", WORK / "whole-1b"
    model_bytes = folder_bytes(hf, "*.safetensors")
    warm(input_files(hf))
    settle("hot")
    floor = measure(copy_floor_cmd(input_files(hf), WORK / "copy"))  # hot, as the runs below
    shutil.rmtree(WORK / "copy")

    def write(src: Path, out: Path, *extra: str) -> dict:
        return measure(megallama("convert", "hf2megatron", "--input-dir", str(src), "--output-dir", str(out),
                                 "--force", *extra))

    base_write = write(tiny, WORK / "tiny-dist")
    base_torch = write(tiny, WORK / "tiny-torch", "--ckpt-format", "torch")
    base_read = measure([PY, "-c", READ_ALL, str(WORK / "tiny-dist")])
    runs = {  # name: (run, output folder or None, baseline run)
        "torch_dist_write": (write(hf, dist), dist, base_write),
        "torch_write": (write(hf, torch_fmt, "--ckpt-format", "torch"), torch_fmt, base_torch),
        "torch_dist_read": (measure([PY, "-c", READ_ALL, str(dist)]), None, base_read),
        "torch_dist_to_hf": (measure(megallama("convert", "megatron2hf", "--input-dir", str(dist), "--output-dir",
                                               str(back), "--force")), back, base_write),
        "whole_model_dist_save": (measure([PY, "-c", WHOLE_MODEL_DIST_SAVE, str(hf), str(whole)]), whole,
                                  base_write),
    }
    largest = 32000 * 2048 * 2  # the embedding (and output layer) chunk: the largest tensor written at once
    out = {"model_gb": model_bytes / 1e9, "copy_floor_seconds": floor["seconds"], "largest_tensor_gb": largest / 1e9}
    for name, (run, folder, base) in runs.items():
        moved = model_bytes + (folder_bytes(folder) if folder else 0)
        out[name] = {"seconds": run["seconds"], "x_floor": run["seconds"] / floor["seconds"],
                     "gb_per_s": moved / 1e9 / run["seconds"],
                     "peak_rss_gb": run["peak_rss"] / 1e9, "peak_anon_gb": run["peak_anon"] / 1e9,
                     "baseline_anon_gb": base["peak_anon"] / 1e9,
                     "anon_above_baseline_over_largest_tensor": (run["peak_anon"] - base["peak_anon"]) / largest}
    return out


def torch_dist_rows(td: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for name in ("torch_dist_write", "torch_write", "torch_dist_read", "torch_dist_to_hf", "whole_model_dist_save"):
        s = td[name]
        rows.append((f"{name} 1B bf16", f"{s['seconds']:.1f} s, {s['x_floor']:.1f}x floor",
                     f"peak RSS {s['peak_rss_gb']:.2f} GB (anon {s['peak_anon_gb']:.2f})",
                     f"anon above tiny run = {s['anon_above_baseline_over_largest_tensor']:.2f}x largest tensor"))
    return rows


LLAMA4_LAYERS = 1  # --llama4-layers: Scout has 48; one layer is ~8.6 GB at full width
LLAMA4_SCALE = 1.0  # --llama4-scale: every width times this (0.05 for a smoke run of a few MB)
KEEP_WORK = False  # --keep-work: the llama4 part leaves its folders (else it removes them when done)


def llama4_runs(hf: Path, work: Path) -> dict[str, tuple[list[str], Path, Path]]:
    """The Llama 4 conversions, in an order where each input exists when its command runs: HF -> torch_dist at
    TP 2 x EP 2, back to HF, and HF -> torch format at TP 2 x EP 2 (the layout whose files show the expert split:
    one folder per TP x EP rank, each with its half of the experts)."""
    dist = work / "meg-dist-tp2-ep2"

    def conv(cmd: str, src: Path, dst: Path, *extra: str) -> tuple[list[str], Path, Path]:
        return megallama("convert", cmd, "--input-dir", str(src), "--output-dir", str(dst), "--force",
                         *extra), src, dst

    return {"hf2megatron_tp2_ep2": conv("hf2megatron", hf, dist, "--tp", "2", "--ep", "2"),
            "megatron2hf": conv("megatron2hf", dist, work / "hf-back"),
            "hf2megatron_torch_tp2_ep2": conv("hf2megatron", hf, work / "meg-torch-tp2-ep2", "--tp", "2", "--ep", "2",
                                              "--ckpt-format", "torch")}


def bench_llama4() -> dict:
    """Conversion of a Llama-4-Scout-shaped bf16 model (full width, LLAMA4_LAYERS layers; `scout_model.py`)
    against the one-plain-copy floor, cold and hot like the convert part, with peak RSS; then the HF -> torch_dist
    -> HF round trip compared tensor by tensor, bit for bit."""
    from scout_model import compare_tensors, scout_text_config

    work = WORK / "llama4"
    config = scout_text_config(layers=LLAMA4_LAYERS, scale=LLAMA4_SCALE)
    hf = work / "hf-scout"
    if (hf / "config.json").exists() and json.loads((hf / "config.json").read_text()) != config:
        shutil.rmtree(work)  # a kept folder of another shape
    try:
        build = measure([PY, str(ROOT / "scout_model.py"), str(hf), "--layers", str(LLAMA4_LAYERS), "--scale",
                         str(LLAMA4_SCALE), "--max-shard-bytes", str(int(2e9 * LLAMA4_SCALE ** 2))])
        runs = selected(llama4_runs(hf, work))
        cold = drop_caches()
        timed = interleaved_runs(runs, cold=cold)
        e, h, f = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]
        results = {"model": f"Llama-4-Scout text shape, {LLAMA4_LAYERS} of 48 layers, widths x {LLAMA4_SCALE:g}",
                   "config": {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                     "head_dim", "num_local_experts", "intermediate_size",
                                                     "vocab_size", "num_hidden_layers")},
                   "model_gb": folder_bytes(hf, "*.safetensors") / 1e9,
                   "shards": len(list(hf.glob("*.safetensors"))), "build_seconds": build["seconds"],
                   "build_peak_rss_gb": build["peak_rss"] / 1e9, "fused_experts_gb": e * h * 2 * f * 2 / 1e9,
                   "repeats": REPEATS, "cold_possible": cold,
                   "floor": "one plain copy (shutil.copyfile) of the command's input weight files, same page-cache "
                            "state"}
        results |= {name: conversion_step(timed[name], src, out) for name, (_, src, out) in runs.items()}
        if "megatron2hf" in runs:
            results["round_trip"] = compare_tensors(hf, runs["megatron2hf"][2])
        torch_fmt = work / "meg-torch-tp2-ep2"
        if torch_fmt.exists():
            results["torch_rank_folders"] = {p.name: folder_bytes(p) / 1e9
                                             for p in sorted(torch_fmt.glob("*/mp_rank_*"))}
        return results
    finally:
        if not KEEP_WORK:
            shutil.rmtree(work, ignore_errors=True)


def llama4_rows(r: dict) -> list[tuple[str, str, str, str]]:
    label = f"llama4 Scout-shaped {r['config']['num_hidden_layers']}L"
    rows = [(f"{label} source (streamed build)", f"{r['model_gb']:.2f} GB in {r['shards']} shards, "
             f"{r['build_seconds']:.1f} s", f"peak RSS {r['build_peak_rss_gb']:.2f} GB",
             f"fused experts tensor {r['fused_experts_gb']:.2f} GB")]
    steps = [k for k in r if isinstance(r[k], dict) and "hot" in r[k]]
    for step in steps:
        rows += step_rows(f"{label} {step}", r[step])
        rows.append((f"{label} {step} peak anon / fused experts tensor", "", "",
                     f"{r[step]['hot']['peak_anon_gb'] / r['fused_experts_gb']:.2f}x"))
    if "round_trip" in r:
        t = r["round_trip"]
        rows.append((f"{label} HF -> torch_dist -> HF", "bit-exact" if t["bit_exact"] else
                     f"DIFFERS: {', '.join(t['differ'])}",
                     f"{t['compared']}/{t['tensors']} tensors, {t['bytes_compared'] / 1e9:.2f} GB compared", ""))
    return rows


def step_rows(label: str, s: dict) -> list[tuple[str, str, str, str]]:
    """The table rows of one `conversion_step`: each page-cache state against its copy, then the peak RSS."""
    rows = []
    for state in STATES:
        r = s[state]
        if "skipped" in r:
            rows.append((f"{label}, {state}", "skipped", r["skipped"], ""))
            continue
        rows.append((f"{label}, {state} page cache", f"{r['seconds']:.1f} s, {r['gb_per_s']:.2f} GB/s",
                     f"plain copy {r['copy_seconds']:.1f} s", f"{r['x_copy']:.2f}x copy"))
    hot = s["hot"]
    rows.append((f"{label} peak RSS (anon)", f"{hot['peak_rss_gb']:.2f} GB ({hot['peak_anon_gb']:.2f})",
                 f"largest output {s['largest_output_gb']:.2f} GB", ""))
    return rows


def conversion_rows(conv: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    if "cold_possible" not in conv:  # a results.json of the old layout (floor = two copies)
        return [("conversion (old results.json layout: rerun `make bench`)", "", "", "")]
    for step in (k for k in conv if isinstance(conv[k], dict) and "hot" in conv[k]):
        rows += step_rows(f"{step} 1B bf16", conv[step])
    rows.append(("start-up (import megallama.cli, megallama.convert)", f"{conv['startup_seconds']:.2f} s", "", ""))
    m = conv["memory_vs_whole_model"]
    rows.append(("conversion peak RSS vs whole model in RAM", f"{m['megallama_peak_rss_gb']:.2f} GB",
                 f"{m['whole_model_peak_rss_gb']:.2f} GB, {m['whole_model_seconds']:.1f} s", f"{m['ratio']:.2f}x"))
    return rows


def sft_rows(sft: dict) -> list[tuple[str, str, str, str]]:
    return [("SFT tokens/s (CPU, TP1xPP1)", f"{sft['megallama_tokens_per_s']:.0f}",
             f"transformers+AdamW {sft['plain_tokens_per_s']:.0f}", f"{sft['ratio']:.2f}x")]


def lora_rows(r: dict) -> list[tuple[str, str, str, str]]:
    gib = 2**30
    return [
        ("LoRA r16 trainable parameters", f"{r['lora_trainable_parameters']:,}",
         f"full SFT {r['full_trainable_parameters']:,}",
         f"{r['lora_trainable_parameters'] / r['full_trainable_parameters']:.2%}"),
        ("LoRA r16 optimizer-state bytes", f"{r['lora_optimizer_state_bytes'] / 2**20:.2f} MiB",
         f"full SFT {r['full_optimizer_state_bytes'] / 2**20:.2f} MiB",
         f"{r['lora_optimizer_state_bytes'] / r['full_optimizer_state_bytes']:.2%}"),
        ("LoRA r16 SFT tokens/s (CPU, TP1xPP1)", f"{r['lora_tokens_per_s']:.0f}",
         f"full SFT {r['full_tokens_per_s']:.0f}", f"{r['lora_tokens_per_s'] / r['full_tokens_per_s']:.2f}x"),
        ("LoRA r16 SFT peak RSS", f"{r['lora_peak_rss'] / gib:.2f} GiB", f"full SFT {r['full_peak_rss'] / gib:.2f} GiB",
         f"{r['lora_peak_rss'] / r['full_peak_rss']:.2f}x"),
        ("LoRA r16 checkpoint bytes", f"{r['lora_checkpoint_bytes'] / 2**20:.2f} MiB",
         f"base {r['base_bytes'] / 2**20:.2f} MiB", f"{r['lora_checkpoint_bytes'] / r['base_bytes']:.2%}"),
    ]


def packing_rows(pack: dict) -> list[tuple[str, str, str, str]]:
    packed, unpacked = pack["packed"], pack["unpacked"]
    return [("SFT trained tokens/s, data.pack (long-tail lengths)",
             f"{packed['trained_tokens_per_s']:.0f} (pad {packed['pad_fraction']:.0%})",
             f"unpacked {unpacked['trained_tokens_per_s']:.0f} (pad {unpacked['pad_fraction']:.0%})",
             f"{pack['ratio']:.2f}x")]


def verify_rows(ver: dict) -> list[tuple[str, str, str, str]]:
    return [(f"verify {name}", f"{v['seconds']:.1f} s ({v['verdict']})",
             f"max |dlogits| {v['max_abs_logits_diff']:.2e}", "") for name, v in ver.items()]


PLAIN_GENERATE = r"""
import json, sys, time, torch
from transformers import AutoTokenizer, LlamaForCausalLM
src, prompts_file, new_tokens, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
tok = AutoTokenizer.from_pretrained(src)
tok.pad_token, tok.padding_side = tok.eos_token, "left"
model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
prompts = [json.loads(line) for line in open(prompts_file)]
batch = tok(prompts, return_tensors="pt", padding=True)
with torch.no_grad():
    ids = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
new = [row[batch["input_ids"].shape[1]:].tolist() for row in ids]
json.dump([{"prompt": p, "completion": tok.decode(n, skip_special_tokens=True), "completion_ids": n}
           for p, n in zip(prompts, new)], open(out, "w"))
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

GEN_SPEC = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=688, vocab_size=1000,
                max_position_embeddings=1024)
GEN_PROMPTS, GEN_NEW_TOKENS = 8, 192


def bench_generate() -> dict:
    """The whole `megallama generate` command (start-up, torchrun, loading, decoding with the KV cache) against a
    plain transformers script doing the same work (load, batched greedy `generate` with its KV cache), same
    model, prompts and new tokens; megallama at TP1 and at TP2 x PP2."""
    from megallama.spec import ModelSpec
    from megallama.tiny import corpus_lines, make_hf_checkpoint

    hf = make_hf_checkpoint(WORK / "gen-hf", ModelSpec(**GEN_SPEC))
    meg = WORK / "gen-meg"
    measure(megallama("convert", "hf2megatron", "--input-dir", str(hf), "--output-dir", str(meg), "--force"))
    prompts = WORK / "gen-prompts.jsonl"
    lines = [line for line in corpus_lines(200) if 20 < len(line) < 200][:GEN_PROMPTS]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    plain_out = WORK / "gen-plain.json"
    plain = measure([PY, "-c", PLAIN_GENERATE, str(hf), str(prompts), str(GEN_NEW_TOKENS), str(plain_out)],
                    env={**ENV, "OMP_NUM_THREADS": str(os.cpu_count())})
    want = [r["completion_ids"] for r in json.loads(plain_out.read_text())]
    results = {"model": "hidden 256, 4 layers, 8/4 heads, vocab 1000, fp32", "prompts": len(lines),
               "new_tokens": GEN_NEW_TOKENS, "transformers_seconds": plain["seconds"]}
    for name, extra in (("tp1", []), ("tp2_pp2", ["--tp", "2", "--pp", "2"])):
        out = WORK / f"gen-{name}.json"
        run = measure(megallama("generate", "--megatron", str(meg), "--prompts", str(prompts), "--max-new-tokens",
                                str(GEN_NEW_TOKENS), "--json", str(out), *extra))
        got = json.loads(out.read_text())
        results[name] = {"seconds": run["seconds"], "x_transformers": run["seconds"] / plain["seconds"],
                         "time_to_first_token_s": got[0].get("time_to_first_token_s"),
                         "tokens_per_s": got[0].get("tokens_per_s"),
                         "same_tokens_as_transformers": sum(g["completion_ids"] == w[:len(g["completion_ids"])]
                                                            for g, w in zip(got, want, strict=True))}
    return results


def generate_rows(gen: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for name in ("tp1", "tp2_pp2"):
        g = gen[name]
        rows.append((f"generate {gen['prompts']} prompts x {gen['new_tokens']} tokens, {name} (whole command)",
                     f"{g['seconds']:.1f} s ({g['tokens_per_s']:.0f} tok/s decoding, first token "
                     f"{g['time_to_first_token_s']:.2f} s)", f"transformers script {gen['transformers_seconds']:.1f} s",
                     f"{g['x_transformers']:.2f}x ({g['same_tokens_as_transformers']}/{gen['prompts']} same tokens)"))
    return rows


PLAIN_ENCODE = r"""
import json, sys, time
from pathlib import Path
from megallama.sft.tokenizer import load_tokenizer
from megallama.sft.templates import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT
tok = load_tokenizer(Path(sys.argv[2]))
tic, records, tokens = time.perf_counter(), 0, 0
with open(sys.argv[1]) as f:
    for line in f:
        r = json.loads(line)
        prompt = (ALPACA_TEMPLATE.format(instruction=r["instruction"], input=r["input"]) if r.get("input")
                  else ALPACA_TEMPLATE_NO_INPUT.format(instruction=r["instruction"]))
        tokens += len(tok.encode(prompt)) + len(tok.encode(r["output"])) + 2
        records += 1
print(json.dumps({"records": records, "tokens": tokens, "seconds": time.perf_counter() - tic}))
"""


def alpaca_records(path: Path, n: int, *, seed: int = 0) -> Path:
    """n alpaca-style records (instruction, optional input, output of 1-6 lines) from the tiny corpus."""
    import random

    from megallama.tiny import corpus_lines

    lines, rng = corpus_lines(), random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            record = {"instruction": rng.choice(lines), "input": rng.choice(lines) if rng.random() < 0.4 else "",
                      "output": " ".join(rng.sample(lines, rng.randint(1, 6)))}
            f.write(json.dumps(record) + "\n")
    return path


def bench_data_prepare() -> dict:
    """`megallama data prepare` on synthetic alpaca records (LLaMA-style sentencepiece BPE tokenizer, vocab 8000):
    records/s and tokens/s with 1 and N workers against a plain single-process json + template + encode loop over
    the same file (rates from each program's own clock, start-up excluded); CPU seconds of the whole process tree
    per token (what a loaded machine can still compare) and the reading/writing process's share; peak RSS of the
    whole process tree for the input and for an input 3x as large (streaming: it should not grow)."""
    from megallama.tiny import train_tokenizer

    tok = WORK / "data-tok"
    train_tokenizer(tok, vocab_size=8000)
    n = 100_000
    small, large = alpaca_records(WORK / "alpaca-100k.jsonl", n), alpaca_records(WORK / "alpaca-300k.jsonl", 3 * n)
    cpu = children_cpu_seconds()
    plain = measure([PY, "-c", PLAIN_ENCODE, str(small), str(tok)])
    plain_cpu = children_cpu_seconds() - cpu
    base = json.loads(plain["output"].strip().splitlines()[-1])
    cores = os.cpu_count() or 1
    runs = {}
    for name, data, workers in (("1 worker", small, 1), (f"{cores} workers", small, cores),
                                (f"{cores} workers, 3x input", large, cores)):
        report = WORK / "prepare.json"
        cpu = children_cpu_seconds()
        run = measure(megallama("data", "prepare", "--input", str(data), "--format", "alpaca", "--tokenizer",
                                str(tok), "--output", str(WORK / "prepared"), "--workers", str(workers),
                                "--overwrite", "--json", str(report)))
        r = json.loads(report.read_text())
        runs[name] = {"records_per_s": r["records"] / r["seconds"], "tokens_per_s": r["tokens"] / r["seconds"],
                      "wall_s": run["seconds"], "peak_rss": run["peak_rss"], "records": r["records"],
                      "cpu_s": children_cpu_seconds() - cpu, "main_cpu_s": r["main_cpu_seconds"],
                      "seconds": r["seconds"], "startup_s": r["startup_seconds"], "tokens": r["tokens"]}
    fast = runs[f"{cores} workers"]
    return {"records": n, "tokens": base["tokens"], "cores": cores, "tokenizer": "sentencepiece BPE, vocab 8000",
            "plain_records_per_s": base["records"] / base["seconds"],
            "plain_tokens_per_s": base["tokens"] / base["seconds"], "plain_peak_rss": plain["peak_rss"],
            "plain_cpu_s": plain_cpu, "plain_wall_s": plain["seconds"],
            "runs": runs, "ratio": fast["tokens_per_s"] / (base["tokens"] / base["seconds"]),
            "rss_ratio_3x_input": runs[f"{cores} workers, 3x input"]["peak_rss"] / fast["peak_rss"]}


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process tree of this process so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def data_rows(d: dict) -> list[tuple[str, str, str, str]]:
    plain = f"plain encode loop {d['plain_tokens_per_s']:,.0f} tokens/s"
    rows = [(f"data prepare tokens/s, {name}", f"{r['tokens_per_s']:,.0f} ({r['records_per_s']:,.0f} records/s)",
             plain, f"{r['tokens_per_s'] / d['plain_tokens_per_s']:.2f}x")
            for name, r in d["runs"].items() if "3x" not in name]
    if "plain_cpu_s" in d:  # CPU per token of the whole process tree, start-up included on both sides
        per_token = d["plain_cpu_s"] / d["tokens"] * 1e6
        rows += [(f"data prepare CPU us/token, {name} (reader/writer {r['main_cpu_s'] / r['seconds']:.0%} of a "
                  f"core)", f"{r['cpu_s'] / r['tokens'] * 1e6:.3f}", f"plain encode loop {per_token:.3f}",
                  f"{r['cpu_s'] / r['tokens'] * 1e6 / per_token:.2f}x")
                 for name, r in d["runs"].items() if "3x" not in name]
    big = [r for name, r in d["runs"].items() if "3x" in name][0]
    small = d["runs"][f"{d['cores']} workers"]
    rows.append(("data prepare peak RSS (process tree)", f"{small['peak_rss'] / 1e6:.0f} MB",
                 f"3x input {big['peak_rss'] / 1e6:.0f} MB", f"{d['rss_ratio_3x_input']:.2f}x"))
    return rows


# name -> (what it measures, the function that measures it, the table rows it gives). Add a part with one line.
PARTS = {
    "conversion": (bench_conversion, conversion_rows),
    "sft": (bench_sft_throughput, sft_rows),
    "packing": (bench_packing, packing_rows),
    "verify": (bench_verify, verify_rows),
    "torch_dist": (bench_torch_dist, torch_dist_rows),
    "generate": (bench_generate, generate_rows),
    "data": (bench_data_prepare, data_rows),
    "lora": (bench_lora, lora_rows),
    "llama4": (bench_llama4, llama4_rows),
}
ALIASES = {"convert": "conversion"}


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"megallama bench ({results['machine']}, {results['date']})", title_justify="left")
    for col in ("measure", "megallama", "alternative", "ratio"):
        table.add_column(col)
    for name, (_, rows) in PARTS.items():
        if name in results:
            for row in rows(results[name]):
                table.add_row(*row)
    Console().print(table)


def main() -> None:
    global REPEATS, ONLY_CONVERSIONS, LLAMA4_LAYERS, LLAMA4_SCALE, KEEP_WORK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated parts: {', '.join(PARTS)} (default: all); the results "
                        "are merged into the existing results.json")
    parser.add_argument("--table", action="store_true", help="only print the table of bench/results.json")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs per conversion (medians reported)")
    parser.add_argument("--conversions", help="comma-separated subset of the convert (or llama4) part's commands")
    parser.add_argument("--llama4-layers", type=int, default=LLAMA4_LAYERS, help="layers of the Scout-shaped model "
                        "(about 4.4 GB each at full width, plus 4.1 GB of embedding and output layer)")
    parser.add_argument("--llama4-scale", type=float, default=LLAMA4_SCALE, help="every width of the Scout-shaped "
                        "model times this (e.g. 0.05 for a smoke run)")
    parser.add_argument("--keep-work", action="store_true", help="keep bench/work/ (the 1B model is reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "results.json", help="results file (merged with --only)")
    opts = parser.parse_args()
    if opts.llama4_layers < 1 or not 0 < opts.llama4_scale <= 1:
        parser.error(f"--llama4-layers {opts.llama4_layers} / --llama4-scale {opts.llama4_scale:g}: need at least "
                     "one layer and a scale in (0, 1]")
    REPEATS, ONLY_CONVERSIONS = opts.repeats, opts.conversions.split(",") if opts.conversions else None
    LLAMA4_LAYERS, LLAMA4_SCALE, KEEP_WORK = opts.llama4_layers, opts.llama4_scale, opts.keep_work
    path = opts.out
    if opts.table:
        print_table(json.loads(path.read_text()))
        return
    parts = [ALIASES.get(p.strip(), p.strip()) for p in opts.only.split(",")] if opts.only else list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    results = json.loads(path.read_text()) if opts.only and path.exists() else {}
    results |= {"machine": machine, "date": time.strftime("%Y-%m-%d")}
    try:
        for name in parts:
            results[name] = PARTS[name][0]()
            results.setdefault("part_dates", {})[name] = time.strftime("%Y-%m-%d")  # slices merge into old results
    finally:
        if not opts.keep_work:
            shutil.rmtree(WORK, ignore_errors=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
