"""`megallama inspect PATH`: what a checkpoint folder is. Docs: docs/operations.md#inspect."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from megallama.cli.common import ModelConfig, handle_errors, out


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    @handle_errors
    def inspect(
        path: Path = typer.Argument(..., help="An HF, Meta pth or Megatron (torch / torch_dist) checkpoint folder, "
                                              "or an HF Hub id (owner/name)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        layout: str = typer.Option(None, "--layout", help="Force a Megatron layout: mcore-local, mcore-te, legacy, "
                                                          "llama-fork or alibaba (default: detect from the keys)."),
        revision: str = typer.Option(None, "--revision", help="Branch, tag or commit when PATH is a Hub id."),
        model_config: ModelConfig = None,
    ) -> None:
        """Detect a checkpoint's format, ckpt format, Megatron layout, TP x PP, iteration, dtype, model, parameter
        count, true and padded vocab, tokenizer and optimizer state. Exit 2 if the folder is none of them. A
        checkpoint whose args lack the architecture (the Megatron-LLaMA fork) is described from its tensor shapes,
        the rest shown as unknown, unless --model-config gives it.

        \b
        Examples:
          megallama inspect runs/sft --json
          megallama inspect fork-ckpt --model-config llama-2-7b/params.json
        """
        from megallama.hub import resolve_model_config, resolve_model_path
        from megallama.inspect import inspect_checkpoint

        report = inspect_checkpoint(resolve_model_path(path, revision), layout=layout,
                                    model_config=resolve_model_config(model_config))
        if as_json:
            print(json.dumps(report.to_json(), indent=2))
            return
        table = Table(title=f"megallama inspect {path}", show_header=False, title_justify="left")
        data = report.to_json()
        spec = data.pop("spec")
        unknown = set(data.pop("unknown"))
        for key, value in data.items():
            if key in unknown:
                value = "unknown"
            if key == "notes" or value in (None, [], ""):
                continue
            if key == "num_parameters" and isinstance(value, int):
                value = f"{value:,}"
            if isinstance(value, dict):  # peft: its record on one line
                value = ", ".join(f"{k}={', '.join(v) if isinstance(v, list) else v}" for k, v in value.items())
            table.add_row(key, Text(", ".join(value) if isinstance(value, list) else str(value)))
        table.add_row("model", Text(", ".join(f"{k}={'unknown' if k in unknown else v}" for k, v in spec.items()
                                              if k not in ("dtype", "vocab_size")
                                              and (v is not None or k in unknown))))
        for note in report.notes:
            table.add_row("note", Text(note))
        out.print(table)
