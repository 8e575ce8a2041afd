"""`megallama sft` (placeholder until built)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("sft", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def sft() -> None:
        """Supervised fine-tuning on megatron-core. Not built yet: exits 2."""
        print("megallama sft is not built yet")
        raise typer.Exit(2)
