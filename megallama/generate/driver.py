"""megallama generate: text from a Megatron checkpoint, run by megatron-core's GPTModel at its own TP x PP.

The parent (this module) reads the prompts, tokenizes them with the checkpoint's tokenizer and the SFT prompt
templates, and launches `generate_worker.py` under torchrun; every rank loads its slice through the canonical
Reader (so any checkpoint format megallama reads works) and the ranks decode together, one token per pipeline
pass. Library code: returns `Completion`s, reports progress through an optional callback, never prints.

Example:
    done = generate(Path("runs/sft"), [Prompt("Hello")], max_new_tokens=16)
    done[0].completion
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megallama.errors import InputError, MegallamaError

OnProgress = Callable[[str, int, int], None]  # (what, done, total): "workers", "tokens" (the CLI renders it)
EVENT = "@@megallama-progress "  # prefix of the progress lines rank 0 prints for the parent


# ---------------------------------------------------------------- prompts
@dataclass
class Prompt:
    """One prompt as the user gave it: plain text, an Alpaca record, or a chat conversation."""

    text: str  # what the --json output calls "prompt"
    record: dict | None = None  # {"instruction", "input"} or {"messages"/"conversations"}; None for plain text


@dataclass
class Completion:
    prompt: str
    completion: str
    completion_ids: list[int]
    prompt_ids: list[int] = field(repr=False, default_factory=list)
    stop: str = "length"  # "eos" when the model ended the text, "length" at --max-new-tokens
    timing: dict = field(default_factory=dict)  # the whole run's: time_to_first_token_s, tokens_per_s

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "completion_ids": self.completion_ids,
                "stop": self.stop, **self.timing}


def read_prompts(path: Path) -> list[Prompt]:
    """A JSONL file, one prompt a line: a JSON string, {"prompt": text}, an Alpaca record ({"instruction",
    "input"}) or a chat record ({"messages"} / ShareGPT {"conversations"})."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist")
    from megallama.sft.data import json_lines

    prompts = [_prompt(item, where) for where, item in json_lines(path)]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts")
    return prompts


def _prompt(item, where: str) -> Prompt:
    if isinstance(item, str):
        return Prompt(item)
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return Prompt(item["prompt"])
    if isinstance(item, dict) and isinstance(item.get("instruction"), str):
        text = item["instruction"] + (f"\n{item['input']}" if item.get("input") else "")
        return Prompt(text, {"instruction": item["instruction"], "input": item.get("input") or ""})
    if isinstance(item, dict) and ("messages" in item or "conversations" in item):
        from megallama.sft.templates import chat_messages

        messages = chat_messages(item, where=where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a record from SFT data: the model writes the last reply itself
        if not messages:
            raise InputError(f"{where}: the conversation has no turn before the assistant's reply")
        return Prompt(messages[-1]["content"], {"messages": messages})
    raise InputError(f"{where}: expected a JSON string, {{\"prompt\": ...}}, an Alpaca record (instruction, input) "
                     f"or a chat record (messages); found {json.dumps(item)[:80]}")


def prompt_ids(prompt: Prompt, tokenizer, *, chat: bool) -> list[int]:
    """Token ids the model continues from, built with the same templates `sft` trains on.

    Plain text: BOS + text (or, with `chat`, a one-turn conversation). Alpaca records: the Alpaca prompt up to
    "### Response:\\n". Conversations: the tokenizer's chat template with its generation prompt when it has one,
    else the default ROLE_HEADERS layout ending in the assistant header.
    """
    from megallama.sft.data import tokenize_pieces
    from megallama.sft.templates import ROLE_HEADERS, Piece, alpaca_pieces, default_chat_pieces

    bos = tokenizer.bos_id
    record = prompt.record
    if record is None and chat:
        record = {"messages": [{"role": "user", "content": prompt.text}]}
    if record is None:
        return ([bos] if bos is not None else []) + tokenizer.encode(prompt.text)
    if "instruction" in record:
        pieces = alpaca_pieces({**record, "output": ""}, bos_id=bos, eos_id=None, where="prompt")
        return tokenize_pieces(pieces, tokenizer)[0]
    messages = record["messages"]
    if tokenizer.chat_template:
        try:
            text = tokenizer.backend.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises plain exceptions from inside the template
            raise InputError(f"the tokenizer's chat template rejected prompt {prompt.text[:40]!r}: {e}") from None
        ids = tokenizer.encode(text)
        return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]
    pieces = default_chat_pieces(messages, bos_id=bos, eos_id=None) + [Piece(ROLE_HEADERS["assistant"], False)]
    return tokenize_pieces(pieces, tokenizer)[0]


# ---------------------------------------------------------------- choosing the next token
def next_token(logits: torch.Tensor, *, temperature: float, top_p: float,
               generator: torch.Generator | None = None) -> int:
    """Greedy (temperature 0) or nucleus sampling from one position's logits [vocab]."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= top_p] = 0.0  # keep the smallest top set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------- the whole command
@dataclass
class Settings:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 1234
    chat: bool = False
    dtype: str | None = None  # default: the checkpoint's own
    tp: int | None = None  # default: the checkpoint's own split
    pp: int | None = None
    batch_size: int = 16  # prompts decoded together (left-padded, one KV cache)
    ep: int | None = None  # expert parallelism (Llama 4): tp * pp * ep processes


def check_settings(s: Settings) -> None:
    problems = []
    if s.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1 (got {s.max_new_tokens})")
    if s.temperature < 0:
        problems.append(f"--temperature must be >= 0 (got {s.temperature}; 0 is greedy)")
    if not 0 < s.top_p <= 1:
        problems.append(f"--top-p must lie in (0, 1] (got {s.top_p})")
    problems += [f"{flag} must be >= 1 (got {size})" for flag, size in (("--tp", s.tp), ("--pp", s.pp))
                 if size is not None and size < 1]  # `s.tp or tp` would take 0 as the saved split
    if s.batch_size < 1:
        problems.append(f"--batch-size must be >= 1 (got {s.batch_size})")
    if problems:
        raise InputError("; ".join(problems))


def generate(megatron: Path, prompts: Sequence[Prompt], settings: Settings | None = None, *,
             tokenizer: Path | None = None, on_progress: OnProgress | None = None,
             model_config: Path | None = None) -> list[Completion]:
    """Complete every prompt with the Megatron checkpoint `megatron`; InputError for bad input (exit 2).
    `model_config` (--model-config) gives the architecture a checkpoint's args lack (the forks)."""
    from megallama.convert import open_reader
    from megallama.sft.tokenizer import load_tokenizer
    from megallama.spec import normalize_dtype, padded_vocab_size
    from megallama.verify.data import check_launchable

    s = settings or Settings()
    check_settings(s)
    megatron = Path(megatron)
    if not megatron.is_dir():
        raise InputError(f"Megatron folder {megatron} does not exist")
    from megallama.peft.store import checked_base, is_peft_run

    run = megatron if is_peft_run(megatron) else None  # LoRA/DoRA: its base, with the adapters applied unmerged
    if run is not None:
        megatron, _ = checked_base(run)
    with open_reader(megatron, "megatron", model_config=model_config) as reader:
        spec = reader.spec
        tp, pp = getattr(reader, "saved_tp", reader.tp), getattr(reader, "saved_pp", reader.pp)  # torch_dist
        ep = getattr(reader, "saved_ep", reader.ep)
    tp, pp, ep = s.tp or tp, s.pp or pp, s.ep or ep
    check_launchable(spec, tp=tp, pp=pp, ep=ep)  # TP, PP (EP) divide the model; on GPU, the ranks fit the GPUs
    tok = load_tokenizer(tokenizer or megatron)
    ids = [prompt_ids(p, tok, chat=s.chat) for p in prompts]
    for p, row in zip(prompts, ids, strict=True):
        if not row:
            raise InputError(f"prompt {p.text[:40]!r} has no tokens")
        if max(row) >= spec.vocab_size:
            raise InputError(f"the tokenizer produced id {max(row)} but the model's vocab is {spec.vocab_size}: "
                             "the tokenizer does not belong to this checkpoint")
        if len(row) + s.max_new_tokens > spec.max_position_embeddings:
            raise InputError(f"prompt {p.text[:40]!r}: {len(row)} tokens + --max-new-tokens {s.max_new_tokens} "
                             f"exceed the model's {spec.max_position_embeddings} positions")
    dtype = normalize_dtype(s.dtype) or spec.dtype
    job = {"megatron": str(megatron.resolve()), "tp": tp, "pp": pp, "ep": ep, "dtype": dtype,
           "padded_vocab_size": padded_vocab_size(spec.vocab_size, tp), "prompts": ids,
           "eos_id": tok.eos_id, "settings": asdict(s), "adapters": None if run is None else str(run.resolve()),
           "model_config": None if model_config is None else str(Path(model_config).resolve())}
    outputs, timing = run_workers(job, on_progress=on_progress)
    done = []
    for p, row, (new, stop) in zip(prompts, ids, outputs, strict=True):
        done.append(Completion(p.text, tok.decode(new), new, row, stop, timing))
    return done


def run_workers(job: dict, *, on_progress: OnProgress | None = None) -> tuple[list[tuple[list[int], str]], dict]:
    """Launch the ranks; [(new token ids, stop reason)] per prompt, and the timings (time to first token, tokens/s
    from the start of decoding to its end; start-up and model loading excluded)."""
    from megallama.engine.launch import stream_torchrun

    report = on_progress or (lambda what, done, total: None)

    def on_line(line: str) -> bool:
        if not line.startswith(EVENT):
            return False
        event = json.loads(line[len(EVENT):])
        report(event["what"], event["done"], event["total"])
        return True

    with tempfile.TemporaryDirectory(prefix="megallama-generate-") as tmp:
        job_file, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps({**job, "out": tmp}))
        world = job["tp"] * job["pp"] * job.get("ep", 1)
        report("workers", 0, world)
        returncode, tail = stream_torchrun(["-m", "megallama.generate.worker", str(job_file)],
                                           nproc=world, on_line=on_line)
        error = Path(tmp) / "error.json"
        if error.is_file():
            e = json.loads(error.read_text())
            failure = (InputError if e.get("exit_code") == 2 else MegallamaError)(e["message"])
            failure.detail = e.get("traceback")
            raise failure
        if returncode != 0 or not result.is_file():
            raise MegallamaError(f"generate workers (TP={job['tp']}, PP={job['pp']}) exited with {returncode}: "
                                 + " | ".join(tail[-3:]))
        timing = Path(tmp) / "timing.json"
        timing = json.loads(timing.read_text()) if timing.is_file() else {}
        return [(r["ids"], r["stop"]) for r in json.loads(result.read_text())], timing


def write_json(done: Sequence[Completion], path: Path) -> None:
    """The --json contract: a list of {"prompt", "completion", "completion_ids"} (plus "stop" and the run's
    "time_to_first_token_s", "generate_seconds", "new_tokens", "tokens_per_s")."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([c.to_json() for c in done], indent=2, ensure_ascii=False) + "\n")
