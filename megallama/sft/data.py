"""SFT data: record formats, loss masking, fixed-length rows and deterministic batching.

Formats (`data.format`):
- `alpaca`: JSON array or JSONL of {"instruction", "input" (optional), "output"}, prompt from ALPACA_TEMPLATE.
- `messages`: JSON array or JSONL of {"messages": [{"role", "content"}...]} or ShareGPT
  {"conversations": [{"from", "value"}...]}; the tokenizer's chat template when it has one, else ROLE_HEADERS.
- `pretokenized`: JSONL of {"input_ids", "labels" (optional), "attention_mask" (optional)}, the layout of the
  Megatron-LLaMA fork: labels aligned with input_ids (HF convention, -100 = no loss), used as given.

Rows follow megatron-core's GPTModel(labels=...) convention: the shift happens here. For a token sequence s of
length L <= seq_length + 1, input_ids = s[:-1] and labels = s[1:] (with -100 where no loss), both right-padded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megallama.errors import InputError
from megallama.sft.templates import (
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_NO_INPUT,
    ROLE_HEADERS,
    Piece,
    alpaca_pieces,
    chat_messages,
    chat_template_sample,
    default_chat_pieces,
    merge_pieces,
)
from megallama.sft.tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataStats", "TokenizedDataset", "Tokenizer", "describe_sample", "dp_microbatches", "global_batches",
           "load_dataset", "load_tokenizer", "make_learnable_dataset", "read_records"]

IGNORE_INDEX = -100
FORMATS = ("alpaca", "messages", "pretokenized")
FORMAT_ALIASES = {"sharegpt": "messages"}


# ---------------------------------------------------------------- records


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, record) from a JSONL file or a JSON array; location is 'file:line' or 'file: record N'."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    try:
        yield from _read_records(path)
    except UnicodeDecodeError as e:
        raise InputError(f"data file {path} is not UTF-8 text (byte {e.start}): pass a JSON or JSONL file") from None


def _read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        yield from _read_json_array(path)
        return
    for where, record in json_lines(path):
        yield where, _require_object(record, where)


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """`(path:line, value)` for every non-blank line of a JSONL file; a malformed line is one clear InputError."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
            yield where, value


def _read_json_array(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    for i, record in enumerate(records, 1):
        where = f"{path}: record {i}"
        yield where, _require_object(record, where)


def _require_object(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, found {type(record).__name__}")
    return record


# ---------------------------------------------------------------- records -> token sequences


def text_sample(record: dict[str, Any], *, fmt: str, tokenizer: Tokenizer, train_on_prompt: bool,
                where: str) -> tuple[list[int], list[int]]:
    """(ids, targets) of one alpaca or messages record; targets are aligned with ids, -100 where no loss."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if fmt == "alpaca":
        ids, trained = tokenize_pieces(alpaca_pieces(record, bos_id=bos, eos_id=eos, where=where), tokenizer)
    else:
        messages = chat_messages(record, where=where)
        if tokenizer.chat_template:
            ids, trained = chat_template_sample(tokenizer.backend, messages, bos_id=bos, eos_id=eos, where=where)
        else:
            ids, trained = tokenize_pieces(default_chat_pieces(messages, bos_id=bos, eos_id=eos), tokenizer)
    targets = [t if (m or train_on_prompt) else IGNORE_INDEX for t, m in zip(ids, trained, strict=True)]
    return ids, targets


def tokenize_pieces(pieces: list[Piece], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of each piece, concatenated, and the piece's flag repeated per token."""
    ids: list[int] = []
    trained: list[bool] = []
    for piece in merge_pieces(pieces):
        piece_ids = [piece.content] if isinstance(piece.content, int) else tokenizer.encode(piece.content)
        ids += piece_ids
        trained += [piece.trained] * len(piece_ids)
    return ids, trained


def pretokenized_sample(record: dict[str, Any], *, where: str) -> tuple[list[int], list[int]]:
    """(ids, targets) of a pre-tokenized record; positions with attention_mask 0 (padding) are dropped."""
    ids = _int_list(record, "input_ids", where)
    labels = _int_list(record, "labels", where, required=False)
    mask = _int_list(record, "attention_mask", where, required=False)
    targets = list(ids) if labels is None else labels  # no labels: every token is trained on
    for name, values in (("labels", labels), ("attention_mask", mask)):
        if values is not None and len(values) != len(ids):
            raise InputError(f"{where}: '{name}' has {len(values)} entries but 'input_ids' has {len(ids)}")
    if mask is not None:
        keep = [k for k, m in enumerate(mask) if m]
        ids, targets = [ids[k] for k in keep], [targets[k] for k in keep]
    return ids, targets


def _int_list(record: dict[str, Any], key: str, where: str, *, required: bool = True) -> list[int] | None:
    value = record.get(key)
    if value is None:
        if required:
            raise InputError(f"{where}: pretokenized record lacks '{key}'; found keys {sorted(record)}")
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError(f"{where}: '{key}' must be a list of integers")
    return value


def _check_ids(ids: list[int], targets: list[int], limit: int | None, where: str) -> None:
    if limit is None or not ids:
        return
    used = [t for t in targets if t != IGNORE_INDEX] + ids
    bad = next((t for t in used if not 0 <= t < limit), None)
    if bad is not None:
        raise InputError(f"{where}: token id {bad} is outside the model's vocabulary of {limit}; "
                         f"the data was tokenized with a different tokenizer")


# ---------------------------------------------------------------- dataset


@dataclass
class DataStats:
    samples: int  # rows kept
    truncated: int  # rows cut to seq_length + 1 tokens
    tokens: int  # real (non-padding) input positions
    loss_tokens: int  # positions with a label
    dropped_empty: int  # records left with no trained token (after truncation) and skipped


@dataclass
class TokenizedDataset:
    """Fixed-length rows: labels[i, t] is the target for input position t (the next token), -100 = no loss."""

    input_ids: torch.Tensor  # [N, seq_length] int64, right-padded with pad_id
    labels: torch.Tensor  # [N, seq_length] int64
    stats: DataStats

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) rows for `indices`, each [len(indices), seq_length]."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.input_ids[index], self.labels[index]


def load_dataset(path: Path, *, fmt: str, tokenizer: Tokenizer | None, seq_length: int,
                 train_on_prompt: bool = False, vocab_size: int | None = None,
                 records: Iterable[tuple[str, dict[str, Any]]] | None = None) -> TokenizedDataset:
    """Read, template, tokenize, mask, truncate and pad a whole SFT file.

    Args:
        fmt: "alpaca", "messages" (alias "sharegpt") or "pretokenized".
        tokenizer: required except for pretokenized data (where it supplies pad_id and the vocabulary bound).
        vocab_size: the model's true vocabulary; ids at or above it are refused.
        records: (where, record) pairs to use instead of reading `path` (Parquet, Hub datasets, indexed
            datasets: megallama.data.sources); `path` then only names the data in messages.

    Example:
        >>> ds = load_dataset(Path("train.jsonl"), fmt="alpaca", tokenizer=tok, seq_length=2048)
        >>> ds.input_ids.shape, ds.stats.truncated
    """
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    _check_arguments(fmt, tokenizer, seq_length, train_on_prompt, vocab_size)
    limit = vocab_size if vocab_size is not None else (tokenizer.vocab_size if tokenizer else None)
    samples, truncated, dropped = [], 0, 0
    for where, record in read_records(path) if records is None else records:
        if fmt == "pretokenized":
            ids, targets = pretokenized_sample(record, where=where)
        else:
            ids, targets = text_sample(record, fmt=fmt, tokenizer=tokenizer, train_on_prompt=train_on_prompt,
                                       where=where)
        _check_ids(ids, targets, limit, where)
        if len(ids) > seq_length + 1:
            ids, targets, truncated = ids[: seq_length + 1], targets[: seq_length + 1], truncated + 1
        if len(ids) < 2 or all(t == IGNORE_INDEX for t in targets[1:]):
            dropped += 1
            continue
        samples.append((ids, targets))
    if not samples:
        why = (f"all {dropped} records are left without a trained token (prompts longer than seq_length "
               f"{seq_length}?)" if dropped else "the file holds no records")
        raise InputError(f"{path}: no usable {fmt} samples: {why}")
    return _pad_rows(samples, seq_length, tokenizer.pad_id if tokenizer else 0, truncated, dropped)


def _check_arguments(fmt: str, tokenizer: Tokenizer | None, seq_length: int, train_on_prompt: bool,
                     vocab_size: int | None) -> None:
    if fmt not in FORMATS:
        raise InputError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if seq_length < 1:
        raise InputError(f"seq_length must be positive, got {seq_length}")
    if fmt == "pretokenized" and train_on_prompt:
        raise InputError("train_on_prompt has no effect on pretokenized data, whose labels decide the loss; "
                         "set data.train_on_prompt: false")
    if fmt != "pretokenized" and tokenizer is None:
        raise InputError(f"data format {fmt!r} needs a tokenizer")
    if tokenizer and vocab_size is not None and max(tokenizer.vocab_size, tokenizer.pad_id + 1) > vocab_size:
        raise InputError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"has {vocab_size}; use the tokenizer the checkpoint was converted with")


def _pad_rows(samples: list[tuple[list[int], list[int]]], seq_length: int, pad_id: int, truncated: int,
              dropped: int) -> TokenizedDataset:
    input_ids = torch.full((len(samples), seq_length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), seq_length), IGNORE_INDEX, dtype=torch.long)
    # The shift: position t predicts token t + 1. One scatter of all rows, not one small tensor per row.
    lengths = torch.tensor([len(ids) - 1 for ids, _ in samples])
    rows = torch.repeat_interleave(torch.arange(len(samples)), lengths)
    cols = torch.arange(len(rows)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    input_ids[rows, cols] = torch.tensor([t for ids, _ in samples for t in ids[:-1]], dtype=torch.long)
    labels[rows, cols] = torch.tensor([t for _, targets in samples for t in targets[1:]], dtype=torch.long)
    stats = DataStats(samples=len(samples), truncated=truncated, tokens=int(lengths.sum()),
                      loss_tokens=int((labels != IGNORE_INDEX).sum()), dropped_empty=dropped)
    return TokenizedDataset(input_ids, labels, stats)


def describe_sample(dataset: TokenizedDataset, index: int, tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """Row `index` as decoded runs of (text, trained), for showing users what the loss covers."""
    ids = dataset.input_ids[index].tolist()
    trained = [label != IGNORE_INDEX for label in dataset.labels[index].tolist()]
    n = int((dataset.labels[index] != IGNORE_INDEX).nonzero().max()) + 1  # through the last target
    # Target t is token t + 1, so the trained flag of token k is that of position k - 1.
    tokens = ids[:n] + [dataset.labels[index, n - 1].item()]
    flags = [False] + trained[:n]
    runs: list[tuple[list[int], bool]] = []
    for tok, flag in zip(tokens, flags, strict=True):
        if runs and runs[-1][1] == flag:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], flag))
    return [(tokenizer.decode(run), flag) for run, flag in runs]


# ---------------------------------------------------------------- batching


def global_batches(num_samples: int, *, global_batch_size: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Deterministic infinite iterator of index lists, one list of global_batch_size sample indices per step.

    The samples form one stream of epochs, each a fresh seeded permutation; step k takes stream positions
    [k * gbs, (k + 1) * gbs), so a batch may straddle two epochs and start_step skips ahead exactly (for resume)
    without replaying earlier epochs.
    """
    if num_samples < 1 or global_batch_size < 1 or start_step < 0:
        raise InputError(f"cannot batch {num_samples} samples in global batches of {global_batch_size} "
                         f"from step {start_step}")
    epoch, offset = divmod(start_step * global_batch_size, num_samples)
    order = _epoch_order(num_samples, seed, epoch)
    while True:
        batch: list[int] = []
        while len(batch) < global_batch_size:
            take = min(global_batch_size - len(batch), num_samples - offset)
            batch += order[offset: offset + take]
            offset += take
            if offset == num_samples:
                epoch, offset = epoch + 1, 0
                order = _epoch_order(num_samples, seed, epoch)
        yield batch


def _epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    # One generator per epoch, seeded from (seed, epoch), so any epoch is reachable without the ones before.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(num_samples, generator=generator).tolist()


def dp_microbatches(indices: list[int], *, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    """Split one global batch: DP rank r takes the contiguous r-th 1/dp_size portion, cut into micro-batches."""
    if dp_size < 1 or micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
        raise InputError(f"invalid data-parallel split: rank {dp_rank} of {dp_size}, micro-batch {micro_batch_size}")
    if len(indices) % (dp_size * micro_batch_size):
        raise InputError(f"global batch size {len(indices)} is not a multiple of micro_batch_size × dp = "
                         f"{micro_batch_size} × {dp_size}; pick train.global_batch_size accordingly")
    per_rank = len(indices) // dp_size
    mine = indices[dp_rank * per_rank: (dp_rank + 1) * per_rank]
    return [mine[k: k + micro_batch_size] for k in range(0, per_rank, micro_batch_size)]


# ---------------------------------------------------------------- a dataset a tiny model learns quickly


CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo", "Egypt": "Cairo",
            "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens", "Cuba": "Havana",
            "Chile": "Santiago", "Poland": "Warsaw"}
WORDS = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "red", "blue", "green", "one", "two", "book",
         "door", "cup", "hat")


def learnable_examples(n: int, *, seed: int = 0) -> list[tuple[str, str, str]]:
    """n (instruction, input, output) triples: capitals to memorise, word lists to repeat or reverse."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        task = rng.choice(("capital", "repeat", "reverse"))
        if task == "capital":
            country = rng.choice(sorted(CAPITALS))
            examples.append((f"What is the capital of {country}?", "", CAPITALS[country]))
            continue
        words = rng.sample(WORDS, rng.randint(2, 4))
        output = words if task == "repeat" else words[::-1]
        examples.append((f"{task.capitalize()} the words.", " ".join(words), " ".join(output)))
    return examples


def learnable_lines() -> list[str]:
    """Text to add to a tokenizer's training corpus (train_tokenizer(extra_lines=...)) so it covers the task well."""
    lines = [f"What is the capital of {c}? {a}" for c, a in CAPITALS.items()]
    # The prompt templates repeat in every sample; repeating them here lets BPE merge them into few tokens.
    templates = [t.replace("\n", " ") for t in (ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, *ROLE_HEADERS.values())]
    return lines + ["Repeat the words. Reverse the words. " + " ".join(WORDS)] * 4 + templates * 64


def make_learnable_dataset(path: Path, *, n: int, seed: int = 0, fmt: str = "alpaca") -> Path:
    """Write a small synthetic SFT dataset (JSONL) that a tiny model visibly learns within a few dozen steps.

    fmt: "alpaca" ({instruction, input, output}), "messages" (role/content) or "sharegpt" (from/value).
    """
    if fmt not in ("alpaca", "messages", "sharegpt"):
        raise InputError(f"make_learnable_dataset writes alpaca, messages or sharegpt, not {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for instruction, inp, output in learnable_examples(n, seed=seed):
            question = f"{instruction} {inp}".strip()
            record = {
                "alpaca": {"instruction": instruction, "input": inp, "output": output},
                "messages": {"messages": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": output}]},
                "sharegpt": {"conversations": [{"from": "human", "value": question},
                                               {"from": "gpt", "value": output}]},
            }[fmt]
            f.write(json.dumps(record) + "\n")
    return path
