"""Shared CLI plumbing: one-line errors with the contract's exit codes, signals, progress bars, summaries.

Exit codes (docs/operations.md#exit-codes): 0 success, 1 failed check or verdict, 2 bad input (usage errors too),
3 internal error; 130 / 143 / 129 after SIGINT / SIGTERM / SIGHUP.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from megallama.errors import INTERNAL_ERROR, InputError, MegallamaError

out = Console()  # results
err = Console(stderr=True)  # progress, messages, errors

# OS errors a user fixes (a path, a permission, a full disk): bad input, exit 2. Any other OSError is ours (3).
# EFBIG: a file grew past the file-size limit (ulimit -f, RLIMIT_FSIZE) or the file system's largest file.
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                  errno.EISDIR, errno.ENAMETOOLONG, errno.EBUSY, errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY,
                  errno.EXDEV}
# --model-config, the same on every command that reads a Megatron checkpoint (convert, verify, generate, inspect)
MODEL_CONFIG_HELP = ("HF config.json, Meta params.json, a folder with one, or an HF Hub id: the architecture of a "
                     "torch-format checkpoint whose args lack it (the Megatron-LLaMA fork, alibaba). Docs: "
                     "docs/trust.md")
ModelConfig = Annotated[Path | None, typer.Option("--model-config", help=MODEL_CONFIG_HELP)]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # all unwind like Ctrl-C, clean up staging


def error_line(message: str) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    error_line(message)
    raise typer.Exit(code)


def os_error_message(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}: check the path, its permissions and free space"


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the contract's exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            if _Interrupted.signum is not None:  # whatever the interrupt turned into on its way out (torch's zip
                raise KeyboardInterrupt from e  # writer raises RuntimeError over it): reported as the interrupt
            return _map_error(e)

    return wrapper


# torch's zip writer raises these over a failed write (a Python file's OSError, e.g. inside DCP's .distcp writes)
ZIP_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos")


def _os_cause(e: BaseException) -> OSError | None:
    """The user-facing OSError (full disk, file-size limit) a torch zip-writer RuntimeError was raised over."""
    if not isinstance(e, RuntimeError) or not any(m in str(e) for m in ZIP_WRITE_FAILED):
        return None
    seen, cause = 0, e.__cause__ or e.__context__
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and cause.errno in USER_OS_ERRORS:
            return cause
        seen, cause = seen + 1, cause.__cause__ or cause.__context__
    return None


def _map_error(e: BaseException) -> None:
    """The one line and exit code of an exception that was not caused by an interrupt."""
    e = _os_cause(e) or e
    try:
        raise e
    except MegallamaError as e:
        if e.detail and os.environ.get("MEGALLAMA_DEBUG"):
            sys.stderr.write(e.detail)  # the worker's traceback, where the internal error really happened
        fail(str(e), e.exit_code)
    except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
        raise
    except OSError as e:
        if e.errno not in USER_OS_ERRORS or os.environ.get("MEGALLAMA_DEBUG"):
            return _internal(e)
        fail(os_error_message(e), InputError.exit_code)
    except UnicodeDecodeError as e:  # a binary file where text was expected
        fail(f"a file is not UTF-8 text ({e.reason} at byte {e.start}): pass a text file", InputError.exit_code)
    except Exception as e:  # an unexpected failure: still one line, traceback on request
        return _internal(e)


def _internal(e: Exception) -> None:
    if os.environ.get("MEGALLAMA_DEBUG"):
        raise e
    fail(f"internal error: {type(e).__name__}: {e} (set MEGALLAMA_DEBUG=1 for a traceback)", INTERNAL_ERROR)


class _Interrupted:
    signum: int | None = None


def _stop(signum, frame) -> None:
    _Interrupted.signum = signum
    raise KeyboardInterrupt  # unwinds like Ctrl-C: staged output is removed on the way out


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt for the duration of one command, and are remembered:
    whatever exception then unwinds the command is reported as the interrupt (`handle_errors`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Interrupted.signum = None
    old = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class OneLineErrors(TyperGroup):
    """The root command group: usage errors in one line (exit 2), signals unwound, codes per the contract.

    Click prints a usage error as a 4-line block; this catches it (by its attributes: Typer bundles its own
    Click, which megallama never imports) and prints `error: MESSAGE (see: COMMAND -h)`.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        with stop_signals_interrupt():
            try:
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except Exception as e:
                code = 130 if _Interrupted.signum is not None else _usage_error(e)
            except KeyboardInterrupt:  # raised outside a command (Typer turns those into exit 130)
                code = 130
        if code == 130:
            signum = _Interrupted.signum or signal.SIGINT
            error_line(f"interrupted by {signal.Signals(signum).name}")
            code = 128 + signum
        code = code if isinstance(code, int) else 0
        if not standalone_mode:
            return code
        sys.exit(code)


def _usage_error(e: Exception) -> int:
    if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
        if e.__class__.__name__ == "Abort":
            error_line("aborted")
            return 1
        raise e
    if e.__class__.__name__ == "NoArgsIsHelpError":  # a bare group or command: its help, as Click does
        e.show()
        return e.exit_code
    ctx = getattr(e, "ctx", None)
    hint = f" (see: {ctx.command_path} -h)" if ctx is not None else ""
    error_line(" ".join(e.format_message().split()) + hint)
    return e.exit_code


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
    table.add_row("output", Text(str(report.output), overflow="fold"))
    table.add_row("files", Text(", ".join(report.files) if len(report.files) <= 6 else f"{len(report.files)} files"))
    table.add_row("read", human_bytes(report.bytes_read))
    table.add_row("written", human_bytes(report.bytes_written))
    table.add_row("time", f"{report.seconds:.2f} s")
    table.add_row("throughput", f"{report.gb_per_s:.3f} GB/s (read + written)")
    table.add_row("peak RSS", human_bytes(report.peak_rss))
    for note in report.notes:
        table.add_row("note", Text(note, overflow="fold"))  # paths in full, never cut with an ellipsis
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
