"""The manifest's sha256 of each source file (the HF Hub's LFS oid), hashed on a thread beside the conversion.

No torch here: the CLI starts hashing (which also brings the input into the page cache) before the conversion
imports torch, so the first input byte is read within a few tenths of a second of the command starting.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

HASH_BLOCK = 1 << 24  # bytes read per hashing step


def sha256(path: Path) -> str:
    """The file's sha256 hex digest; taken from `prefetch_sha256` when that already hashed this version of it."""
    pending = _PREFETCHED.pop(_file_key(path), None)
    if pending is not None:
        pending.join()
        if pending.digest is not None:
            return pending.digest
    return hash_file(path)


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class _Hasher(threading.Thread):
    """Hashes one file in the background; a daemon, so a failing conversion never waits for it."""

    def __init__(self, path: Path):
        super().__init__(daemon=True, name="megallama-sha256")
        self.path, self.digest = path, None

    def run(self) -> None:
        try:
            self.digest = hash_file(self.path)
        except OSError:
            pass  # sha256() hashes it again in the foreground and reports the error


_PREFETCHED: dict[tuple, _Hasher] = {}


def prefetch_sha256(paths: list[Path]) -> None:
    """Start hashing `paths` (for the manifest) on a thread, so it overlaps the conversion (hashlib frees the GIL);
    a file already being hashed (same path, size and mtime) is not hashed twice."""
    for path in paths:
        if _file_key(path) in _PREFETCHED:
            continue
        hasher = _Hasher(Path(path))
        _PREFETCHED[_file_key(path)] = hasher
        hasher.start()


def _file_key(path: Path) -> tuple:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def start_early(folder: Path, fmt: str) -> None:
    """Start hashing the weight files of the `fmt` ("hf", "meta") checkpoint in `folder` before anything heavy is
    imported: the hash the manifest needs anyway doubles as read-ahead of the input (cold disks gain most).
    Guessed from file names the way the readers choose them; a wrong guess costs one read and nothing else."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if fmt == "hf":
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    elif fmt == "meta":
        files = sorted(folder.glob("*.pth")) or sorted(folder.glob("*/*.pth"))
    else:
        return  # Megatron folders: the reader knows which rank files it reads
    try:
        prefetch_sha256(files)
    except OSError:
        pass  # the reader reports unreadable files
