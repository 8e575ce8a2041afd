"""The `megallama` command: a thin Typer layer over the library (docs: README.md)."""

from __future__ import annotations

import typer

from megallama import __version__
from megallama.cli import convert, data, doctor, generate, inspect, sft, verify
from megallama.cli.common import OneLineErrors

app = typer.Typer(
    name="megallama",
    cls=OneLineErrors,
    help="LLaMA (1/2/3/3.1/3.2) weights <-> Megatron checkpoints at any TP x PP, verified layer by layer, "
    "fine-tuned on megatron-core.  Docs: README.md",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)
app.add_typer(convert.app, name="convert")
app.add_typer(verify.app, name="verify")
app.add_typer(data.app, name="data")
sft.register(app)
generate.register(app)
doctor.register(app)
inspect.register(app)


def _version(value: bool) -> None:
    if value:
        print(f"megallama {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """megallama: convert, verify and fine-tune LLaMA models on Megatron."""


def main() -> None:
    app()
