"""One stream of records from whatever holds them: `(where, payload)` pairs, in file order.

- `.jsonl` (and `.json` holding JSON lines): payload is the raw line, parsed later (in the tokenizing workers:
  the reading process only splits lines, `JsonLines.chunks` hands them out in bulk); `where` is `FILE:LINE`.
- `.json` holding an array: payload is the record (a dict); `where` is `FILE: record N`.
- `.parquet`, `.arrow`, a folder of data files, or a Hub dataset id (`owner/name`): rows streamed by HF
  `datasets` (never loaded whole); `where` is `NAME (SPLIT) row N`. A folder written by `save_to_disk` is
  memory-mapped with `load_from_disk`.

Hub ids follow the model conventions of megallama.hub: the dataset repo is fetched into the HF cache
(HF_HOME / HF_HUB_CACHE), HF_HUB_OFFLINE=1 reads the cache only, HF_TOKEN and HF_ENDPOINT are honoured.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megallama.errors import InputError
from megallama.hub import looks_like_hub_id

DATASETS_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
HUB_DATA_FILES = ["*.parquet", "*.arrow", "*.jsonl", "*.json", "*.jsonl.gz", "*.csv", "README.md"]
_TRUE = ("1", "on", "yes", "true")


def open_records(source: str | Path, *, split: str = "train") -> Iterable[tuple[str, str | dict]]:
    """The (where, payload) pairs of `source`, in order (a JsonLines for JSON lines); checks (existence, Hub
    cache) happen now, not lazily.

    Example:
        >>> for where, payload in open_records("train.jsonl"): ...
        >>> open_records("tatsu-lab/alpaca", split="train")
    """
    path = Path(source).expanduser()
    if path.is_file():
        builder = DATASETS_BUILDERS.get(path.suffix.lower())
        if builder:
            return _dataset_rows(path.name, split, lambda: _stream(builder, data_files={split: [str(path)]},
                                                                      split=split))
        return _json_file(path)
    if path.is_dir():
        return _folder_rows(path, path.name, split)
    if looks_like_hub_id(str(source)):
        return _folder_rows(hub_dataset_folder(str(source)), str(source), split)
    raise InputError(f"data {source} does not exist: pass a JSON/JSONL/Parquet/Arrow file, a folder of them, or a "
                     f"Hub dataset id (owner/name)")


def parse_payload(payload: str | dict, where: str) -> dict[str, Any]:
    """The record of a payload: a JSON line parsed (one clear InputError when malformed), a dict as it is."""
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
    if not isinstance(payload, dict):
        raise InputError(f"{where}: expected a JSON object, found {type(payload).__name__}")
    return payload


# ---------------------------------------------------------------- JSON and JSONL


def _json_file(path: Path) -> Iterable[tuple[str, str | dict]]:
    try:
        with path.open(encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except UnicodeDecodeError as e:
        raise InputError(f"data file {path} is not UTF-8 text (byte {e.start}): pass JSON, JSONL, Parquet or "
                         f"Arrow") from None
    if head.startswith("["):
        from megallama.sft.data import read_records  # a JSON array is one document: read whole, as sft does

        return read_records(path)
    return JsonLines(path)


class JsonLines:
    """The records of a JSON-lines file: (where, line) pairs when iterated, or `chunks` of raw lines for workers."""

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for chunk in self.chunks(1024):
            yield from chunk.records()

    def chunks(self, size: int) -> Iterator[LineChunk]:
        """Runs of `size` lines, blank ones included (they keep the line numbers right), read but not parsed."""
        try:
            with self.path.open(encoding="utf-8") as f:
                first = 1
                while lines := list(itertools.islice(f, size)):  # split and decoded in C: the reader stays cheap
                    yield LineChunk(str(self.path), first, lines)
                    first += len(lines)
        except UnicodeDecodeError as e:
            raise InputError(f"data file {self.path} is not UTF-8 text (byte {e.start})") from None


@dataclass
class LineChunk:
    """Consecutive lines of a JSON-lines file; `records()` gives the (where, payload) of the non-blank ones."""

    path: str
    first_line: int  # the line number of lines[0], from 1
    lines: list[str]

    def records(self) -> Iterator[tuple[str, str]]:
        for lineno, line in enumerate(self.lines, self.first_line):
            if line and not line.isspace():  # line.strip() without the copy
                yield f"{self.path}:{lineno}", line


# ---------------------------------------------------------------- HF datasets: Parquet, Arrow, folders, the Hub


def _folder_rows(folder: Path, name: str, split: str) -> Iterator[tuple[str, dict]]:
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        return _dataset_rows(name, split, lambda: _from_disk(folder, split))
    return _dataset_rows(name, split, lambda: _stream(str(folder), split=split))


def _stream(path: str, **kwargs):
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets.load_dataset(path, streaming=True, **kwargs)


def _from_disk(folder: Path, split: str):
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"Bad split: {split}. Available splits: {sorted(ds)}")
        ds = ds[split]
    return ds


def _dataset_rows(name: str, split: str, make) -> Iterator[tuple[str, dict]]:
    try:
        rows = make()
    except InputError:
        raise
    except Exception as e:  # datasets raises ValueError, FileNotFoundError, DatasetGenerationError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"data {name}: cannot read split {split!r}: {first}"[:400]) from None
    return _rows(rows, name, split)


def _rows(rows, name: str, split: str) -> Iterator[tuple[str, dict]]:
    i = 0
    try:
        for i, row in enumerate(rows, 1):
            yield f"{name} ({split}) row {i}", dict(row)
    except (InputError, GeneratorExit):
        raise
    except Exception as e:  # a corrupt file shows only when its rows are read
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"data {name} ({split}): cannot read row {i + 1}: {first}"[:400]) from None


def hub_dataset_folder(repo_id: str) -> Path:
    """The local snapshot of Hub dataset `repo_id` (data files and card only), fetched unless offline."""
    from huggingface_hub import snapshot_download

    env = os.environ
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    cache = env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]).expanduser() / "hub") if env.get("HF_HOME")
                                        else None)
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=cache, local_files_only=offline,
                                      allow_patterns=HUB_DATA_FILES, token=env.get("HF_TOKEN") or None,
                                      endpoint=env.get("HF_ENDPOINT") or None))
    except Exception as e:  # huggingface_hub raises a dozen types; one line for each
        raise InputError(f"{repo_id} is not a local path and cannot be fetched as a Hub dataset: "
                         f"{_hub_reason(e, repo_id, offline)}") from None


def _hub_reason(error: Exception, repo_id: str, offline: bool) -> str:
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return f"{repo_id} is gated: accept its terms on huggingface.co and set HF_TOKEN"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"no dataset repo {repo_id} (or it is private: set HF_TOKEN)"
    if isinstance(error, errors.LocalEntryNotFoundError) or offline:
        return f"{repo_id} is not in the HF cache and " + ("HF_HUB_OFFLINE is set" if offline
                                                          else "the Hub cannot be reached")
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"[:300]
