"""verify layer-diff: run the Megatron checkpoint and its source model on the same tokens, compare every layer.

Points compared, in model order (both sides as [batch, seq, features], logits cut to the true vocab):

    embedding -> layers.{i}.attention -> layers.{i}.mlp -> layers.{i} (i = 0 .. L-1) -> final_norm -> logits

The Megatron side runs under torchrun at the checkpoint's own TP x PP (`verify_worker.py`); the reference (HF
transformers or the Meta-style `MetaReference`) runs in this process *after* the workers have exited, so peak
memory is max(one rank's shards, the reference), never the sum. Library code: returns a `LayerDiffReport`.

Example:
    report = layer_diff(Path("llama-2-7b-hf"), Path("llama-2-7b-tp2-pp2"))
    report.verdict, report.first_diverging_layer   # "PASS", None
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from megallama.errors import InputError, MegallamaError
from megallama.spec import normalize_dtype
from megallama.verify.data import Job, prepare

OnStage = Callable[[str], None]  # progress messages for the CLI (the library never prints)
OnProgress = Callable[[str, int, int], None]  # (what, done, total): "workers", "forward", "layers"


# ---------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """How far Megatron may be from the reference at one point, relative to the reference's own scale.

    A point passes when max|m - r| <= (atol + max_rel * max|r|) * g and ||m - r|| / ||r|| <= l2_rel * g, where
    g = sqrt(1 + depth) and depth = the number of transformer layers the signal has passed: both sides round
    independently at every layer and the residual stream carries the error on, which adds up like a random walk
    (measured on the tiny fixtures: the layer-output error grows as sqrt(depth)). docs/verify.md has the numbers.
    """

    max_rel: float  # worst element, relative to the largest reference magnitude at that point
    l2_rel: float  # whole-tensor relative error
    atol: float  # floor for points whose reference is ~0
    loss: float  # |loss_megatron - loss_reference| in nats, judged when every point passed

    def limits(self, scale: float, depth: int) -> tuple[float, float]:
        g = math.sqrt(1.0 + depth)
        return (self.atol + self.max_rel * scale) * g, self.l2_rel * g


BF16_U, FP16_U = 2.0**-8, 2.0**-11  # unit roundoff: 8 and 11 significant bits
TOLERANCES = {
    # fp32: the same maths in a different order (fused QKV/fc1, baddbmm, sin/cos vs complex rotary): rounding
    # only, measured <= 1e-6 relative at every point; 1e-5 keeps 8x+ headroom, and real bugs sit at 1e-4 .. 1.
    "float32": Tolerance(max_rel=1e-5, l2_rel=1e-5, atol=1e-6, loss=1e-5),
    # bf16 / fp16: every matmul and norm output is rounded to the format on each side, differently. Measured
    # l2 error ~3.4u after one layer, ~6.6u after four; worst element ~12u at the logits. Limits are 10u / 20u
    # (times sqrt(1 + depth)), about 3-4x above what correct conversions show.
    "bfloat16": Tolerance(max_rel=20 * BF16_U, l2_rel=10 * BF16_U, atol=1e-3, loss=2e-2),
    "float16": Tolerance(max_rel=20 * FP16_U, l2_rel=10 * FP16_U, atol=1e-4, loss=4e-3),
}


# ---------------------------------------------------------------- results
@dataclass
class PointDiff:
    """One compared point: differences of Megatron vs reference, and whether they are within tolerance."""

    name: str
    max_abs: float
    mean_abs: float
    rel_err: float  # ||m - r|| / ||r||
    cosine: float
    scale: float  # max|r|
    limit: float  # allowed max_abs
    rel_limit: float  # allowed rel_err
    ok: bool


@dataclass
class LayerDiffReport:
    """Everything `verify layer-diff` found; `to_json()` is the DESIGN.md contract (plus extra fields)."""

    verdict: str
    dtype: str
    tp: int
    pp: int
    points: list[PointDiff]
    top1_agreement: float
    top5_agreement: float
    loss_reference: float | None
    loss_megatron: float | None
    first_diverging_layer: int | None
    diverged_in: str | None  # embedding | attention | mlp | layer_output | final_norm | logits | loss
    first_failing_point: str | None
    reference: str
    megatron: str
    tokens: str  # where the token batch came from
    batch: int
    seq_len: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @property
    def max_abs_logits_diff(self) -> float:
        return next(p.max_abs for p in self.points if p.name == "logits")

    def to_json(self) -> dict:
        loss = None
        if self.loss_reference is not None:
            loss = {"reference": self.loss_reference, "megatron": self.loss_megatron}
        return {
            "verdict": self.verdict, "dtype": self.dtype, "tp": self.tp, "pp": self.pp,
            "max_abs_logits_diff": self.max_abs_logits_diff, "top1_agreement": self.top1_agreement,
            "top5_agreement": self.top5_agreement, "first_diverging_layer": self.first_diverging_layer,
            "diverged_in": self.diverged_in, "first_failing_point": self.first_failing_point,
            "layers": [asdict(p) for p in self.points], "loss": loss,
            "tolerances": asdict(TOLERANCES[self.dtype]), "reference": self.reference, "megatron": self.megatron,
            "tokens": {"source": self.tokens, "batch": self.batch, "seq_len": self.seq_len},
            "seconds": round(self.seconds, 3), "notes": self.notes,
        }


# ---------------------------------------------------------------- comparison maths
def compare_point(name: str, ref: torch.Tensor, meg: torch.Tensor, tol: Tolerance, depth: int,
                  chunk: int = 1 << 22) -> PointDiff:
    """Differences of one point. Sums run in float64 (the statistics add no rounding of their own) over chunks,
    so long sequences x a 128k vocab of logits never need a float64 copy of the whole tensor."""
    if ref.shape != meg.shape:
        raise InputError(f"{name}: Megatron produced shape {tuple(meg.shape)}, the reference {tuple(ref.shape)}")
    r_all, m_all = ref.reshape(-1), meg.reshape(-1)
    # max|d|, max|r|, sum|d|, sum d^2, sum r^2, sum m^2, sum r*m; torch.maximum keeps a NaN once it appears
    acc = torch.zeros(7, dtype=torch.float64)
    for start in range(0, r_all.numel(), chunk):
        r, m = r_all[start:start + chunk].double(), m_all[start:start + chunk].double()
        d = (m - r).abs()
        part = torch.stack([d.max(), r.abs().max(), d.sum(), d.square().sum(), r.square().sum(), m.square().sum(),
                            (r * m).sum()])
        acc[:2] = torch.maximum(acc[:2], part[:2])
        acc[2:] += part[2:]
    max_abs, scale, sum_abs, sum_d2, sum_r2, sum_m2, dot = acc.tolist()
    mean_abs = sum_abs / max(r_all.numel(), 1)
    rel_err = math.sqrt(sum_d2) / max(math.sqrt(sum_r2), 1e-30)
    cosine = dot / max(math.sqrt(sum_r2) * math.sqrt(sum_m2), 1e-30)
    limit, rel_limit = tol.limits(scale, depth)
    ok = bool(max_abs <= limit and rel_err <= rel_limit)  # NaN compares False: a NaN never passes
    return PointDiff(name, max_abs, mean_abs, rel_err, cosine, scale, limit, rel_limit, ok)


def point_names(num_layers: int) -> list[tuple[str, int]]:
    """(point, depth) in model order; depth = number of transformer layers the signal has passed."""
    names = [("embedding", 0)]
    for i in range(num_layers):
        names += [(f"layers.{i}.attention", i + 1), (f"layers.{i}.mlp", i + 1), (f"layers.{i}", i + 1)]
    return names + [("final_norm", num_layers), ("logits", num_layers)]


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross-entropy of predicting token t+1 from position t, over the whole batch."""
    vocab = logits.shape[-1]
    return float(F.cross_entropy(logits[:, :-1].double().reshape(-1, vocab), tokens[:, 1:].reshape(-1)))


def topk_agreement(ref: torch.Tensor, meg: torch.Tensor, k: int) -> float:
    """Mean overlap of the two sides' top-k next-token sets (k=1: the fraction of equal argmaxes)."""
    top_r = ref.float().topk(k, dim=-1).indices  # [b, s, k]
    top_m = meg.float().topk(k, dim=-1).indices
    overlap = (top_r.unsqueeze(-1) == top_m.unsqueeze(-2)).any(-1).sum(-1)  # [b, s]
    return float(overlap.double().mean() / k)


def locate(points: Sequence[PointDiff]) -> tuple[int | None, str | None, str | None]:
    """(first_diverging_layer, diverged_in, point) of the first point out of tolerance; Nones when all pass.

    A divergence after the last layer (final_norm, logits) has no layer index: first_diverging_layer is None.
    """
    for p in points:
        if p.ok:
            continue
        if p.name == "embedding":
            return -1, "embedding", p.name
        if p.name.startswith("layers."):
            parts = p.name.split(".")
            return int(parts[1]), parts[2] if len(parts) > 2 else "layer_output", p.name
        return None, p.name, p.name
    return None, None, None


def compare(ref: dict[str, torch.Tensor], meg: dict[str, torch.Tensor], *, num_layers: int, vocab_size: int,
            tokens: torch.Tensor, dtype: str, on_progress: OnProgress | None = None) -> tuple[list[PointDiff], dict]:
    """Compare every point; return the point diffs and the next-token statistics."""
    tol = TOLERANCES[dtype]
    missing = [n for n, _ in point_names(num_layers) if n not in ref or n not in meg]
    if missing:
        raise MegallamaError(f"captures are missing {', '.join(missing[:4])}: internal error in verify")
    ref = {**ref, "logits": ref["logits"][..., :vocab_size]}
    meg = {**meg, "logits": meg["logits"][..., :vocab_size]}  # padding columns are not part of the model
    names = point_names(num_layers)
    points = []
    for n, depth in names:
        points.append(compare_point(n, ref[n], meg[n], tol, depth))
        if on_progress is not None:
            on_progress("layers", len(points), len(names))
    stats = {
        "top1": topk_agreement(ref["logits"], meg["logits"], 1),
        "top5": topk_agreement(ref["logits"], meg["logits"], min(5, vocab_size)),
        "loss_reference": next_token_loss(ref["logits"], tokens),
        "loss_megatron": next_token_loss(meg["logits"], tokens),
    }
    return points, stats


# ---------------------------------------------------------------- the two sides
def run_megatron(jobs: Sequence[Job], *, dtype: str, workdir: Path,
                 on_progress: OnProgress | None = None) -> list[dict[str, torch.Tensor]]:
    """Captures of every job's Megatron forward, in as few torchrun launches as possible: when every job's
    TP x PP x EP divides the largest, all run in one launch of that size (the worker re-splits the world between
    jobs; smaller splits run as identical data-parallel replicas), else one launch per world size."""
    from megallama.engine.launch import stream_torchrun
    from megallama.verify.worker import parse_progress

    worlds = [job.tp * job.pp * job.ep for job in jobs]
    largest = max(worlds)
    groups: dict[int, list[int]] = {}
    for n, world in enumerate(worlds):
        groups.setdefault(largest if largest % world == 0 else world, []).append(n)
    results: list[dict] = [{} for _ in jobs]
    for world, members in groups.items():
        specs = []
        for n in members:
            job, out = jobs[n], workdir / f"job{n}"
            tp, pp, ep = job.tp, job.pp, job.ep
            out.mkdir(parents=True)
            torch.save(jobs[n].tokens, out / "tokens.pt")
            specs.append({"spec": job.spec.to_dict(), "tp": tp, "pp": pp, "padded_vocab_size": job.padded_vocab_size,
                          "rotary_interleaved": job.rotary_interleaved, "rank_files": job.rank_files,
                          "layout": job.layout, "megatron": str(job.megatron), "ep": ep,
                          "engine_overrides": job.engine_overrides, "adapters": job.adapters,
                          "model_config": job.model_config,
                          "tokens": str(out / "tokens.pt"), "out": str(out)})
        job_file = workdir / f"jobs-world{world}.json"
        job_file.write_text(json.dumps({"dtype": dtype, "jobs": specs}))
        if on_progress is not None:
            on_progress("workers", 0, world)
        returncode, tail = stream_torchrun(["-m", "megallama.verify.worker", str(job_file)], nproc=world,
                                           on_line=lambda line: parse_progress(line, on_progress))
        for n in members:
            _raise_worker_error(workdir / f"job{n}")
        if returncode != 0:
            splits = {(jobs[n].tp, jobs[n].pp) for n in members}
            label = "TP={}, PP={}".format(*splits.pop()) if len(splits) == 1 else f"{world} processes"
            raise MegallamaError(f"Megatron workers ({label}) exited with {returncode}: "
                                 + " | ".join(tail[-3:]))
        for n in members:
            for f in sorted((workdir / f"job{n}").glob("capture-*.pt")):
                results[n].update(torch.load(f, map_location="cpu", weights_only=True))
    return results


def _raise_worker_error(out: Path) -> None:
    path = out / "error.json"
    if path.is_file():
        error = json.loads(path.read_text())
        cls = InputError if error.get("exit_code") == 2 else MegallamaError
        e = cls(error["message"])
        e.detail = error.get("traceback")
        raise e


def reference_captures(job: Job, *, dtype: str) -> dict[str, torch.Tensor]:
    """Run the reference model on the job's tokens; every point as [b, s, ...] in the requested dtype."""
    from megallama.verify.data import hf_captures, meta_captures

    if job.reference_adapter is not None:
        return hf_captures(job.reference, job.tokens, dtype=dtype, adapter=Path(job.reference_adapter))
    run = hf_captures if job.reference_format == "hf" else meta_captures
    return run(job.reference, job.tokens, dtype=dtype)


# ---------------------------------------------------------------- the whole check
def layer_diff(reference: Path, megatron: Path, *, data: Path | None = None, seq_len: int = 64, batch: int = 2,
               dtype: str = "float32", on_stage: OnStage | None = None,
               on_progress: OnProgress | None = None, model_config: Path | None = None) -> LayerDiffReport:
    """Compare `megatron` with `reference` layer by layer; raises InputError for bad input (exit 2).
    `model_config` (--model-config) gives the architecture a Megatron checkpoint's args lack."""
    return layer_diff_many([(reference, megatron)], data=data, seq_len=seq_len, batch=batch, dtype=dtype,
                           on_stage=on_stage, on_progress=on_progress, model_configs=[model_config])[0]


def layer_diff_many(pairs: Sequence[tuple[Path, Path]], *, data: Path | None = None, seq_len: int = 64,
                    batch: int = 2, dtype: str = "float32", on_stage: OnStage | None = None,
                    on_progress: OnProgress | None = None,
                    engine_overrides: Sequence[dict | None] | None = None,
                    model_configs: Sequence[Path | None] | None = None) -> list[LayerDiffReport]:
    """`layer_diff` for several pairs; pairs with the same TP x PP share one torchrun launch (tests, sweeps).

    `engine_overrides` (one per pair, tests only) are passed to the workers' `build_gpt_model`: the negative
    controls break the Megatron model on purpose and expect FAIL at the right layer. `model_configs` (one per
    pair, or None) are the pairs' --model-config."""
    dtype = normalize_dtype(dtype)
    stage = on_stage or (lambda message: None)
    start = time.perf_counter()
    adapter_dir = tempfile.TemporaryDirectory(prefix="megallama-verify-peft-")
    try:
        configs = list(model_configs or [None] * len(pairs))
        jobs = [prepare_pair(r, m, data=data, seq_len=seq_len, batch=batch, model_config=config,
                             adapter_dir=Path(adapter_dir.name) / str(n))
                for n, ((r, m), config) in enumerate(zip(pairs, configs, strict=True))]
        for job, overrides in zip(jobs, engine_overrides or [None] * len(jobs), strict=True):
            job.engine_overrides = overrides or {}
        return _layer_diff_jobs(jobs, dtype=dtype, stage=stage, start=start, on_progress=on_progress)
    finally:
        adapter_dir.cleanup()


def prepare_pair(reference: Path, megatron: Path, *, data, seq_len: int, batch: int, adapter_dir: Path,
                 model_config: Path | None = None) -> Job:
    """`prepare`, and for a LoRA/DoRA run: the Megatron side is its base plus its adapters (applied unmerged),
    the reference side the HF reference with the run's adapters exported as an HF PEFT folder, applied by peft."""
    from megallama.peft.store import checked_base, is_peft_run

    if not is_peft_run(megatron):
        return prepare(reference, megatron, data=data, seq_len=seq_len, batch=batch, model_config=model_config)
    from megallama.peft.hf_adapter import export_run

    base, record = checked_base(megatron)
    job = prepare(reference, base, data=data, seq_len=seq_len, batch=batch)
    if job.reference_format != "hf":
        raise InputError(f"{megatron} is a {record.method} run: verify it against an HF reference of its base "
                         "(peft applies the adapters there), not a Meta folder")
    export_run(megatron, adapter_dir)
    job.adapters, job.reference_adapter = str(Path(megatron).resolve()), str(adapter_dir)
    job.notes.append(f"{record.method} run {megatron}: Megatron = base {base} + adapters (unmerged); reference = "
                     f"{reference} + the same adapters exported as HF PEFT, applied by peft")
    return job


def _layer_diff_jobs(jobs: list[Job], *, dtype: str, stage, start: float,
                     on_progress: OnProgress | None) -> list[LayerDiffReport]:
    for job in jobs:
        stage(f"Megatron: TP={job.tp} x PP={job.pp} on {job.tp * job.pp} processes, {dtype}, "
              f"tokens [{job.tokens.shape[0]}, {job.tokens.shape[1]}] from {job.token_source}")
    with tempfile.TemporaryDirectory(prefix="megallama-verify-") as tmp:
        megatron_caps = run_megatron(jobs, dtype=dtype, workdir=Path(tmp), on_progress=on_progress)
    reports = []
    for job, meg in zip(jobs, megatron_caps, strict=True):
        stage(f"reference: {job.reference} ({'transformers' if job.reference_format == 'hf' else 'Meta-style'})")
        ref = reference_captures(job, dtype=dtype)  # after the workers exited: peak = max, not sum
        reports.append(build_report(job, ref, meg, dtype=dtype, on_progress=on_progress))
        del ref
    elapsed = time.perf_counter() - start
    for report in reports:
        report.seconds = elapsed / len(reports)
    return reports


def build_report(job: Job, ref: dict, meg: dict, *, dtype: str,
                 on_progress: OnProgress | None = None) -> LayerDiffReport:
    """Compare, then judge: FAIL at the first point out of tolerance, or when the losses disagree."""
    points, stats = compare(ref, meg, num_layers=job.spec.num_layers, vocab_size=job.spec.vocab_size,
                            tokens=job.tokens, dtype=dtype, on_progress=on_progress)
    layer, where, point = locate(points)
    loss_gap = abs(stats["loss_megatron"] - stats["loss_reference"])
    if point is None and not loss_gap <= TOLERANCES[dtype].loss:
        where, point = "loss", "loss"
    return LayerDiffReport(
        verdict="PASS" if point is None else "FAIL", dtype=dtype, tp=job.tp, pp=job.pp, points=points,
        top1_agreement=stats["top1"], top5_agreement=stats["top5"], loss_reference=stats["loss_reference"],
        loss_megatron=stats["loss_megatron"], first_diverging_layer=layer, diverged_in=where,
        first_failing_point=point, reference=str(job.reference), megatron=str(job.megatron),
        tokens=job.token_source, batch=job.tokens.shape[0], seq_len=job.tokens.shape[1], notes=job.notes)


def write_json(report: LayerDiffReport, path: Path) -> None:
    """The report as JSON; NaN/inf (a broken run) become null, since JSON has no such numbers."""

    def clean(obj):
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # a reader never sees half a report
    try:
        tmp.write_text(json.dumps(clean(report.to_json()), indent=2) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)

