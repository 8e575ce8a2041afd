"""`megallama verify ...` (placeholder until built)."""

import typer

app = typer.Typer(help="Prove a Megatron checkpoint computes what the original computes. Docs: README.md#verify",
                  no_args_is_help=True, rich_markup_mode=None)


@app.command("layer-diff", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def layer_diff() -> None:
    """Not built yet: exits 2."""
    print("megallama verify layer-diff is not built yet")
    raise typer.Exit(2)
