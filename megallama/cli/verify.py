"""`megallama verify layer-diff`: is this Megatron checkpoint the same model as its source? Docs: docs/verify.md."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from megallama.cli.common import ModelConfig, err, handle_errors, out, step_progress

app = typer.Typer(help="Prove a Megatron checkpoint computes what the original computes. Docs: docs/verify.md",
                  no_args_is_help=True, rich_markup_mode=None)


@app.command("layer-diff")
@handle_errors
def layer_diff(
    reference: Path = typer.Option(..., "--reference", "--ref",
                                   help="Source model: HF folder (config.json), Meta pth folder (params.json) or "
                                        "an HF Hub id (owner/name)."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit when --reference is a Hub id."),
    megatron: Path = typer.Option(..., "--megatron", "--load",
                                  help="Megatron folder written by `convert pth2megatron` or `sft`."),
    data: Path = typer.Option(None, "--data", help="Text file to tokenize (default: a built-in English sample)."),
    seq_len: int = typer.Option(64, "--seq-len", "--seq_len", "--seq-length", help="Tokens per sequence."),
    batch: int = typer.Option(2, "--batch", help="Sequences in the batch."),
    dtype: str = typer.Option("fp32", "--dtype", help="Compute dtype of both sides: fp32 (exact check), bf16, fp16."),
    json_out: Path = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
    model_config: ModelConfig = None,
) -> None:
    """Run the Megatron checkpoint (at its own TP x PP, under torchrun) and the reference on the same tokens;
    compare the embedding, every layer's attention, MLP and output, the final norm and the logits.
    Exit 0 on PASS, 1 on FAIL, 2 on bad input, 3 on an internal error.

    \b
    Examples:
      megallama verify layer-diff --reference llama-2-7b-hf --megatron llama-2-7b-tp2-pp2
      megallama verify layer-diff --reference llama-2-7b --megatron runs/sft --dtype bf16 --json diff.json
      megallama verify layer-diff --reference meta-llama/Llama-2-7b-hf --megatron llama-2-7b-tp2-pp2
      megallama verify layer-diff --reference llama-7b --megatron fork-ckpt --model-config llama-7b/params.json
    """
    from megallama.hub import resolve_model_config, resolve_model_path
    from megallama.spec import normalize_dtype
    from megallama.staging import check_writable_file
    from megallama.verify.layer_diff import layer_diff as run
    from megallama.verify.layer_diff import write_json

    dtype = normalize_dtype(dtype)
    reference = resolve_model_path(reference, revision)
    model_config = resolve_model_config(model_config)
    if json_out is not None:
        check_writable_file(json_out)  # before the run, not after it
    with step_progress({"forward": "Megatron forward passes"}) as on_progress:
        report = run(reference, megatron, data=data, seq_len=seq_len, batch=batch, dtype=dtype,
                     on_stage=lambda message: err.print(message, highlight=False, markup=False),
                     on_progress=on_progress, model_config=model_config)
    print_report(report)
    if json_out is not None:
        write_json(report, json_out)
        err.print(f"wrote {json_out}", highlight=False)
    if not report.passed:
        raise typer.Exit(1)


def _fmt(x: float) -> str:
    return f"{x:.2e}"


def print_report(report) -> None:
    """The per-point table, then the verdict with its numbers."""
    table = Table(title=f"layer-diff  TP={report.tp} x PP={report.pp}  {report.dtype}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("point", "max abs", "mean abs", "rel err", "cosine", "limit", ""):
        table.add_column(column, justify="left" if column == "point" else "right", no_wrap=True,
                         min_width=4 if not column else None)
    for p in report.points:
        status = "ok" if p.ok else "[bold red]FAIL[/]"
        style = "bold" if p.name == report.first_failing_point else None
        table.add_row(p.name, _fmt(p.max_abs), _fmt(p.mean_abs), _fmt(p.rel_err), f"{p.cosine:.6f}", _fmt(p.limit),
                      status, style=style)
    out.print(table)
    summary = Table(show_header=False, title_justify="left")
    summary.add_row("logits max abs diff", _fmt(report.max_abs_logits_diff))
    summary.add_row("top-1 / top-5 agreement", f"{report.top1_agreement:.4f} / {report.top5_agreement:.4f}")
    if report.loss_reference is not None:
        summary.add_row("LM loss reference / Megatron", f"{report.loss_reference:.6f} / {report.loss_megatron:.6f}")
    summary.add_row("tokens", f"[{report.batch}, {report.seq_len}] from {report.tokens}")
    summary.add_row("time", f"{report.seconds:.1f} s")
    for note in report.notes:
        summary.add_row("note", note)
    out.print(summary, highlight=False)
    if report.passed:
        out.print("[bold green]PASS[/]: every point within the " + report.dtype + " tolerance")
        return
    where = {"embedding": "the embedding (first_diverging_layer -1)", "loss": "the LM loss (all points agree)",
             "final_norm": "the final norm (all layers agree)", "logits": "the logits (all layers agree)"}
    text = where.get(report.diverged_in) or (f"layer {report.first_diverging_layer}, {report.diverged_in} "
                                              f"({report.first_failing_point})")
    out.print(f"[bold red]FAIL[/]: first divergence at {text}", highlight=False)
