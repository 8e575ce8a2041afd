"""What `data.train` / `data.eval` name for `sft`, turned into fixed-length rows (megallama.sft.data).

- `data.format: alpaca | messages | sharegpt | pretokenized`: a JSON/JSONL file (sft's own reader), or a
  Parquet/Arrow file, a folder or a Hub dataset id (`owner/name`, or `owner/name:SPLIT`; default split train).
- `data.format: text`: the same sources with a `text` column: continued pretraining (below).
- `data.format: megatron`: indexed-dataset prefixes, as Megatron-LM's --data-path takes them:
  `PREFIX`, `A B` (concatenated), or `0.7 A 0.3 B` (a blend; in YAML also the list `[0.7, A, 0.3, B]`).
  A prefix with PREFIX_mask (from `data prepare`) gives SFT rows with those masks: exactly the rows the JSONL it
  was prepared from gives. A prefix without (Megatron-LM's preprocess_data.py, or `data prepare --format text`)
  is continued pretraining.

Continued pretraining: each document (BOS ... EOD) is cut into pieces of at most seq_length + 1 tokens that
overlap by one token, so every next-token prediction inside the document is trained exactly once; the loss
covers every token; the CLI turns on data.pack, which packs the pieces into seq_length rows with attention kept
inside each piece (megallama.sft.packing).

Blends: with weights w_i (normalised to p_i) over datasets of n_i samples, the blend holds N = sum n_i samples,
round(p_i N) of them from dataset i (largest remainders, so the counts add up to N), taken in order and
wrapping around when a dataset is smaller than its share; sft's seeded shuffle then mixes them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from megallama.data.indexed import MASK_SUFFIX, MEGATRON_UINT16_LIMIT, open_indexed
from megallama.errors import InputError
from megallama.hub import looks_like_hub_id

SOURCE_KEYS = ("data.train", "data.eval")
HUB_SPLIT = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<split>[A-Za-z0-9_.-]+)$")


# ---------------------------------------------------------------- parsing (config time: no files read)


def parse_blend(value: str | list) -> list[tuple[float | None, str]]:
    """[(weight or None, prefix)] of `A`, `A B`, `0.7 A 0.3 B` or the YAML list forms; InputError when the
    weights do not parse, are negative or not finite, or all zero."""
    tokens = [str(t) for t in value] if isinstance(value, list) else str(value).split()
    if not tokens:
        raise InputError("data.train is empty: name a prefix, or weights and prefixes (0.7 A 0.3 B)")
    if _number(tokens[0]) is None:
        numbers = [t for t in tokens if _number(t) is not None]
        if numbers:
            raise InputError(f"blend {' '.join(tokens)!r}: {numbers[0]!r} looks like a weight, but the first entry "
                             f"{tokens[0]!r} is not one; write weights before every prefix (0.7 A 0.3 B) or none")
        return [(None, t) for t in tokens]
    if len(tokens) % 2:
        raise InputError(f"blend {' '.join(tokens)!r}: expected pairs of weight and prefix (0.7 A 0.3 B), "
                         f"found {len(tokens)} entries")
    pairs = []
    for weight, prefix in zip(tokens[::2], tokens[1::2], strict=True):
        w = _number(weight)
        if w is None or not math.isfinite(w) or w < 0:
            raise InputError(f"blend weight {weight!r} for {prefix}: expected a finite number >= 0")
        if _number(prefix) is not None:
            raise InputError(f"blend {' '.join(tokens)!r}: {prefix!r} stands where a prefix belongs")
        pairs.append((w, prefix))
    if sum(w for w, _ in pairs) <= 0:
        raise InputError(f"blend {' '.join(tokens)!r}: the weights add up to 0")
    return pairs


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def join_source(value: list) -> str:
    """A YAML list (`[0.7, A, 0.3, B]`) as the --data-path string the config holds."""
    return " ".join(str(v) for v in value)


def source_problems(value: str, fmt: str) -> list[str]:
    """Config-time checks of data.train / data.eval (existence; the blend syntax for megatron)."""
    if fmt == "megatron":
        try:
            pairs = parse_blend(value)
        except InputError as e:
            return [str(e)]
        return [f"data prefix {p} has no {Path(p).name}.bin/.idx" for _, p in pairs
                if not (Path(p + ".idx").exists() or Path(p + ".bin").exists())]
    path = Path(value).expanduser()
    if len(str(value).split()) > 1:
        return [f"data source {value!r}: several sources or blends need data.format: megatron"]
    data_file = path.suffix.lower() in (".json", ".jsonl", ".parquet", ".arrow")  # a typo, not a Hub id
    if path.exists() or (not data_file and (looks_like_hub_id(value) or HUB_SPLIT.match(value))):
        return []
    return [f"data source {value} does not exist (a file, a folder or a Hub dataset id owner/name)"]


def absolute_source(value: str, fmt: str) -> str:
    """Local paths made absolute (workers start elsewhere); Hub ids and weights unchanged."""
    if fmt == "megatron":
        try:
            pairs = parse_blend(value)
        except InputError:
            return value
        return join_source([x for w, p in pairs for x in ([] if w is None else [w]) + [_absolute(p)]])
    hub = looks_like_hub_id(value) or HUB_SPLIT.match(value)
    return _absolute(value) if Path(value).expanduser().exists() or not hub else value


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def is_pretraining(value: str, fmt: str) -> bool:
    """True for continued pretraining: text records, or prefixes without loss masks."""
    if fmt == "text":
        return True
    if fmt != "megatron":
        return False
    return any(not Path(p + MASK_SUFFIX + ".idx").exists() for _, p in parse_blend(value))


# ---------------------------------------------------------------- loading (rows for sft)


def load_source(value: str, *, fmt: str, tokenizer, seq_length: int, train_on_prompt: bool = False,
                vocab_size: int | None = None):
    """A TokenizedDataset (megallama.sft.data) for data.train or data.eval."""
    from megallama.sft.data import load_dataset

    kw = dict(tokenizer=tokenizer, seq_length=seq_length, vocab_size=vocab_size)
    if fmt == "megatron":
        return _load_megatron(value, train_on_prompt=train_on_prompt, **kw)
    path = Path(value).expanduser()
    if fmt != "text" and path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        return load_dataset(path, fmt=fmt, train_on_prompt=train_on_prompt, **kw)  # sft's own reader, unchanged
    records = _open(value)
    if fmt == "text":
        if train_on_prompt:
            raise InputError("data.train_on_prompt has no effect on text (every token is trained); set it to false")
        if tokenizer is None:
            raise InputError("data format 'text' needs a tokenizer")
        return load_dataset(path, fmt="pretokenized", records=_text_pieces(records, tokenizer, seq_length), **kw)
    return load_dataset(path, fmt=fmt, train_on_prompt=train_on_prompt, records=records, **kw)


def _open(value: str):
    from megallama.data.records import open_records, parse_payload

    m = HUB_SPLIT.match(value)
    source, split = (m["repo"], m["split"]) if m and not Path(value).exists() else (value, "train")
    return ((where, parse_payload(payload, where)) for where, payload in open_records(source, split=split))


def _text_pieces(records, tokenizer, seq_length: int) -> Iterator[tuple[str, dict]]:
    from megallama.data.samples import text_document

    for where, record in records:
        yield from _pieces(text_document(record, where, tokenizer), seq_length, where)


def _pieces(document, seq_length: int, where: str) -> Iterator[tuple[str, dict]]:
    """A document cut into pieces of <= seq_length + 1 tokens overlapping by one (each target trained once)."""
    n = len(document)
    for start in range(0, max(n - 1, 0), seq_length):
        piece = document[start: start + seq_length + 1]
        yield f"{where} tokens {start}-{start + len(piece) - 1}", {"input_ids": [int(t) for t in piece]}


def _load_megatron(value: str, *, tokenizer, seq_length: int, vocab_size: int | None, train_on_prompt: bool):
    from megallama.sft.data import load_dataset

    datasets = []
    pairs = parse_blend(value)
    for _, prefix in pairs:
        corpus = open_indexed(prefix)
        _check_corpus(corpus, vocab_size=vocab_size, seq_length=seq_length)
        records = _sft_records(corpus, train_on_prompt) if corpus.masks is not None else _pretrain_records(
            corpus, seq_length)
        datasets.append(load_dataset(Path(prefix), fmt="pretokenized", tokenizer=tokenizer, seq_length=seq_length,
                                     vocab_size=vocab_size, records=records))
    if len(datasets) == 1:
        return datasets[0]
    weights = [w for w, _ in pairs]
    return blend(datasets, None if weights[0] is None else weights)


def _check_corpus(corpus, *, vocab_size: int | None, seq_length: int) -> None:
    meta = corpus.meta or {}
    data_vocab = (meta.get("tokenizer") or {}).get("vocab_size")
    if vocab_size is not None and data_vocab is not None and data_vocab > vocab_size:
        raise InputError(f"{corpus.prefix} was prepared with a tokenizer of {data_vocab} tokens "
                         f"({meta['tokenizer'].get('path')}) but the model's vocabulary has {vocab_size}: prepare it "
                         f"again with the model's tokenizer")
    if vocab_size is not None and corpus.dtype == np.uint16 and vocab_size >= MEGATRON_UINT16_LIMIT:
        raise InputError(f"{corpus.prefix} holds uint16 tokens, which Megatron writes for vocabularies below "
                         f"{MEGATRON_UINT16_LIMIT}, but the model's vocabulary has {vocab_size}: the data was "
                         f"tokenized with a different tokenizer")
    prepared = meta.get("seq_length")
    if prepared is not None and seq_length > prepared and (meta.get("counts") or {}).get("truncated"):
        raise InputError(f"{corpus.prefix} was cut to --seq-length {prepared} when prepared, but data.seq_length is "
                         f"{seq_length}: samples would be shorter than from the source; prepare it again with "
                         f"--seq-length {seq_length} or lower data.seq_length")


def _sft_records(corpus, train_on_prompt: bool) -> Iterator[tuple[str, dict]]:
    for i in range(len(corpus)):
        ids = corpus.tokens[i].astype(np.int64)
        keep = np.ones_like(ids, dtype=bool) if train_on_prompt else corpus.masks[i].astype(bool)
        yield f"{corpus.prefix} sample {i}", {"input_ids": ids.tolist(),
                                              "labels": np.where(keep, ids, -100).tolist()}


def _pretrain_records(corpus, seq_length: int) -> Iterator[tuple[str, dict]]:
    """Documents (Megatron's document_indices group sequences into documents) cut into pieces."""
    documents = corpus.tokens.document_indices
    for d in range(len(documents) - 1):
        parts = [corpus.tokens[i] for i in range(int(documents[d]), int(documents[d + 1]))]
        if parts:
            yield from _pieces(np.concatenate(parts).astype(np.int64), seq_length, f"{corpus.prefix} document {d}")


def blend(datasets: list, weights: list[float] | None):
    """Datasets concatenated (weights None) or blended by weight (module docstring); stats added up."""
    import torch

    from megallama.sft.data import DataStats, TokenizedDataset

    sizes = [len(d) for d in datasets]
    total = sum(sizes)
    if weights is None:
        counts = sizes
    else:
        shares = [w / sum(weights) * total for w in weights]
        counts = [int(s) for s in shares]
        for k in sorted(range(len(shares)), key=lambda k: (counts[k] - shares[k], k))[: total - sum(counts)]:
            counts[k] += 1  # largest remainders first
    picks = [torch.arange(c) % n for c, n in zip(counts, sizes, strict=True)]
    input_ids = torch.cat([d.input_ids[p] for d, p in zip(datasets, picks, strict=True)])
    labels = torch.cat([d.labels[p] for d, p in zip(datasets, picks, strict=True)])
    # Real-token counts are per dataset; a dataset's share of them follows its share of samples.
    tokens = sum(round(d.stats.tokens * c / n) for d, c, n in zip(datasets, counts, sizes, strict=True))
    stats = DataStats(samples=len(input_ids), truncated=sum(d.stats.truncated for d in datasets), tokens=tokens,
                      loss_tokens=int((labels != -100).sum()),
                      dropped_empty=sum(d.stats.dropped_empty for d in datasets))
    return TokenizedDataset(input_ids, labels, stats)
