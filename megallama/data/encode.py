"""The tokenizing workers of `data prepare`: a chunk of records -> its samples as three arrays.

Per record, only what must be per record runs in Python: parse the JSON, validate, template into pieces. The
chunk's texts then go to the tokenizer in one batch call, and concatenation, masks, sft's cut-and-drop rule,
the vocabulary check and the statistics are numpy over the whole chunk. The result is a few buffers, cheap to
send back and written with one write per file, so the reading and writing process has almost nothing to do.

Formats tokenized whole (a chat template, pretokenized ids) go record by record through encode_record.
This module imports no torch: a worker starts in a fraction of a second and stays small.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megallama.data.records import LineChunk, parse_payload
from megallama.data.samples import (
    DROP_REASONS,
    SampleRules,
    by_pieces,
    encode_record,
    fit_samples,
    record_pieces,
    vocab_error,
)


@dataclass
class ChunkResult:
    """One chunk's kept samples, concatenated: ids[starts[k]:starts[k] + lengths[k]] is sample k."""

    ids: np.ndarray  # [tokens] the output's token dtype
    mask: np.ndarray  # [tokens] uint8, 1 where the token is a target
    lengths: np.ndarray  # [samples] int64
    records: int
    truncated: int  # kept samples that were cut to seq_length + 1
    loss_tokens: int  # targets, not counting each sample's first token (never one)
    dropped: Counter  # reason -> samples, in order of first occurrence
    histogram: Counter  # bit_length(length) -> samples (power-of-two buckets)


_WORKER: dict = {}


def init_worker(tokenizer, rules: SampleRules, dtype: type) -> None:
    """Set up this process for encode_chunk: `tokenizer` is a Tokenizer, or the path to load one from."""
    from megallama.sft.tokenizer import load_tokenizer

    _WORKER.update(tokenizer=tokenizer if not isinstance(tokenizer, str | Path) else load_tokenizer(Path(tokenizer)),
                   rules=rules, dtype=dtype)


def start_worker(ready, *args) -> None:
    """init_worker in a spawned worker, then say so on the `ready` queue."""
    import os

    init_worker(*args)
    ready.put(os.getpid())


def encode_chunk(chunk: LineChunk | list[tuple[str, str | dict]]) -> ChunkResult:
    """Parse, template, tokenize, mask and cut a chunk of records (raw JSON lines, or (where, payload) pairs)."""
    tokenizer, rules = _WORKER["tokenizer"], _WORKER["rules"]
    items = list(chunk.records()) if isinstance(chunk, LineChunk) else chunk
    wheres = [where for where, _ in items]
    encode = _encode_pieces if by_pieces(rules) else _encode_whole
    ids, mask, lengths = encode(items, rules, tokenizer)
    _check_vocab(ids, lengths, wheres, tokenizer.vocab_size)
    return _fit(ids, mask, lengths, rules, _WORKER["dtype"])


def _encode_pieces(items: list, rules: SampleRules, tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [tokens], mask [tokens] bool, lengths [records]) of records made of pieces, their texts encoded in one
    batch: exactly tokenize_pieces' result per record, concatenated."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    segments: list = []  # per piece its ids; a text's are filled in after the batch encode
    trained: list[bool] = []  # per piece
    per_record: list[int] = []  # pieces per record
    texts, slots = [], []  # the texts to encode and where their ids go
    specials: dict[int, np.ndarray] = {}
    for where, payload in items:
        pieces = record_pieces(parse_payload(payload, where), where, rules, bos_id=bos, eos_id=eos)
        per_record.append(len(pieces))
        for piece in pieces:
            trained.append(piece.trained)
            if isinstance(piece.content, int):
                if piece.content not in specials:
                    specials[piece.content] = np.array([piece.content], dtype=np.int32)
                segments.append(specials[piece.content])
            else:
                slots.append(len(segments))
                texts.append(piece.content)
                segments.append(None)
    for slot, ids in zip(slots, tokenizer.encode_batch(texts), strict=True):
        segments[slot] = ids
    bounds = np.concatenate([[0], np.cumsum(per_record, dtype=np.int64)])  # record r: pieces bounds[r]:bounds[r+1]
    if rules.fmt == "text":  # one text per record: no tokens, no document (text_document), BOS and EOS dropped too
        for record in (r for r, slot in enumerate(slots) if len(segments[slot]) == 0):
            segments[bounds[record]: bounds[record + 1]] = [segments[slots[record]]] * int(per_record[record])
    piece_lengths = np.fromiter(map(len, segments), dtype=np.int64, count=len(segments))
    ids = np.concatenate(segments) if segments else np.zeros(0, dtype=np.int32)
    mask = np.repeat(np.asarray(trained, dtype=bool), piece_lengths)
    ends = np.concatenate([[0], np.cumsum(piece_lengths)])
    return ids, mask, ends[bounds[1:]] - ends[bounds[:-1]]


def _encode_whole(items: list, rules: SampleRules, tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same for formats tokenized record by record (encode_record)."""
    samples = [encode_record(parse_payload(payload, where), where, rules, tokenizer) for where, payload in items]
    lengths = np.fromiter((len(ids) for ids, _ in samples), dtype=np.int64, count=len(samples))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in samples), dtype=np.int64, count=total)
    mask = np.fromiter(itertools.chain.from_iterable(mask for _, mask in samples), dtype=bool, count=total)
    return ids, mask, lengths


def _check_vocab(ids: np.ndarray, lengths: np.ndarray, wheres: list[str], vocab_size: int) -> None:
    """encode_record's check, for the whole chunk: the first out-of-range token names its record."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        k = int(np.argmax((ids < 0) | (ids >= vocab_size)))
        raise vocab_error(int(ids[k]), vocab_size, wheres[int(np.searchsorted(np.cumsum(lengths), k, "right"))])


def _fit(ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, rules: SampleRules, dtype: type) -> ChunkResult:
    """sft's cut-and-drop rule over the chunk (fit_samples), the kept tokens in the output's dtype, and counts."""
    cut, truncated, why = fit_samples(mask, lengths, rules)
    keep = why == 0
    if not keep.all() or truncated.any():
        starts = np.cumsum(lengths) - lengths
        position = np.arange(len(ids)) - np.repeat(starts, lengths)  # of each token in its sample
        tokens = np.repeat(keep, lengths) & (position < np.repeat(cut, lengths))
        ids, mask = ids[tokens], mask[tokens]
    kept = cut[keep]
    firsts = np.cumsum(kept) - kept
    bits, counts = np.unique(np.frexp(kept)[1], return_counts=True)  # frexp's exponent of n >= 1: bit_length(n)
    return ChunkResult(ids.astype(dtype), mask.astype(np.uint8), kept.astype(np.int64), len(lengths),
                       int((truncated & keep).sum()), int(mask.sum()) - int(mask[firsts].sum()),
                       Counter(DROP_REASONS[w] for w in why[why > 0]),
                       Counter(dict(zip(bits.tolist(), counts.tolist(), strict=True))))
