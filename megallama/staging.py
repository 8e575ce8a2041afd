"""Output folders that appear complete or not at all (DESIGN: "write to a temporary folder, rename on success").

    runs/                          runs/out/  (an existing empty folder, e.g. a mount point)
      .out.tmp-4242/  <- written     .out.tmp-4242/  <- written
      out/            <- renamed     then each entry is renamed into out/, megallama.json last

Every failure path removes the staging folder (and any parent folders this run created); Ctrl-C, SIGTERM and
SIGHUP unwind through the same path. Only SIGKILL (or a power cut) can leave a `.NAME.tmp-PID` or `.NAME.old-PID`
behind: the next run into the same target removes those whose process is gone and says so in its notes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from megallama.errors import InputError

MANIFEST = "megallama.json"  # moved last, so a folder with a manifest is a complete one
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def staging_name(dst: Path, kind: str, pid: int | None = None) -> str:
    return f".{dst.name}.{kind}-{os.getpid() if pid is None else pid}"


# ---------------------------------------------------------------- leftovers of killed runs
def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_staging(dst: Path) -> list[str]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` beside or inside `dst` whose process is gone; return notes.

    A `.old-PID` is the previous output, moved aside in the last step of a replace: when `dst` itself is missing
    (the run died between the two renames), it is put back instead of removed.
    """
    dst = Path(dst)
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-(\d+)")
    notes = []
    for folder in (dst.parent, dst):
        if not folder.is_dir() or (folder == dst and dst.is_symlink()):
            continue
        for entry in sorted(folder.iterdir()):
            m = pattern.fullmatch(entry.name)
            if not m or (int(m.group(2)) != os.getpid() and process_alive(int(m.group(2)))):
                continue
            what = f"{entry} left by process {m.group(2)}, which is no longer running"
            if m.group(1) == "old" and folder == dst.parent and not dst.exists() and not dst.is_symlink():
                entry.rename(dst)
                notes.append(f"restored the previous output from {what}")
                continue
            _remove(entry)
            notes.append(f"removed {what}")
    return notes


# ---------------------------------------------------------------- checks before any work
def check_target(dst: Path, *, force: bool) -> bool:
    """Refuse what cannot become the output; True when `dst` is an existing empty folder to write into."""
    if dst.is_dir():
        if not any(dst.iterdir()):
            return True
        if not force:
            raise InputError(f"output folder {dst} is not empty: pass --force to replace it")
        if os.path.ismount(dst):
            raise InputError(f"output folder {dst} is a mount point and cannot be replaced: empty it, then run "
                             "again without --force")
    elif dst.exists() or dst.is_symlink():
        if not force:
            raise InputError(f"output {dst} exists and is not a folder: pass --force to replace it")
    return False


def missing_folders(folder: Path) -> list[Path]:
    """The folders to create for `folder` to exist, outermost first; refuses a file in the way."""
    missing = []
    while not folder.exists():
        if folder.is_symlink():
            raise InputError(f"cannot create {folder}: it is a broken symbolic link; remove it or choose another "
                             "output folder")
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"cannot create the output under {folder}: it is a file, not a folder; choose another "
                         "output folder")
    return missing[::-1]


def _unwritable(path: Path, e: OSError) -> InputError:
    return InputError(f"cannot write to {path}: {e.strerror or e}; make it writable or choose another output "
                      "folder")


def _probe(folder: Path, name: str) -> None:
    """Create and remove an empty folder in `folder`: the one test of writability that holds for root too."""
    probe = folder / f".{name}.probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise _unwritable(folder, e) from None


def check_writable_file(path: Path) -> None:
    """Before a long run: can `path` (a report file) be written? Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder: give a file name for the report")
    if path.exists():
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            raise _unwritable(path, e) from None
        return
    missing = missing_folders(path.parent)
    _probe(missing[0].parent if missing else path.parent, path.name)


def check_writable_folder(folder: Path) -> None:
    """Before a long run: can `folder` be created, or written into? Creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output {folder} is a file, not a folder: choose another output folder")
    missing = missing_folders(folder)
    _probe(missing[0].parent if missing else folder, folder.name)


# ---------------------------------------------------------------- the staged write
@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while the output is swapped in or cleaned up; deliver them afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


@contextlib.contextmanager
def staged_output(dst: Path, *, force: bool, notes: list[str] | None = None) -> Iterator[Path]:
    """Yield a fresh staging folder for `dst`; on success it becomes `dst`, on any failure it is removed.

    Checks before yielding (so before any work): `dst` is empty or `force` is given, its parent can hold it, and
    the staging folder can be created there. Stale staging of killed runs is removed first (`notes` says so).
    """
    dst = Path(dst)
    found = remove_stale_staging(dst)
    if notes is not None:
        notes.extend(found)
    into = check_target(dst, force=force)
    home = dst if into else dst.parent
    created: list[Path] = []
    tmp = home / staging_name(dst, "tmp")
    try:
        with signals_deferred():
            for folder in [] if into else missing_folders(home):
                _mkdir(folder)
                created.append(folder)
            _mkdir(tmp)
        yield tmp
        with signals_deferred():
            (_move_into if into else _swap_in)(tmp, dst)
    except BaseException:
        with signals_deferred():
            _remove(tmp)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir()
    except OSError as e:
        raise _unwritable(folder.parent, e) from None


def _swap_in(tmp: Path, dst: Path) -> None:
    """Rename the staging folder to `dst`; an existing `dst` is moved aside first and removed after."""
    if not dst.exists() and not dst.is_symlink():
        try:
            tmp.rename(dst)
        except OSError as e:
            raise _unwritable(dst.parent, e) from None
        return
    old = dst.parent / staging_name(dst, "old")
    try:
        dst.rename(old)
    except OSError as e:
        raise InputError(f"cannot replace {dst}: {e.strerror or e}; remove or empty it yourself, or choose another "
                         "output folder") from None
    try:
        tmp.rename(dst)
    except OSError as e:
        old.rename(dst)
        raise _unwritable(dst.parent, e) from None
    _remove(old)


def _move_into(tmp: Path, dst: Path) -> None:
    """Move every entry of the staging folder into the (empty) `dst`, the manifest last; undo on failure."""
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST)
    moved: list[Path] = []
    try:
        for entry in entries:
            entry.rename(dst / entry.name)
            moved.append(dst / entry.name)
        tmp.rmdir()
    except OSError as e:
        for path in reversed(moved):
            with contextlib.suppress(OSError):
                path.rename(tmp / path.name)
        raise _unwritable(dst, e) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            path.unlink()
