"""`megallama data prepare`: records -> tokens and loss masks -> PREFIX.bin/.idx, streaming and in parallel.

    reader (this process)             workers (N processes, megallama.data.encode)         writer (this process)
    raw JSON lines / rows, chunked -> parse, template, batch-tokenize, mask, cut, count -> IndexedDatasetBuilder

The reader hands out chunks of CHUNK records (JSON lines unparsed: the workers parse them) and keeps at most
WINDOW_PER_WORKER chunks per worker in flight, so memory stays bounded however large the input is
(multiprocessing's imap would read the whole input ahead); results are taken in submission order, so the output
does not depend on the number of workers. A worker returns each chunk as three arrays, which the writer appends
with one write per file: with N workers on N cores the reading and writing process must not be the bottleneck.
"""

from __future__ import annotations

import collections
import contextlib
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
from megallama.data.encode import encode_chunk, init_worker, start_worker
from megallama.data.indexed import (
    MASK_SUFFIX,
    IndexedWriter,
    check_prefix_target,
    prefix_files,
    staged_prefix,
    token_dtype,
    write_meta,
)
from megallama.data.records import JsonLines, open_records
from megallama.data.samples import SFT_FORMATS, SampleRules, canonical_format
from megallama.errors import InputError

CHUNK = 256  # records per task: large enough to amortise the hand-off, small enough to keep workers busy
WINDOW_PER_WORKER = 4
WORKER_START_TIMEOUT = 300  # seconds for a spawned worker to import and load the tokenizer


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
    seconds: float = 0.0  # the work: reading, tokenizing and writing, without start-up
    peak_rss: int = 0
    workers: int = 1
    startup_seconds: float = 0.0  # starting the workers (imports, tokenizer), before `seconds`
    main_cpu_seconds: float = 0.0  # CPU time of this (reading and writing) process during `seconds`


# ---------------------------------------------------------------- the workers


def _chunks(records: Iterable, size: int) -> Iterator:
    """Chunks of `size` records: raw line runs for JSON lines, lists of (where, payload) otherwise."""
    if isinstance(records, JsonLines):
        yield from records.chunks(size)
        return
    chunk = []
    for item in records:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def worker_pool(workers: int, *, tokenizer, tokenizer_path: str, rules: SampleRules,
                dtype: type) -> Iterator[Callable]:
    """A function mapping encode_chunk over chunks with a bounded window, results in input order, its `workers`
    processes started and set up on entry (so the caller's clock can leave start-up out); in-process for 1 (with
    `tokenizer`; spawned workers load `tokenizer_path`, as the user named it, so they pick the same kind)."""
    if workers == 1:
        init_worker(tokenizer, rules, dtype)
        yield lambda chunks: map(encode_chunk, chunks)
        return
    # spawn, not fork: the parent runs threads (torch, tokenizers, HF datasets), and a forked child can inherit
    # one of their locks held and hang. Spawned workers import megallama.data.encode afresh, which needs no torch.
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    with context.Pool(workers, initializer=start_worker, initargs=(ready, tokenizer_path, rules, dtype)) as pool:
        for _ in range(workers):
            ready.get(timeout=WORKER_START_TIMEOUT)

        def ordered(chunks: Iterable) -> Iterator:
            pending: collections.deque = collections.deque()
            for chunk in chunks:
                pending.append(pool.apply_async(encode_chunk, (chunk,)))
                if len(pending) >= workers * WINDOW_PER_WORKER:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield ordered


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
    dtype = token_dtype(tok.vocab_size)
    start = time.perf_counter()
    with worker_pool(workers, tokenizer=tok, tokenizer_path=str(tokenizer), rules=rules, dtype=dtype) as encode_all:
        tic = time.perf_counter()  # the work itself: start-up (imports, tokenizers, workers) is not part of the rate
        cpu = time.process_time()
        with staged_prefix(prefix) as staging:
            writer = IndexedWriter(staging, dtype=dtype, masks=masks)
            for result in encode_all(_chunks(records, chunk_size)):
                writer.add_samples(result.ids, result.mask if masks else None, result.lengths)
                report.records += result.records
                report.samples += len(result.lengths)
                report.tokens += int(result.lengths.sum())
                report.loss_tokens += result.loss_tokens
                report.truncated += result.truncated
                dropped += result.dropped
                lengths_seen += result.histogram
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
        report.main_cpu_seconds = time.process_time() - cpu
    report.startup_seconds = tic - start
    report.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


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
