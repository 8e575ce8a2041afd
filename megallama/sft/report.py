"""What rank 0 of an SFT run shows and keeps: metrics.jsonl, a rich progress bar (plain lines when not a TTY),
and loss.png with the train and eval curves. Only the recipe (train.py) uses it; the library never prints."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def read_metrics(output: Path) -> list[dict]:
    path = Path(output) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(output: Path) -> Path | None:
    """loss.png: train loss per logged step and eval loss at each eval (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output) / PLOT
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


class Reporter:
    """Rank 0's metrics file, progress and plot; a no-op object on the other ranks (`enabled=False`)."""

    def __init__(self, output: Path, *, steps: int, start_step: int, enabled: bool, cfg: dict | None = None):
        self.output, self.steps, self.start_step, self.enabled = Path(output), steps, start_step, enabled
        self.cfg, self.backends = cfg, []  # TensorBoard / W&B (loggers.py), opened on entry
        self.path = self.output / METRICS
        self.tty = sys.stderr.isatty()
        self.progress = self.task = None
        self.started = time.perf_counter()
        self.last: dict = {}
        if enabled:
            # Resuming keeps the records up to the checkpoint, so the curve continues as if never interrupted.
            kept = [r for r in read_metrics(self.output) if r["step"] <= start_step] if start_step else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def __enter__(self):
        if self.enabled:
            from megallama.sft.loggers import open_backends

            self.backends = open_backends(self.output, self.cfg, start_step=self.start_step)
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("sft"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  "
                                                "{task.fields[tps]} tok/s"), TimeRemainingColumn(),
                                     console=Console(stderr=True))
            self.progress.start()
            self.task = self.progress.add_task("sft", total=self.steps, completed=self.start_step, loss="-",
                                               lr="-", tps="-")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        for backend in self.backends:
            backend.close()
        self.backends = []

    def _scalars(self, step: int, scalars: dict[str, float]) -> None:
        for backend in self.backends:
            backend.log(step, scalars)

    def _append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def train(self, record: dict, *, log: bool) -> None:
        if not self.enabled:
            return
        self.last = record
        if log:
            from megallama.sft.loggers import train_scalars

            self._append(record)
            self._scalars(record["step"], train_scalars(record))
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], loss=f"{record['loss']:.4f}",
                                 lr=f"{record['lr']:.2e}", tps=f"{record['tokens_per_s']:,.0f}")
        elif log:
            done = record["step"] - self.start_step
            eta = (time.perf_counter() - self.started) / max(done, 1) * (self.steps - record["step"])
            norm = "-" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
            self.line(f"step {record['step']}/{self.steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                      f"grad_norm {norm} | {record['tokens_per_s']:,.0f} tok/s ({record['trained_tokens_per_s']:,.0f} "
                      f"trained, pad {record['pad_fraction']:.0%}) | eta {_duration(eta)}")

    def eval(self, step: int, loss: float, tokens: int) -> None:
        if self.enabled:
            self._append({"step": step, "eval_loss": loss, "eval_tokens": tokens})
            self._scalars(step, {"eval/loss": loss})
            self.line(f"eval at step {step}: loss {loss:.4f} over {tokens} tokens")

    def saved(self, step: int) -> None:
        if self.enabled:
            plot_losses(self.output)
            self.line(f"checkpoint iter_{step:07d} saved in {self.output}")

    def finish(self, output: Path) -> None:
        if not self.enabled:
            return
        plot_losses(output)
        if self.last:
            self.line(f"sft done: step {self.last['step']}, loss {self.last['loss']:.4f}, "
                      f"{_duration(time.perf_counter() - self.started)}; output in {output}")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
