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

import numpy as np

from megallama.errors import InputError
from megallama.sft.templates import (
    Piece,
    alpaca_pieces,
    chat_messages,
    chat_template_sample,
    default_chat_pieces,
    merge_pieces,
)
from megallama.sft.tokenizer import Tokenizer

# (megallama.sft.data, which imports torch, is imported where it is used: the tokenizing workers of `data prepare`
# import this module and should start in well under a second.)

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


def by_pieces(rules: SampleRules) -> bool:
    """Whether records of this format are text pieces and special tokens (record_pieces), or tokenized whole."""
    return rules.fmt in ("alpaca", "text") or (rules.fmt == "messages" and not rules.chat_template)


def record_pieces(record: dict[str, Any], where: str, rules: SampleRules, *, bos_id: int | None,
                  eos_id: int | None) -> list[Piece] | None:
    """The record as text pieces and special tokens, merged as sft's tokenize_pieces merges them, for the formats
    tokenized piece by piece (alpaca, messages in the default layout, text); None for the others (a chat template,
    pretokenized ids: encode_record). Tokenizing each piece and concatenating gives encode_record's sample, except
    that a text whose tokens are empty is an empty document (text_document), BOS and EOS included."""
    if rules.fmt == "alpaca":
        pieces = alpaca_pieces(record, bos_id=bos_id, eos_id=eos_id, where=where)
    elif rules.fmt == "messages" and not rules.chat_template:
        pieces = default_chat_pieces(chat_messages(record, where=where), bos_id=bos_id, eos_id=eos_id)
    elif rules.fmt == "text":
        head = [Piece(bos_id, True)] if bos_id is not None else []
        tail = [Piece(eos_id, True)] if eos_id is not None else []
        return [*head, Piece(text_field(record, where), True), *tail]
    else:
        return None
    return merge_pieces(pieces)


def encode_record(record: dict[str, Any], where: str, rules: SampleRules,
                  tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, mask) of one record, before truncation; InputError naming `where` when fields are missing."""
    from megallama.sft.data import IGNORE_INDEX, pretokenized_sample, tokenize_pieces

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
    text = text_field(record, where)
    ids = tokenizer.encode(text) if text else []
    if not ids:
        return []  # an empty document: dropped, as preprocess_data.py does
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return head + ids + tail


def text_field(record: dict[str, Any], where: str) -> str:
    text = record.get(TEXT_KEY)
    if not isinstance(text, str):
        found = f"found keys {sorted(record)}" if text is None else f"found {type(text).__name__}"
        raise InputError(f"{where}: text record needs a string '{TEXT_KEY}'; {found}")
    return text


def _check_vocab(ids: list[int], vocab_size: int, where: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise vocab_error(bad, vocab_size, where)


def vocab_error(token: int, vocab_size: int, where: str) -> InputError:
    return InputError(f"{where}: token id {token} is outside the tokenizer's vocabulary of {vocab_size}; "
                      f"the data was tokenized with a different tokenizer")


# ---------------------------------------------------------------- sft's cut-and-drop rule, per sample and per chunk

DROP_REASONS = (None, "empty text", "fewer than 2 tokens", "no trained token",
                "no trained token left after the cut to seq_length")  # fit_samples' codes index this


def fit_sample(ids: list[int], mask: list[bool], rules: SampleRules) -> tuple[list[int], list[bool], bool, str | None]:
    """(ids, mask, truncated, why dropped or None): sft's rule. SFT formats are cut to seq_length + 1 tokens; a
    sample is dropped when it has fewer than 2 tokens or no target after the cut (target 0 never counts)."""
    truncated = False
    if rules.fmt != "text" and rules.seq_length is not None and len(ids) > rules.seq_length + 1:
        ids, mask, truncated = ids[: rules.seq_length + 1], mask[: rules.seq_length + 1], True
    if not ids:
        return ids, mask, truncated, DROP_REASONS[1]
    if len(ids) < 2:
        return ids, mask, truncated, DROP_REASONS[2]
    if not any(mask[1:]):
        return ids, mask, truncated, DROP_REASONS[4] if truncated else DROP_REASONS[3]
    return ids, mask, truncated, None


def fit_samples(mask: np.ndarray, lengths: np.ndarray,
                rules: SampleRules) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fit_sample over concatenated samples at once (mask [tokens] bool, lengths [samples]): (length after the cut,
    truncated, why) per sample, `why` indexing DROP_REASONS (0: kept). `data prepare` calls this per chunk."""
    starts = np.cumsum(lengths) - lengths
    cut = lengths if rules.fmt == "text" or rules.seq_length is None else np.minimum(lengths, rules.seq_length + 1)
    truncated = cut < lengths
    before = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # before[k]: targets among tokens 0..k-1
    targets = before[starts + cut] - before[starts + np.minimum(cut, 1)]  # targets among tokens 1..cut-1
    why = np.select([cut == 0, cut < 2, targets == 0], [1, 2, np.where(truncated, 4, 3)], 0)
    return cut, truncated, why
