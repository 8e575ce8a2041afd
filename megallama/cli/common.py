"""Shared CLI plumbing: one-line errors with the contract's exit codes, progress bars, summaries."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from megallama.errors import MegallamaError

out = Console()  # results
err = Console(stderr=True)  # progress, messages, errors


def fail(message: str, code: int = 2) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the contract's exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MegallamaError as e:
            fail(str(e), e.exit_code)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # an unexpected failure: still one line, traceback on request
            if os.environ.get("MEGALLAMA_DEBUG"):
                raise
            fail(f"{type(e).__name__}: {e} (set MEGALLAMA_DEBUG=1 for a traceback)", 1)

    return wrapper


@contextlib.contextmanager
def byte_progress(description: str, total_bytes: int | None = None) -> Iterator[Callable[[str, int], None]]:
    """A rich progress bar over tensor bytes; yields the `on_tensor(name, nbytes)` callback.

    The callback's `set_total(nbytes)` sizes the bar once the total is known (after the input is opened).
    """
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[name]}"), console=err,
                        disable=not sys.stderr.isatty(), transient=True)
    with progress:
        task = progress.add_task(description, total=total_bytes, name="")

        def on_tensor(name: str, nbytes: int) -> None:
            progress.update(task, advance=nbytes, name=name)

        on_tensor.set_total = lambda nbytes: progress.update(task, total=nbytes)
        yield on_tensor


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.2f} TB"


def print_write_report(title: str, report) -> None:
    """The summary every converter prints: bytes, seconds, GB/s, peak RSS."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_row("output", Text(str(report.output)))
    table.add_row("files", Text(", ".join(report.files) if len(report.files) <= 6 else f"{len(report.files)} files"))
    table.add_row("read", human_bytes(report.bytes_read))
    table.add_row("written", human_bytes(report.bytes_written))
    table.add_row("time", f"{report.seconds:.2f} s")
    table.add_row("throughput", f"{report.gb_per_s:.3f} GB/s (read + written)")
    table.add_row("peak RSS", human_bytes(report.peak_rss))
    for note in report.notes:
        table.add_row("note", Text(note))
    out.print(table)


STEP_LABELS = {"workers": "workers started", "tokens": "tokens generated", "prompts": "prompts done",
               "layers": "points compared"}


@contextlib.contextmanager
def step_progress(labels: dict[str, str] | None = None) -> Iterator[Callable[[str, int, int], None]]:
    """Progress for `on_progress(what, done, total)` callbacks: one rich bar per `what` on a terminal, plain
    lines on stderr otherwise (one when each `what` completes, so logs stay short)."""
    labels = {**STEP_LABELS, **(labels or {})}
    tty = err.is_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeRemainingColumn(), console=err, disable=not tty, transient=True)
    tasks: dict[str, int] = {}
    finished: set[str] = set()

    def on_progress(what: str, done: int, total: int) -> None:
        label = labels.get(what, what)
        if tty:
            if what not in tasks:
                tasks[what] = progress.add_task(label, total=total)
            progress.update(tasks[what], completed=done, total=total)
        elif done >= total and (what, total) not in finished:
            finished.add((what, total))
            err.print(f"{label}: {done}/{total}", highlight=False, markup=False)

    with progress:
        yield on_progress
