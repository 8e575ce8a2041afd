"""`make bench`: every figure is a ratio against an alternative measured side by side in the same run.

Parts (`python bench/bench.py --only convert,verify` runs a slice and merges it into bench/results.json):
  convert  Conversion of a 1B-shaped bf16 checkpoint (TinyLlama shape): hf2pth, pth2megatron --tp 2 and
           hf2megatron (when that command exists), start-up included, against copying the same bytes with a
           plain file copy (the I/O floor), each measured REPEATS times interleaved (medians); peak RSS against
           the largest output file; memory against the whole-model-in-RAM approach (transformers
           from_pretrained, split, torch.save).
  sft      SFT throughput on CPU: `megallama sft` TP1 x PP1 against a plain transformers + torch.optim loop, same
           model, data, batch and threads (attention sdpa).
  packing  SFT trained tokens/s with data.pack true vs false on long-tail sample lengths.
  verify   Verify wall time for the tiny and the 1B-shaped model.
  lora     LoRA rank 16 (all four linears) against full SFT on the sft anchor shape: trainable parameters,
           optimizer-state bytes, tokens/s, peak RSS, checkpoint bytes against the base.

Prints one table of every figure in results.json. Work files go to bench/work/ (about 9 GB at peak, removed after).
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


def measure(cmd: list[str], **kwargs) -> dict:
    """Run `cmd`; wall seconds and the peak RSS of its whole process tree, sampled every 20 ms.

    (ru_maxrss is not usable here: Linux carries the parent's high-water mark into a forked child across exec.)
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, **kwargs)
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


def has_command(*args: str) -> bool:
    """Whether `megallama ARGS --help` exits 0 (a command another branch may add)."""
    return subprocess.run(megallama(*args, "--help"), capture_output=True, env=ENV).returncode == 0


def conversion_runs(hf: Path) -> dict[str, tuple[list[str], Path]]:
    """{name: (command, output folder)} of the conversions the targets name; hf2megatron when it exists."""
    pth = WORK / "pth-1b"
    runs = {"hf2pth": (megallama("convert", "hf2pth", "--input-dir", str(hf), "--output-dir", str(pth), "--force"),
                       pth),
            "pth2megatron_tp2": (megallama("convert", "pth2megatron", "--input-dir", str(pth), "--output-dir",
                                           str(WORK / "meg-1b-tp2"), "--tp", "2", "--ckpt-format", "torch", "--force"),
                                 WORK / "meg-1b-tp2")}
    # HOOK (issue 12): hf2megatron comes with the torch_dist writer; measured as soon as the command exists.
    if has_command("convert", "hf2megatron"):
        out = WORK / "meg-1b-tp2-dist"
        runs["hf2megatron_tp2"] = (megallama("convert", "hf2megatron", "--input-dir", str(hf), "--output-dir",
                                             str(out), "--tp", "2", "--force"), out)
    else:
        print("note: `megallama convert hf2megatron` does not exist on this branch: not measured", flush=True)
    return runs


def median_run(runs: list[dict]) -> dict:
    return {"seconds": statistics.median(r["seconds"] for r in runs), "peak_rss": max(r["peak_rss"] for r in runs),
            "peak_anon": max(r["peak_anon"] for r in runs), "all_seconds": [r["seconds"] for r in runs]}


def bench_conversion() -> dict:
    hf = build_hf_1b(WORK / "hf-1b")
    model_bytes = folder_bytes(hf, "*.safetensors")
    runs = conversion_runs(hf)
    copy = [PY, "-c", f"import shutil; shutil.copyfile({str(hf / 'model.safetensors')!r}, {str(WORK / 'copy.bin')!r})"]
    timed: dict[str, list[dict]] = {"copy": [], "startup": [], **{name: [] for name in runs}}
    for _ in range(REPEATS):  # interleaved, so a slow spell of a shared disk hits every command alike
        subprocess.run(["sync"])
        timed["copy"].append(measure(copy))
        (WORK / "copy.bin").unlink()
        timed["startup"].append(measure([PY, "-c", "import megallama.cli, megallama.convert"]))
        for name, (cmd, _) in runs.items():
            subprocess.run(["sync"])
            timed[name].append(measure(cmd))
    floor = statistics.median(r["seconds"] for r in timed["copy"])
    startup = statistics.median(r["seconds"] for r in timed["startup"])

    def step(run: dict, out: Path) -> dict:
        moved = model_bytes + folder_bytes(out, "*.pt*") + folder_bytes(out, "*.distcp") + folder_bytes(
            out, "*.safetensors")
        return {"seconds": run["seconds"], "all_seconds": run["all_seconds"], "gb_per_s": moved / 1e9 / run["seconds"],
                "floor_seconds": floor * 2,  # copy in + copy out of the same bytes
                "x_floor": run["seconds"] / (floor * 2),
                "x_floor_after_startup": (run["seconds"] - startup) / (floor * 2),
                "peak_rss_gb": run["peak_rss"] / 1e9, "peak_anon_gb": run["peak_anon"] / 1e9,
                "largest_output_gb": largest_file(out) / 1e9,
                "rss_over_largest_output": run["peak_rss"] / largest_file(out)}

    results = {"model_gb": model_bytes / 1e9, "repeats": REPEATS,
               "copy_floor": {"seconds": floor, "gb_per_s": 2 * model_bytes / 1e9 / floor},
               "startup_seconds": startup}
    results |= {name: step(median_run(timed[name]), out) for name, (_, out) in runs.items()}
    naive = WORK / "naive-1b-tp2"
    naive_run = measure([PY, "-c", NAIVE_SPLIT, str(hf), str(naive), "2"])
    shutil.rmtree(naive, ignore_errors=True)
    ours_peak = max(max(r["peak_rss"] for r in timed[name]) for name in runs)
    ours_anon = max(max(r["peak_anon"] for r in timed[name]) for name in runs)
    results["memory_vs_whole_model"] = {"megallama_peak_rss_gb": ours_peak / 1e9,
                                        "whole_model_peak_rss_gb": naive_run["peak_rss"] / 1e9,
                                        "megallama_peak_anon_gb": ours_anon / 1e9,
                                        "whole_model_peak_anon_gb": naive_run["peak_anon"] / 1e9,
                                        "ratio": ours_peak / naive_run["peak_rss"],
                                        "whole_model_seconds": naive_run["seconds"]}
    return results


def ensure_megatron_1b() -> Path:
    """The 1B TP2 Megatron checkpoint `verify` compares (the convert part leaves it; alone, it is made here)."""
    meg = WORK / "meg-1b-tp2"
    if not (meg / "latest_checkpointed_iteration.txt").exists():
        for cmd, _ in conversion_runs(build_hf_1b(WORK / "hf-1b")).values():
            if "hf2megatron" not in cmd:
                measure(cmd)
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
    floor = measure([PY, "-c", f"import shutil; shutil.copyfile({str(hf / 'model.safetensors')!r}, "
                     f"{str(WORK / 'copy.bin')!r})"])
    (WORK / "copy.bin").unlink()

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
        out[name] = {"seconds": run["seconds"], "x_floor": run["seconds"] / (floor["seconds"] * (2 if folder else 1)),
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


def conversion_rows(conv: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    steps = [k for k in conv if isinstance(conv[k], dict) and "x_floor" in conv[k]]
    for step in steps:
        s = conv[step]
        after = f" ({s['x_floor_after_startup']:.1f}x after start-up)" if "x_floor_after_startup" in s else ""
        rows.append((f"{step} 1B bf16 ({conv['model_gb']:.2f} GB)", f"{s['seconds']:.1f} s, {s['gb_per_s']:.2f} GB/s",
                     f"file copy in+out {s['floor_seconds']:.1f} s", f"{s['x_floor']:.1f}x floor{after}"))
        rows.append((f"{step} peak RSS (anon)", f"{s['peak_rss_gb']:.2f} GB ({s['peak_anon_gb']:.2f})",
                     f"largest output {s['largest_output_gb']:.2f} GB", f"{s['rss_over_largest_output']:.2f}x"))
    if "startup_seconds" in conv:
        rows.append(("start-up (import megallama.convert, torch)", f"{conv['startup_seconds']:.1f} s", "", ""))
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


# name -> (what it measures, the function that measures it, the table rows it gives). Add a part with one line.
PARTS = {
    "conversion": (bench_conversion, conversion_rows),
    "sft": (bench_sft_throughput, sft_rows),
    "packing": (bench_packing, packing_rows),
    "verify": (bench_verify, verify_rows),
    "torch_dist": (bench_torch_dist, torch_dist_rows),
    "lora": (bench_lora, lora_rows),
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated parts: {', '.join(PARTS)} (default: all); the results "
                        "are merged into the existing results.json")
    parser.add_argument("--table", action="store_true", help="only print the table of bench/results.json")
    opts = parser.parse_args()
    path = ROOT / "results.json"
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
        shutil.rmtree(WORK, ignore_errors=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
