"""`megallama doctor` (placeholder until built)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor() -> None:
        """Check the environment. Not built yet: exits 2."""
        print("megallama doctor is not built yet")
        raise typer.Exit(2)
