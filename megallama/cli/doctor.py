"""`megallama doctor`: environment report and a TP=2 x PP=2 megatron-core smoke test. Docs: docs/operations.md."""

from __future__ import annotations

import typer
from rich.table import Table

from megallama.cli.common import err, handle_errors, out


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    @handle_errors
    def doctor(
        tp: int = typer.Option(2, "--tp", help="Tensor-parallel size of the smoke test."),
        pp: int = typer.Option(2, "--pp", help="Pipeline-parallel size of the smoke test."),
        skip_smoke: bool = typer.Option(False, "--skip-smoke", help="Only print the environment."),
    ) -> None:
        """Print versions, device and backend, then build a tiny GPTModel at TP x PP on TP*PP local processes
        and run one forward and backward through the pipeline schedule. Exit 0 on PASS, 1 on failure.

        Example: megallama doctor
        """
        from megallama.engine.doctor import environment, smoke_test

        table = Table(title="megallama doctor", show_header=False, title_justify="left")
        for key, value in environment():
            table.add_row(key, value)
        out.print(table)
        if skip_smoke:
            return
        err.print(f"smoke test: TP={tp} x PP={pp} on {tp * pp} local processes ...")
        result = smoke_test(tp, pp)
        lines = [ln for ln in (result.stdout or "").splitlines() if ln.startswith("smoke:")]
        if result.returncode == 0 and lines:
            out.print(f"{lines[-1]}\nPASS", highlight=False)
            return
        tail = "\n".join(((result.stdout or "") + (result.stderr or "")).strip().splitlines()[-15:])
        err.print(tail, highlight=False, markup=False)
        out.print(f"FAIL (exit code {result.returncode})")
        raise typer.Exit(1)
