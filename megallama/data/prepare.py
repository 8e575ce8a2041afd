"""`megallama data prepare`: records -> tokens and loss masks -> PREFIX.bin/.idx, streaming and in parallel.

    reader (this process)          workers (N processes)                 writer (this process)
    lines / rows, in chunks  -->   parse, template, tokenize, mask  -->  IndexedDatasetBuilder, in input order

The reader hands out chunks of CHUNK records and keeps at most WINDOW_PER_WORKER chunks per worker in flight,
so memory stays bounded however large the input is (multiprocessing's imap would read the whole input ahead);
results are taken in submission order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megallama import __version__
from megallama.data.indexed import (
    MASK_SUFFIX,
    IndexedWriter,
    check_prefix_target,
    prefix_files,
    staged_prefix,
    token_dtype,
    write_meta,
)
from megallama.data.records import open_records, parse_payload
from megallama.data.samples import SFT_FORMATS, SampleRules, canonical_format, encode_record, fit_sample
from megallama.errors import InputError

CHUNK = 256  # records per task: large enough to amortise pickling, small enough to keep workers busy
WINDOW_PER_WORKER = 4


@dataclass
class ChunkResult:
    """One chunk's samples, concatenated: ids[offsets[k]:offsets[k+1]] is sample k."""

    ids: np.ndarray  # [tokens] int64
    mask: np.ndarray  # [tokens] uint8
    lengths: np.ndarray  # [samples] int64
    records: int
    truncated: int
    dropped: Counter


@dataclass
class PrepareReport:
    prefix: str
    files: list[str]
    records: int = 0
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (from, to exclusive, samples)
    seconds: float = 0.0
    peak_rss: int = 0
    workers: int = 1


# ---------------------------------------------------------------- the workers


_WORKER: dict = {}


def _init_worker(tokenizer_path: str, rules: SampleRules) -> None:
    from megallama.sft.tokenizer import load_tokenizer

    _WORKER["tokenizer"] = load_tokenizer(Path(tokenizer_path))
    _WORKER["rules"] = rules


def encode_chunk(items: list[tuple[str, str | dict]]) -> ChunkResult:
    """Parse, template, tokenize, mask and cut a chunk of (where, payload) in a worker."""
    tokenizer, rules = _WORKER["tokenizer"], _WORKER["rules"]
    ids_parts, mask_parts, lengths, truncated, dropped = [], [], [], 0, Counter()
    for where, payload in items:
        ids, mask = encode_record(parse_payload(payload, where), where, rules, tokenizer)
        ids, mask, cut, why = fit_sample(ids, mask, rules)
        if why is not None:
            dropped[why] += 1
            continue
        truncated += cut
        ids_parts.append(ids)
        mask_parts.append(mask)
        lengths.append(len(ids))
    flat = [t for part in ids_parts for t in part]
    flat_mask = [m for part in mask_parts for m in part]
    return ChunkResult(np.asarray(flat, dtype=np.int64), np.asarray(flat_mask, dtype=np.uint8),
                       np.asarray(lengths, dtype=np.int64), len(items), truncated, dropped)


def _chunks(records: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in records:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ordered_map(fn: Callable, chunks: Iterator, *, workers: int, tokenizer_path: str,
                rules: SampleRules) -> Iterator:
    """fn over chunks in `workers` processes with a bounded window, results in input order; in-process for 1."""
    if workers == 1:
        _init_worker(tokenizer_path, rules)
        yield from map(fn, chunks)
        return
    # spawn, not fork: the parent runs threads (torch, tokenizers, HF datasets), and a forked child can inherit
    # one of their locks held and hang. Spawned workers import megallama afresh (a second or two each, once).
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, rules)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(fn, (chunk,)))
            if len(pending) >= workers * WINDOW_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------- the command


def prepare(source: str, *, fmt: str, tokenizer: str | Path, output: str | Path, split: str = "train",
            seq_length: int | None = None, workers: int | None = None, chat_template: bool | None = None,
            overwrite: bool = False, on_progress: Callable[[int, int], None] | None = None,
            chunk_size: int = CHUNK) -> PrepareReport:
    """Tokenize `source` into the indexed dataset PREFIX (`output`); everything is checked before any work.

    Args:
        chat_template: messages only; None uses the tokenizer's chat template when it has one (sft's rule).
        on_progress: called with (records read, tokens written) after every chunk.

    Example:
        >>> prepare("train.jsonl", fmt="alpaca", tokenizer="runs/llama-tp1", output="data/alpaca", workers=8)
    """
    from megallama.sft.tokenizer import load_tokenizer

    fmt = canonical_format(fmt)
    if seq_length is not None and seq_length < 1:
        raise InputError(f"--seq-length must be >= 1, got {seq_length}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    tok = load_tokenizer(Path(tokenizer))
    if chat_template and fmt != "messages":
        raise InputError(f"--chat-template applies to the messages/sharegpt formats, not {fmt}")
    if chat_template and not tok.chat_template:
        raise InputError(f"--chat-template: tokenizer {tok.path} has no chat template (tokenizer_config.json "
                         f"chat_template or chat_template.jinja); drop the flag to use the default layout")
    use_template = fmt == "messages" and (bool(tok.chat_template) if chat_template is None else chat_template)
    rules = SampleRules(fmt, chat_template=use_template, seq_length=seq_length)
    prefix = Path(output).expanduser().absolute()
    check_prefix_target(prefix, overwrite=overwrite)
    records = open_records(source, split=split)
    masks = fmt in SFT_FORMATS

    files = prefix_files(prefix)
    report = PrepareReport(str(prefix), [str(p) for p in (files if masks else [files[0], *files[3:]])],
                           workers=workers)
    lengths_seen: Counter = Counter()
    dropped: Counter = Counter()
    with staged_prefix(prefix) as staging:
        writer = IndexedWriter(staging, dtype=token_dtype(tok.vocab_size), masks=masks)
        tic = time.perf_counter()  # the work itself: start-up (imports, tokenizer) is not part of the rate
        results = ordered_map(encode_chunk, _chunks(records, chunk_size), workers=workers,
                              tokenizer_path=str(tok.path), rules=rules)
        for result in results:
            _write_chunk(writer, result, masks)
            report.records += result.records
            report.samples += len(result.lengths)
            report.tokens += int(result.lengths.sum())
            report.loss_tokens += int(result.mask.sum()) - _first_mask_bits(result)
            report.truncated += result.truncated
            dropped += result.dropped
            lengths_seen.update(int(n).bit_length() for n in result.lengths)  # power-of-two buckets
            if on_progress:
                on_progress(report.records, report.tokens)
        if report.samples == 0:
            why = ", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "the input holds no records"
            raise InputError(f"{source}: no usable {fmt} samples ({why})")
        writer.finalize()
        report.dropped = dict(dropped)
        report.histogram = [(1 << (b - 1), 1 << b, lengths_seen[b]) for b in sorted(lengths_seen)]
        write_meta(staging, _meta(source, split, rules, tok, report, masks, prefix))
    report.seconds = time.perf_counter() - tic
    report.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def _write_chunk(writer: IndexedWriter, result: ChunkResult, masks: bool) -> None:
    offsets = np.concatenate([[0], np.cumsum(result.lengths)])
    ids = result.ids.astype(writer.tokens.dtype, copy=False)
    for k in range(len(result.lengths)):
        a, b = offsets[k], offsets[k + 1]
        writer.add(ids[a:b], result.mask[a:b] if masks else None)


def _first_mask_bits(result: ChunkResult) -> int:
    """Mask bits on each sample's first token, which is never a target (nothing precedes it)."""
    starts = np.concatenate([[0], np.cumsum(result.lengths)[:-1]]).astype(np.int64)
    return int(result.mask[starts].sum()) if len(starts) else 0


def _meta(source: str, split: str, rules: SampleRules, tok, report: PrepareReport, masks: bool, prefix: Path) -> dict:
    import hashlib

    template = tok.chat_template if rules.chat_template else None
    return {
        "created_by": f"megallama {__version__} data prepare",
        "megallama_version": __version__,
        "input": str(source), "split": split, "format": rules.fmt,
        "template": ("tokenizer chat template" if rules.chat_template else
                     {"alpaca": "alpaca", "messages": "megallama default (ROLE_HEADERS)"}.get(rules.fmt)),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "tokenizer": {"path": str(tok.path), "kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                      "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "seq_length": rules.seq_length,
        "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
        "masks": (prefix.name + MASK_SUFFIX) if masks else None,
        "mask_semantics": "uint8 per token, 1 where the token is a target (the loss covers predicting it)",
        "counts": {k: v for k, v in asdict(report).items()
                   if k in ("records", "samples", "tokens", "loss_tokens", "truncated", "dropped")},
    }
