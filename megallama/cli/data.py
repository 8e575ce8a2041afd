"""`megallama data prepare`: tokenize a dataset once into Megatron's PREFIX.bin/.idx. Docs: docs/data.md."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from megallama.cli.common import err, handle_errors, human_bytes, out

app = typer.Typer(help="Prepare datasets for sft and Megatron-LM: .bin/.idx with loss masks.  Docs: docs/data.md",
                  no_args_is_help=True, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})


@app.command("prepare", no_args_is_help=True)
@handle_errors
def prepare_command(
    source: str = typer.Option(..., "--input", "-i", help="JSON/JSONL, Parquet or Arrow file, a folder of them, or a "
                                                         "Hub dataset id (owner/name)."),
    fmt: str = typer.Option(..., "--format", "-f", help="alpaca, messages, sharegpt, text or pretokenized."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer.model, or a tokenizer / checkpoint "
                                                                  "folder (the one the model was converted with)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output prefix: writes PREFIX.bin, PREFIX.idx, "
                                                            "PREFIX_mask.bin/.idx (SFT formats) and PREFIX.json."),
    split: str = typer.Option("train", "--split", help="Split of a Parquet/Arrow folder or Hub dataset."),
    seq_length: int = typer.Option(None, "--seq-length", "--seq_length",
                                   help="Cut SFT samples to seq_length + 1 tokens (as sft does); default: keep all."),
    workers: int = typer.Option(None, "--workers", help="Tokenizing processes (default: all cores)."),
    chat_template: bool = typer.Option(None, "--chat-template/--no-chat-template",
                                       help="messages: use the tokenizer's chat template for the layout and the "
                                            "assistant masks (default: when the tokenizer has one, as sft does)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing prepared PREFIX."),
    json_out: Path = typer.Option(None, "--json", help="Also write the summary as JSON to this file."),
) -> None:
    """Tokenize, template and mask a dataset into megatron-core's indexed format, in parallel and streaming.

    One sequence per sample in PREFIX.bin/.idx (what Megatron-LM's --data-path and `sft data.format=megatron`
    read), loss masks in PREFIX_mask.bin/.idx, provenance in PREFIX.json.

    \b
    Examples:
      megallama data prepare --input train.jsonl --format alpaca --tokenizer runs/llama-tp1 --output data/alpaca
      megallama data prepare --input HuggingFaceH4/ultrachat_200k --split train_sft --format messages \\
          --tokenizer meta-llama-3-8b-instruct/ --chat-template --output data/ultrachat --seq-length 4096
      megallama data prepare --input corpus.parquet --format text --tokenizer runs/llama-tp1 --output data/corpus

    Docs: docs/data.md
    """
    from megallama.data.prepare import prepare

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[stats]}"),
                        TimeElapsedColumn(), console=err, disable=not err.is_terminal, transient=True)
    with progress:
        task = progress.add_task("preparing", stats="")
        state = {"start": None}

        def on_progress(records: int, tokens: int) -> None:
            import time

            now = time.perf_counter()
            start = state["start"] = state["start"] or now
            seconds = max(now - start, 1e-9)
            progress.update(task, stats=f"{records:,} records ({records / seconds:,.0f}/s), "
                                        f"{tokens:,} tokens ({tokens / seconds:,.0f}/s)")

        report = prepare(source, fmt=fmt, tokenizer=tokenizer, output=output, split=split, seq_length=seq_length,
                         workers=workers, chat_template=chat_template, overwrite=overwrite, on_progress=on_progress)
    print_summary(report)
    if json_out is not None:
        json_out.write_text(json.dumps(asdict(report), indent=2) + "\n")


def print_summary(report) -> None:
    table = Table(title="megallama data prepare", show_header=False, title_justify="left")
    rate = report.seconds or 1e-9
    rows = [("output", Text(report.prefix, overflow="fold")),
            ("files", Text(", ".join(Path(f).name for f in report.files))),
            ("records", f"{report.records:,}"),
            ("samples", f"{report.samples:,}"),
            ("tokens", f"{report.tokens:,} ({report.loss_tokens:,} with loss)"),
            ("truncated", f"{report.truncated:,}"),
            ("dropped", ", ".join(f"{n:,} {why}" for why, n in sorted(report.dropped.items())) or "0"),
            ("throughput", f"{report.records / rate:,.0f} records/s, {report.tokens / rate:,.0f} tokens/s with "
                           f"{report.workers} worker(s), {report.seconds:.1f} s (+ {report.startup_seconds:.1f} s "
                           f"start-up); the reading/writing process used {report.main_cpu_seconds / rate:.0%} of a "
                           f"core"),
            ("peak RSS", human_bytes(report.peak_rss) + " (this process)")]
    for key, value in rows:
        table.add_row(key, value)
    total = max(report.samples, 1)
    for low, high, count in report.histogram:
        table.add_row(f"length {low}-{high - 1}", f"{count:,} ({count / total:.1%}) " + "#" * round(40 * count / total))
    out.print(table)
    sys.stdout.flush()
