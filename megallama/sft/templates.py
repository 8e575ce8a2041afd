"""Prompt templates for SFT: how a record becomes tokens, and which of them the loss is computed on.

A sample is built as a list of pieces, each either text (tokenized later) or a special token id, with a flag
saying whether the loss covers it. Text pieces are tokenized one by one, so the prompt/response boundary falls
exactly between two pieces and masking never depends on how BPE merges across it. A tokenizer's own chat
template is the exception: it is rendered to one string and tokenized whole (as at inference), and tokenizing
the text up to each turn edge decides which tokens belong to assistant turns (`chat_template_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megallama.errors import InputError

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""The Stanford Alpaca prompt for records with a non-empty `input`; the `output` follows it, then EOS."""

ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""The Stanford Alpaca prompt for records whose `input` is missing or empty."""

ROLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
"""Default chat layout, used when the tokenizer has no chat template of its own (Zephyr-like):

    BOS <|system|>\\n{system}\\n <|user|>\\n{user}\\n <|assistant|>\\n{assistant} EOS <|user|>\\n{user}\\n ...

BOS and EOS are the tokenizer's ids, not literal strings (the tags are plain text, so any vocabulary covers
them). The loss covers each assistant `{content}` and its EOS; tags, system and user turns are prompt.
"""

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
"""ShareGPT `from` values (and the OpenAI-style role names) mapped to chat roles."""


@dataclass(frozen=True)
class Piece:
    """Text to tokenize or one special token id, and whether the loss covers its tokens."""

    content: str | int
    trained: bool


# ---------------------------------------------------------------- records -> chat messages / pieces


def alpaca_pieces(record: dict[str, Any], *, bos_id: int | None, eos_id: int | None, where: str) -> list[Piece]:
    """BOS + Alpaca prompt + output + EOS, the output and EOS trained."""
    instruction = _text_field(record, "instruction", where)
    output = _text_field(record, "output", where)
    inp = _text_field(record, "input", where, required=False)
    prompt = (ALPACA_TEMPLATE.format(instruction=instruction, input=inp) if inp
              else ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction))
    return _wrap(bos_id, [Piece(prompt, False), Piece(output, True)], eos_id)


def chat_messages(record: dict[str, Any], *, where: str) -> list[dict[str, str]]:
    """`messages` (role/content) or ShareGPT `conversations` (from/value) as [{"role", "content"}]."""
    if "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    elif "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    else:
        raise InputError(f"{where}: chat record needs a 'messages' or 'conversations' list; "
                         f"found keys {sorted(record)}")
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{where}: '{'messages' if role_key == 'role' else 'conversations'}' must be a "
                         f"non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise InputError(f"{where}: turn {i} needs '{role_key}' and '{text_key}'; found {turn!r:.80}")
        role = SHAREGPT_ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise InputError(f"{where}: turn {i} has unknown role {turn[role_key]!r}; "
                             f"expected one of {sorted(SHAREGPT_ROLES)}")
        if not isinstance(turn[text_key], str):
            raise InputError(f"{where}: turn {i} '{text_key}' must be a string, found {type(turn[text_key]).__name__}")
        messages.append({"role": role, "content": turn[text_key]})
    return messages


def default_chat_pieces(messages: list[dict[str, str]], *, bos_id: int | None, eos_id: int | None) -> list[Piece]:
    """The ROLE_HEADERS layout: assistant contents and their EOS trained, everything else prompt."""
    pieces: list[Piece] = []
    for m in messages:
        if m["role"] == "assistant":
            pieces.append(Piece(ROLE_HEADERS["assistant"], False))
            pieces.append(Piece(m["content"], True))
            if eos_id is not None:
                pieces.append(Piece(eos_id, True))
        else:
            pieces.append(Piece(f"{ROLE_HEADERS[m['role']]}{m['content']}\n", False))
    return _wrap(bos_id, pieces, None)


def _wrap(bos_id: int | None, pieces: list[Piece], eos_id: int | None) -> list[Piece]:
    head = [Piece(bos_id, False)] if bos_id is not None else []
    tail = [Piece(eos_id, True)] if eos_id is not None else []
    return head + pieces + tail


def _text_field(record: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise InputError(f"{where}: alpaca record lacks '{key}'; found keys {sorted(record)}")
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: '{key}' must be a string, found {type(value).__name__}")
    return value


def merge_pieces(pieces: list[Piece]) -> list[Piece]:
    """Join neighbouring text pieces with the same flag, so a prompt is tokenized in one go (as at inference)."""
    merged: list[Piece] = []
    for p in pieces:
        prev = merged[-1] if merged else None
        if prev and isinstance(prev.content, str) and isinstance(p.content, str) and prev.trained == p.trained:
            merged[-1] = Piece(prev.content + p.content, p.trained)
        else:
            merged.append(p)
    return merged


# ---------------------------------------------------------------- the tokenizer's own chat template


def chat_template_sample(hf_tokenizer, messages: list[dict[str, str]], *, bos_id: int | None,
                         eos_id: int | None, where: str) -> tuple[list[int], list[bool]]:
    """Render with the tokenizer's chat template; return (ids, trained) with assistant turns trained.

    Assistant turn i spans from the end of render(messages[:i], add_generation_prompt=True) to the end of
    render(messages[:i+1]), so the header the template adds before a reply stays prompt and whatever it adds
    after (EOS, <|eot_id|>) is trained. The whole conversation is tokenized once (the ids the model sees at
    inference) and each span edge is placed by tokenizing the text up to it, so the mask follows those ids exactly.
    """
    full = _render(hf_tokenizer, messages, False, where)
    spans = [_assistant_span(hf_tokenizer, messages, i, full, where)
             for i, m in enumerate(messages) if m["role"] == "assistant"]
    ids, trained = _mask_tokens(hf_tokenizer, full, spans)
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids, trained = [bos_id, *ids], [False, *trained]
    if eos_id is not None and messages[-1]["role"] == "assistant" and eos_id not in _last_run(ids, trained):
        ids, trained = [*ids, eos_id], [*trained, True]
    return ids, trained


def _last_run(ids: list[int], trained: list[bool]) -> list[int]:
    """Ids of the last run of trained tokens: the final assistant turn as the template closed it."""
    end = max((k for k, m in enumerate(trained) if m), default=-1) + 1
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    return ids[start:end]


def _assistant_span(hf_tokenizer, messages: list[dict[str, str]], i: int, full: str, where: str) -> tuple[int, int]:
    """Character span of assistant turn i inside `full`, the rendering of the whole conversation."""
    upto = _render(hf_tokenizer, messages[: i + 1], False, where)
    # Templates whose generation prompt differs from the stored header (or that have none) fall back to the
    # end of the previous turn, which leaves the header trained but never cuts into the reply.
    starts = [_render(hf_tokenizer, messages[:i], gen, where, strict=bool(i)) for gen in (True, False)]
    starts += [] if i else [""]  # some templates cannot render an empty conversation
    start = next((p for p in starts if p is not None and full.startswith(p) and upto.startswith(p)), None)
    if start is None or not full.startswith(upto):
        raise InputError(f"{where}: the chat template renders earlier turns differently once later turns are "
                         f"added, so assistant turns cannot be located; use a tokenizer without chat_template to "
                         f"get the default template")
    return len(start), len(upto)


def _render(hf_tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool, where: str, *,
            strict: bool = True) -> str | None:
    try:
        return hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises plain exceptions (e.g. "roles must alternate") from the template
        if not strict:
            return None
        raise InputError(f"{where}: the tokenizer's chat template rejected this conversation: {e}") from e


def _mask_tokens(hf_tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and whether each falls in a character span (an assistant turn)."""
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    trained = [False] * len(ids)
    for start, end in spans:
        first, last = _token_boundary(hf_tokenizer, text, ids, start), _token_boundary(hf_tokenizer, text, ids, end)
        # A token that straddles a boundary holds reply characters, so the model must produce it: it is trained.
        first, last = first[0], last[0] + (0 if last[1] else 1)
        trained[first:last] = [True] * (last - first)
    return ids, trained


def _token_boundary(hf_tokenizer, text: str, ids: list[int], char: int) -> tuple[int, bool]:
    """(index of the first token of `ids` that starts at or straddles `char`, whether the boundary is clean).

    Found by tokenizing text[:char] and matching it against `ids`, not by offset mappings: tokenizers computes
    wrong offsets when it drops characters the vocabulary lacks.
    """
    prefix = hf_tokenizer.encode(text[:char], add_special_tokens=False)
    n = next((k for k, (a, b) in enumerate(zip(prefix, ids, strict=False)) if a != b), min(len(prefix), len(ids)))
    return n, n == len(prefix)
