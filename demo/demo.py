"""`make demo`: the whole reference workflow end to end on CPU, through the real CLI.

build a small LLaMA + tokenizer -> convert hf2pth -> pth2megatron (TP 2 x PP 2) -> verify layer-diff ->
sft (TP 2 x PP 2, 4 processes) on a task the model visibly learns -> megatron2pth -> pth2hf -> `megallama
generate` on the fine-tuned Megatron checkpoint (TP 2 x PP 2), cross-checked against transformers' greedy
generation from the exported HF model; then a LoRA run on the base and `generate` on it (base + adapters), its
adapter exported with `convert megatron2hf --peft`, and transformers + peft's answers compared with megallama's.
Ends with a summary table, the model's answers and the path of loss.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("DEMO_OUT", ROOT / "demo_out"))
STEPS = int(os.environ.get("DEMO_STEPS", "300"))
console = Console(stderr=True)
summary: list[tuple[str, float, str]] = []


def step(title: str, cmd: list[str]) -> None:
    """Run one CLI step, streaming its output; stop the demo on failure."""
    console.rule(f"[bold]{title}")
    console.print("$ " + " ".join(cmd), highlight=False, markup=False)
    start = time.perf_counter()
    rc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}).returncode
    seconds = time.perf_counter() - start
    summary.append((title, seconds, "ok" if rc == 0 else f"FAILED (exit {rc})"))
    if rc != 0:
        print_summary()
        sys.exit(rc)


def megallama(*args: str) -> list[str]:
    return [sys.executable, "-m", "megallama", *args]


def build_inputs() -> tuple[Path, Path, Path]:
    """A small random-weight LLaMA (GQA) whose tokenizer covers the task, and the task's train/eval data."""
    from megallama.sft.data import learnable_lines, make_learnable_dataset
    from megallama.spec import ModelSpec
    from megallama.tiny import make_hf_checkpoint

    start = time.perf_counter()
    spec = ModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=352,
                     vocab_size=384, norm_eps=1e-5, max_position_embeddings=512)
    hf = make_hf_checkpoint(OUT / "base-hf", spec, tokenizer_lines=learnable_lines())
    train = make_learnable_dataset(OUT / "data" / "train.jsonl", n=2000, seed=0)
    evaluation = make_learnable_dataset(OUT / "data" / "eval.jsonl", n=64, seed=1)
    summary.append(("build model + tokenizer + data", time.perf_counter() - start, "ok"))
    return hf, train, evaluation


def hf_generate(hf_dir: Path, records: list[dict], adapter: Path | None = None) -> list[str]:
    """Greedy generation with transformers from the exported HF model (with `adapter`: an HF PEFT adapter folder
    applied by peft), prompted with the SFT template."""
    import torch
    from transformers import LlamaForCausalLM

    from megallama.sft.data import load_tokenizer
    from megallama.sft.templates import alpaca_pieces

    tok = load_tokenizer(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    rows = []
    for rec in records:
        prompt = alpaca_pieces({**rec, "output": ""}, bos_id=tok.bos_id, eos_id=None, where="demo")
        ids = [p.content for p in prompt if isinstance(p.content, int)] + tok.encode(prompt[1].content)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
        rows.append(tok.decode([i for i in out[0, len(ids):].tolist() if i != tok.eos_id]))
    return rows


def print_summary(generations: list[tuple[str, str, str]] | None = None) -> None:
    table = Table(title="megallama demo", title_justify="left")
    for col in ("step", "seconds", "result"):
        table.add_column(col)
    for title, seconds, result in summary:
        table.add_row(title, f"{seconds:.1f}", result)
    table.add_row("total", f"{sum(s for _, s, _ in summary):.1f}", "")
    Console().print(table)
    if generations:
        gen = Table(title="megallama generate: the fine-tuned Megatron model (TP 2 x PP 2) answers",
                    title_justify="left")
        for col in ("prompt", "model says", "expected"):
            gen.add_column(col)
        for row in generations:
            gen.add_row(*row)
        Console().print(gen)


LORA_STEPS = int(os.environ.get("DEMO_LORA_STEPS", "40"))


def lora_leg(base: Path, train: Path, prompts: Path) -> Path:
    """LoRA (rank 8, all four linears) on the base at TP2 x PP1, then `generate` on the run: base + adapters,
    unmerged (docs/lora.md). Returns the run folder; its answers are in OUT/lora-answers.json."""
    run = OUT / "lora"
    step(f"sft LoRA r8 TP2, 2 CPU processes, {LORA_STEPS} steps (base frozen)",
         megallama("sft", "--config", str(ROOT / "configs/sft/tiny-cpu.yaml"), "--tp", "2", "--pp", "1",
                   f"load={base}", f"data.train={train}", "data.seq_length=96", f"train.steps={LORA_STEPS}",
                   "train.micro_batch_size=4", "train.global_batch_size=16", "train.lr=3e-3", "train.min_lr=3e-4",
                   f"train.warmup_steps={max(1, LORA_STEPS // 10)}", "train.log_interval=10",
                   f"train.save_interval={LORA_STEPS}", "peft.method=lora", "peft.rank=8", "peft.alpha=16",
                   f"output={run}"))
    step("generate on the LoRA run (base + adapters, unmerged)",
         megallama("generate", "--megatron", str(run), "--prompts", str(prompts), "--max-new-tokens", "12",
                   "--json", str(OUT / "lora-answers.json")))
    return run


def peft_leg(run: Path, base_hf: Path, records: list[dict]) -> None:
    """The LoRA run's adapter exported as an HF PEFT folder (docs/peft-io.md); transformers + peft on the HF base
    must answer exactly as `generate` on the run did."""
    adapter = OUT / "lora-adapter"
    step("convert megatron2hf --peft (the adapter as an HF PEFT folder)",
         megallama("convert", "megatron2hf", "--input-dir", str(run), "--output-dir", str(adapter), "--peft",
                   "--base", str(base_hf)))
    start = time.perf_counter()
    answers = json.loads((OUT / "lora-answers.json").read_text())
    same = sum(a["completion"] == h for a, h in zip(answers, hf_generate(base_hf, records, adapter=adapter),
                                                     strict=True))
    summary.append(("same answers from transformers + peft (exported adapter)", time.perf_counter() - start,
                    f"{same}/{len(records)} identical"))


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    hf, train, evaluation = build_inputs()
    pth, meg, sft = OUT / "base-pth", OUT / "base-tp2-pp2", OUT / "sft"
    step("convert hf2pth", megallama("convert", "hf2pth", "--input-dir", str(hf), "--output-dir", str(pth)))
    step("convert pth2megatron --tp 2 --pp 2 (torch_dist)",
         megallama("convert", "pth2megatron", "--input-dir", str(pth), "--output-dir", str(meg), "--tp", "2",
                   "--pp", "2"))
    step("verify layer-diff (HF vs Megatron TP2xPP2)",
         megallama("verify", "layer-diff", "--reference", str(hf), "--megatron", str(meg),
                   "--json", str(OUT / "verify.json")))
    step(f"sft TP2xPP2, 4 CPU processes, {STEPS} steps",
         megallama("sft", "--config", str(ROOT / "configs/sft/tiny-cpu.yaml"), "--tp", "2", "--pp", "2",
                   f"load={meg}", f"data.train={train}", f"data.eval={evaluation}", "data.seq_length=96",
                   f"train.steps={STEPS}", "train.micro_batch_size=4", "train.global_batch_size=16",
                   "train.lr=3e-3", "train.min_lr=3e-4", f"train.warmup_steps={max(1, STEPS // 10)}",
                   "train.log_interval=10", f"train.eval_interval={max(1, STEPS // 4)}", "train.eval_steps=4",
                   f"train.save_interval={STEPS}",
                   f"output={sft}"))
    step("convert megatron2pth", megallama("convert", "megatron2pth", "--input-dir", str(sft),
                                           "--output-dir", str(OUT / "sft-pth")))
    step("convert pth2hf", megallama("convert", "pth2hf", "--input-dir", str(OUT / "sft-pth"),
                                     "--output-dir", str(OUT / "sft-hf")))
    records = [json.loads(line) for line in evaluation.read_text().splitlines()[:6]]
    prompts = OUT / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r.get("input", "")}) + "\n"
                               for r in records))
    step("generate (megatron-core, TP2xPP2, greedy)",
         megallama("generate", "--megatron", str(sft), "--prompts", str(prompts), "--max-new-tokens", "12",
                   "--json", str(OUT / "answers.json")))
    answers = json.loads((OUT / "answers.json").read_text())
    generations = [(f"{r['instruction']} {r.get('input', '')}".strip(), a["completion"].strip(), r["output"])
                   for r, a in zip(records, answers, strict=True)]
    correct = sum(said == want for _, said, want in generations)
    summary[-1] = (*summary[-1][:2], f"{correct}/{len(generations)} exact")
    start = time.perf_counter()
    same = sum(a["completion"] == h for a, h in zip(answers, hf_generate(OUT / "sft-hf", records), strict=True))
    summary.append(("same answers from transformers (exported HF)", time.perf_counter() - start,
                    f"{same}/{len(records)} identical"))
    lora_run = lora_leg(meg, train, prompts)
    peft_leg(lora_run, hf, records)
    metrics = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    console.rule("[bold]done")
    print_summary(generations)
    print(f"train loss {train_losses[0]:.3f} -> {train_losses[-1]:.3f}; "
          f"eval loss {evals[0]:.3f} -> {evals[-1]:.3f}" if evals else "")
    verdict = json.loads((OUT / "verify.json").read_text())["verdict"]
    print(f"verify verdict: {verdict}")
    print(f"loss curve: {sft / 'loss.png'}")


if __name__ == "__main__":
    main()
