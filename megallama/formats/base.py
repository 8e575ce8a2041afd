"""What every reader and writer shares: the Reader protocol, manifest, reports (staged output: staging.py)."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from megallama import __version__
from megallama.errors import InputError
from megallama.formats.checksums import HASH_BLOCK, prefetch_sha256, sha256  # noqa: F401  (re-exported)
from megallama.names import canonical_names, expected_shapes
from megallama.spec import ModelSpec
from megallama.staging import staged_output  # noqa: F401  (re-exported: the writers' staged output)

MANIFEST = "megallama.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OnTensor = Callable[[str, int], None]  # (name, nbytes) -> None; lets the CLI drive a progress bar


class Reader(Protocol):
    """A lazy, context-managed handle on a checkpoint, speaking canonical names (HF names, HF rotary order)."""

    spec: ModelSpec
    tokenizer_files: list[Path]  # files to copy along with the weights
    source_files: list[Path]  # weight files, for the manifest's checksums

    def names(self) -> list[str]: ...
    def get(self, name: str) -> torch.Tensor: ...
    def close(self) -> None: ...


class ContextReader:
    """`with open_x(path) as reader:` for every reader: leaving the block calls `close()`."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DictReader(ContextReader):
    """A Reader over an in-memory dict: the test double."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor]):
        self.spec, self._tensors = spec, tensors
        self.tokenizer_files: list[Path] = []
        self.source_files: list[Path] = []

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def require_folder(path: Path, what: str = "input folder") -> Path:
    """`path` as an existing folder, else one line saying whether it is missing or a file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise InputError(f"{what} {path} is not a folder: pass the checkpoint's folder, not a file in it")
    return path


def check_complete(reader: Reader) -> None:
    """Collect every missing, unexpected and mis-shaped tensor, then raise once."""
    shapes = expected_shapes(reader.spec)
    have = set(reader.names())
    missing = [n for n in canonical_names(reader.spec) if n not in have]
    extra = sorted(have - set(shapes))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if problems:
        raise InputError("checkpoint does not match its config: " + "; ".join(problems))


def check_float_dtypes(dtypes: dict[str, str], source: str) -> None:
    """Every weight must be fp32, bf16 or fp16: an integer or fp8 tensor is not something to cast silently."""
    bad = {name: dtype for name, dtype in dtypes.items() if dtype not in TORCH_DTYPES}
    if bad:
        name, dtype = next(iter(sorted(bad.items())))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InputError(f"tensor {name} in {source} is {dtype}{more}: only fp32, bf16 and fp16 weights are "
                         "supported")


def check_shape(name: str, tensor: torch.Tensor, spec: ModelSpec) -> None:
    want = expected_shapes(spec).get(name)
    if want is not None and tuple(tensor.shape) != want:
        raise InputError(f"tensor {name} has shape {tuple(tensor.shape)} but the config implies {want}")


def cast(t: torch.Tensor, dtype: str | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == TORCH_DTYPES[dtype] else t.to(TORCH_DTYPES[dtype])


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (idle OpenMP threads spin, taking cores from I/O threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def copy_tokenizer(files: list[Path], out_dir: Path) -> list[str]:
    copied = []
    for f in files:
        shutil.copy2(f, out_dir / f.name)
        copied.append(f.name)
    return copied


_CHECKSUMS = [True]  # manifest sha256s on; `no_checksums()` turns them off for one conversion


@contextlib.contextmanager
def no_checksums(skip: bool = True) -> Iterator[None]:
    """Within the block, manifests record their sources without sha256 (`--no-checksums`: one read pass less)."""
    before = _CHECKSUMS[0]
    _CHECKSUMS[0] = not skip and before
    try:
        yield
    finally:
        _CHECKSUMS[0] = before


def checksums_enabled() -> bool:
    return _CHECKSUMS[0]


def write_manifest(out_dir: Path, *, spec: ModelSpec, fmt: str, sources: list[Path], **extra) -> None:
    """megallama.json: spec, source checksums (the sha256 the HF Hub uses as LFS oid; null with --no-checksums),
    tool version, and format-specific fields."""
    manifest = {
        "format": fmt,
        "tool": "megallama",
        "version": __version__,
        "spec": spec.to_dict(),
        "sources": {str(p): sha256(p) if checksums_enabled() else None for p in sources},
        **extra,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class WriteReport:
    """What a conversion did, for the CLI's summary line."""

    output: Path
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / 1e9 / max(self.seconds, 1e-9)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern) if p.is_file())
