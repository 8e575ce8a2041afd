"""A record -> (token ids, loss mask): the rules of `sft` (megallama.sft.data / templates), shared by `data
prepare` and by `sft` reading Parquet, Hub datasets and plain text.

The mask is aligned with the ids: mask[k] is True when token k is a target, i.e. the loss covers predicting it
from tokens 0..k-1 (sft's `targets[k] != -100`). Token 0 is never a target (nothing precedes it).

Formats:
- alpaca / messages (alias sharegpt): as `sft`; messages use the tokenizer's chat template when `chat_template`
  is on (assistant turns located by rendering prefixes, so Llama 3's template, which has no `{% generation %}`
  markers, works), else the ROLE_HEADERS layout;
- text: `{"text": ...}` -> BOS + tokens + EOS (Megatron-LM's preprocess_data.py with --append-eod), all targets;
- pretokenized: `{"input_ids", "labels"?, "attention_mask"?}`, labels equal to input_ids or -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megallama.errors import InputError
from megallama.sft.data import IGNORE_INDEX, pretokenized_sample, tokenize_pieces
from megallama.sft.templates import alpaca_pieces, chat_messages, chat_template_sample, default_chat_pieces
from megallama.sft.tokenizer import Tokenizer

FORMATS = ("alpaca", "messages", "sharegpt", "text", "pretokenized")
FORMAT_ALIASES = {"sharegpt": "messages"}
SFT_FORMATS = ("alpaca", "messages", "pretokenized")  # formats whose records carry a loss mask
TEXT_KEY = "text"


@dataclass(frozen=True)
class SampleRules:
    """How records become samples."""

    fmt: str  # alpaca | messages | text | pretokenized (aliases resolved)
    chat_template: bool = False  # messages: the tokenizer's own chat template, else ROLE_HEADERS
    seq_length: int | None = None  # SFT formats: cut to seq_length + 1 tokens (seq_length input positions)


def canonical_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return FORMAT_ALIASES.get(fmt, fmt)


def encode_record(record: dict[str, Any], where: str, rules: SampleRules,
                  tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, mask) of one record, before truncation; InputError naming `where` when fields are missing."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if rules.fmt == "alpaca":
        ids, mask = tokenize_pieces(alpaca_pieces(record, bos_id=bos, eos_id=eos, where=where), tokenizer)
    elif rules.fmt == "messages":
        messages = chat_messages(record, where=where)
        if rules.chat_template:
            ids, mask = chat_template_sample(tokenizer.backend, messages, bos_id=bos, eos_id=eos, where=where)
        else:
            ids, mask = tokenize_pieces(default_chat_pieces(messages, bos_id=bos, eos_id=eos), tokenizer)
    elif rules.fmt == "text":
        ids = text_document(record, where, tokenizer)
        mask = [True] * len(ids)
    else:
        ids, targets = pretokenized_sample(record, where=where)
        bad = next((k for k, (t, i) in enumerate(zip(targets, ids, strict=True)) if t not in (i, IGNORE_INDEX)), None)
        if bad is not None:
            raise InputError(f"{where}: 'labels'[{bad}] is {targets[bad]}, neither input_ids[{bad}] "
                             f"({ids[bad]}) nor -100: a loss mask cannot hold labels that differ from the tokens")
        mask = [t != IGNORE_INDEX for t in targets]
    _check_vocab(ids, tokenizer.vocab_size, where)
    return ids, mask


def text_document(record: dict[str, Any], where: str, tokenizer: Tokenizer) -> list[int]:
    """BOS + tokens of record["text"] + EOS (the EOD that separates documents in a Megatron corpus)."""
    text = record.get(TEXT_KEY)
    if not isinstance(text, str):
        found = f"found keys {sorted(record)}" if text is None else f"found {type(text).__name__}"
        raise InputError(f"{where}: text record needs a string '{TEXT_KEY}'; {found}")
    ids = tokenizer.encode(text) if text else []
    if not ids:
        return []  # an empty document: dropped, as preprocess_data.py does
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return head + ids + tail


def _check_vocab(ids: list[int], vocab_size: int, where: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InputError(f"{where}: token id {bad} is outside the tokenizer's vocabulary of {vocab_size}; "
                         f"the data was tokenized with a different tokenizer")


def fit_sample(ids: list[int], mask: list[bool], rules: SampleRules) -> tuple[list[int], list[bool], bool, str | None]:
    """(ids, mask, truncated, why dropped or None): sft's rule. SFT formats are cut to seq_length + 1 tokens; a
    sample is dropped when it has fewer than 2 tokens or no target after the cut (target 0 never counts)."""
    truncated = False
    if rules.fmt != "text" and rules.seq_length is not None and len(ids) > rules.seq_length + 1:
        ids, mask, truncated = ids[: rules.seq_length + 1], mask[: rules.seq_length + 1], True
    if not ids:
        return ids, mask, truncated, "empty text"
    if len(ids) < 2:
        return ids, mask, truncated, "fewer than 2 tokens"
    if not any(mask[1:]):
        return ids, mask, truncated, ("no trained token left after the cut to seq_length" if truncated
                                      else "no trained token")
    return ids, mask, truncated, None
