"""Tokenizers for SFT: one interface over a sentencepiece `tokenizer.model` and a HuggingFace tokenizer folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megallama.errors import InputError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(eq=False)
class Tokenizer:
    """One interface over a sentencepiece `tokenizer.model` and a HuggingFace tokenizer.

    Example:
        >>> tok = load_tokenizer(Path("runs/llama-7b-tp4-pp2"))
        >>> [tok.bos_id, *tok.encode("Hello world")]
    """

    kind: str  # "sentencepiece" | "hf"
    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    chat_template: str | None = None
    backend: Any = field(default=None, repr=False)  # SentencePieceProcessor or a transformers tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS or EOS added."""
        if self.kind == "sentencepiece":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list:
        """encode() of each text, the same ids as int32 arrays, in one call into the tokenizer (no Python call per
        text: that overhead is a tenth of sentencepiece's time on instruction-length texts)."""
        import numpy as np

        if not texts:
            return []
        if self.kind == "sentencepiece":  # one thread: `data prepare` parallelises with processes
            try:
                return self.backend.encode(texts, num_threads=1, return_type="numpy")
            except TypeError:  # sentencepiece < 0.2.1 has no return_type
                return [np.asarray(ids, dtype=np.int32) for ids in self.backend.encode(texts, num_threads=1)]
        if getattr(self.backend, "is_fast", False):  # transformers encodes a single text as a batch of one
            batch = self.backend(texts, add_special_tokens=False)["input_ids"]
        else:
            batch = [self.encode(text) for text in texts]
        return [np.asarray(ids, dtype=np.int32) for ids in batch]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))


def load_tokenizer(path: Path) -> Tokenizer:
    """A `tokenizer.model` file, or a folder holding `tokenizer.model` or HF tokenizer files.

    sentencepiece is used for `tokenizer.model` (as Megatron's Llama2Tokenizer does: HF's converted tokenizer
    splits runs of spaces differently), unless the folder carries a chat template, which needs transformers.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"tokenizer {path} does not exist; pass a tokenizer.model file or a tokenizer folder")
    if path.is_file():
        return _load_hf(path.parent) if path.name in HF_TOKENIZER_FILES else _load_sentencepiece(path)
    if (path / "tokenizer.model").is_file() and not _has_chat_template(path):
        return _load_sentencepiece(path / "tokenizer.model")
    if not any((path / name).is_file() for name in HF_TOKENIZER_FILES):
        raise InputError(f"tokenizer folder {path} holds no tokenizer.model, tokenizer.json or tokenizer_config.json")
    return _load_hf(path)


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (json.JSONDecodeError, AttributeError) as e:
        raise InputError(f"{config}: not a JSON object ({e})") from e


def _load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise InputError(f"{path} is not a sentencepiece model ({e})") from e
    bos, eos = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id()))
    pad = sp.pad_id() if sp.pad_id() >= 0 else (eos if eos is not None else 0)
    return Tokenizer("sentencepiece", path, sp.get_piece_size(), bos, eos, pad, None, sp)


def _load_hf(folder: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ImportError... depending on what is missing
        raise InputError(f"cannot load the HF tokenizer in {folder}: {e}".splitlines()[0]) from e
    template = tok.chat_template
    if isinstance(template, dict):  # several named templates: apply_chat_template uses "default"
        template = template.get("default")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad = next(i for i in (tok.pad_token_id, eos, 0) if i is not None)
    return Tokenizer("hf", folder, len(tok), bos, eos, pad, template or None, tok)
