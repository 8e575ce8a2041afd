"""Megatron indexed datasets on disk: what `data prepare` writes and `sft` (and Megatron-LM's --data-path) reads.

    PREFIX.bin / PREFIX.idx            tokens: megatron-core's IndexedDataset, one sequence (and one document)
                                       per sample, uint16 when the vocabulary is < 65,500, else int32
    PREFIX_mask.bin / PREFIX_mask.idx  SFT formats only: the loss mask, a uint8 IndexedDataset with the same
                                       sequence lengths; 1 where the token is a target (the loss covers
                                       predicting it), 0 for prompt tokens
    PREFIX.json                        what made it: tokenizer, format, template, counts, megallama version

Written with megatron-core's IndexedDatasetBuilder into a hidden staging folder beside PREFIX and moved into
place at the end (PREFIX.json last), so a failed or interrupted run leaves no PREFIX file behind.
A prefix without PREFIX_mask (such as a Megatron-LM preprocess_data.py corpus) is a pretraining corpus.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megallama.errors import InputError

MASK_SUFFIX = "_mask"
INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
MEGATRON_UINT16_LIMIT = 65500  # DType.optimal_dtype: uint16 below this vocabulary size


def prefix_files(prefix: Path | str) -> list[Path]:
    """Every file a prepared PREFIX consists of, PREFIX.json (the completion mark) last."""
    p = str(prefix)
    return [Path(p + s) for s in (".bin", MASK_SUFFIX + ".bin", MASK_SUFFIX + ".idx", ".idx", ".json")]


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported after megallama's filter of megatron-core's start-up
    warnings (megallama.engine.runtime)."""
    import importlib

    importlib.import_module("megallama.engine.runtime")
    return importlib.import_module("megatron.core.datasets.indexed_dataset")


def token_dtype(vocab_size: int) -> type:
    return indexed_dataset_module().DType.optimal_dtype(vocab_size)


# ---------------------------------------------------------------- writing


class IndexedWriter:
    """Appends samples to PREFIX.bin (and PREFIX_mask.bin) with megatron-core's IndexedDatasetBuilder."""

    def __init__(self, prefix: str, *, dtype: type, masks: bool):
        IndexedDatasetBuilder = indexed_dataset_module().IndexedDatasetBuilder  # noqa: N806

        self.prefix = prefix
        self.tokens = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        self.masks = IndexedDatasetBuilder(prefix + MASK_SUFFIX + ".bin", dtype=np.uint8) if masks else None

    def add_samples(self, ids: np.ndarray, mask: np.ndarray | None, lengths: np.ndarray) -> None:
        """Samples concatenated (ids [tokens] in the writer's dtype, mask [tokens] uint8, lengths [samples]), one
        write per file; each sample is one sequence that is one document (Megatron's document_indices = 0..N)."""
        import torch

        lengths = lengths.tolist()
        for builder, data in ((self.tokens, ids), (self.masks, mask)):
            if builder is None:
                continue
            first = len(builder.sequence_lengths)
            builder.add_document(torch.from_numpy(data), lengths)
            # add_document makes the whole chunk one document; end each sample's instead, as add_item +
            # end_document per sample would (and as the builder's own add_index extends document_indices).
            builder.document_indices[-1:] = range(first + 1, first + len(lengths) + 1)

    def finalize(self) -> None:
        self.tokens.finalize(self.prefix + ".idx")
        if self.masks is not None:
            self.masks.finalize(self.prefix + MASK_SUFFIX + ".idx")


def check_prefix_target(prefix: Path, *, overwrite: bool) -> None:
    """Refuse before any work: existing PREFIX files (without overwrite), a missing or unwritable folder."""
    existing = [p for p in prefix_files(prefix) if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]} already exists: pass --overwrite to replace the prepared dataset, or "
                         f"choose another --output prefix")
    folder = prefix.parent
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder {folder} is not writable")
    if not prefix.name or prefix.name.startswith("."):
        raise InputError(f"--output {prefix}: expected a prefix such as data/alpaca (files PREFIX.bin, PREFIX.idx)")


@contextlib.contextmanager
def staged_prefix(prefix: Path) -> Iterator[str]:
    """Yield a staging prefix in a hidden folder beside `prefix`; on success its files replace PREFIX's (JSON
    last), on any failure (and Ctrl-C) the folder goes and no PREFIX file is written."""
    from megallama.staging import _remove, remove_stale_staging, signals_deferred, staging_name

    remove_stale_staging(prefix)
    tmp = prefix.parent / staging_name(prefix, "tmp")
    try:
        tmp.mkdir()
        yield str(tmp / prefix.name)
        with signals_deferred():
            for old in prefix_files(prefix):
                old.unlink(missing_ok=True)
            for staged in prefix_files(tmp / prefix.name):
                if staged.exists():
                    staged.rename(prefix.parent / staged.name)
            tmp.rmdir()
    except BaseException:
        with signals_deferred():
            _remove(tmp)
        raise


def write_meta(prefix: str, meta: dict) -> None:
    Path(prefix + ".json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------- reading


@dataclass
class IndexedCorpus:
    """A prefix opened for reading: tokens, the mask dataset when there is one, PREFIX.json when there is one."""

    prefix: str
    tokens: object  # megatron.core IndexedDataset
    masks: object | None
    meta: dict | None
    dtype: type

    def __len__(self) -> int:
        return len(self.tokens)


def read_header(prefix: str) -> tuple[type, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, document indices) of PREFIX.idx, after checking it against PREFIX.bin.

    megatron-core asserts on these (or reads past the end of a truncated .bin); here each is one InputError.
    """
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    if not idx.is_file() and not bin_.is_file():
        raise InputError(f"no indexed dataset at prefix {prefix}: {idx.name} and {bin_.name} do not exist "
                         f"(pass the prefix, without .bin/.idx)")
    for have, lack in ((idx, bin_), (bin_, idx)):
        if not lack.is_file():
            raise InputError(f"{have} has no {lack.name} beside it: an indexed dataset needs both files")
    with idx.open("rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != INDEX_MAGIC:
        raise InputError(f"{idx} is not a Megatron index file (no MMIDIDX header)")
    version, code, seqs, docs = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in DTYPE_CODES:
        raise InputError(f"{idx}: unsupported index version {version} or dtype code {code}")
    need = HEADER_BYTES + seqs * 4 + seqs * 8 + docs * 8
    if idx.stat().st_size < need:
        raise InputError(f"{idx} is truncated: {idx.stat().st_size} bytes, its header describes {need}")
    lengths = np.fromfile(idx, dtype=np.int32, count=seqs, offset=HEADER_BYTES)
    documents = np.fromfile(idx, dtype=np.int64, count=docs, offset=HEADER_BYTES + seqs * 12)
    dtype = DTYPE_CODES[code]
    expected = int(lengths.sum(dtype=np.int64)) * np.dtype(dtype).itemsize
    if bin_.stat().st_size < expected:
        raise InputError(f"{bin_} is truncated: {bin_.stat().st_size} bytes, but {idx.name} describes {expected} "
                         f"({seqs} sequences); copy it again or prepare it again")
    if docs < 1 or documents[-1] != seqs:
        raise InputError(f"{idx}: its document indices do not end at the sequence count {seqs}")
    return dtype, lengths, documents


def open_indexed(prefix: str | Path) -> IndexedCorpus:
    """Open PREFIX (and PREFIX_mask when present) with megatron-core's IndexedDataset, checked first."""
    IndexedDataset = indexed_dataset_module().IndexedDataset  # noqa: N806

    prefix = str(prefix)
    dtype, lengths, _ = read_header(prefix)
    masks = None
    if Path(prefix + MASK_SUFFIX + ".idx").exists() or Path(prefix + MASK_SUFFIX + ".bin").exists():
        mask_dtype, mask_lengths, _ = read_header(prefix + MASK_SUFFIX)
        if mask_dtype is not np.uint8 or not np.array_equal(mask_lengths, lengths):
            raise InputError(f"{prefix}{MASK_SUFFIX}.idx does not match {prefix}.idx (uint8, the same sequence "
                             f"lengths): the mask belongs to another dataset")
        masks = IndexedDataset(prefix + MASK_SUFFIX)
    meta_path = Path(prefix + ".json")
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{meta_path} is not valid JSON ({e})") from None
    return IndexedCorpus(prefix, IndexedDataset(prefix), masks, meta, dtype)
