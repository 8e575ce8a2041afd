"""megallama generate: token choice, prompt templates, and greedy parity with transformers' `generate` (fp32) at
TP1 (through the CLI, with --json, on a model whose EOS wins early) and at TP2 x PP2 (through the library).

Two torchrun launches in all (~10 s and ~20 s on 2 cores).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli

from megallama.convert import convert
from megallama.errors import InputError
from megallama.generate.driver import Prompt, Settings, generate, next_token, prompt_ids, read_prompts
from megallama.sft.data import text_sample
from megallama.sft.templates import ROLE_HEADERS
from megallama.sft.tokenizer import load_tokenizer

PROMPTS = ["The history of the printing press", "Return a new list"]
NEW_TOKENS = 10


# ---------------------------------------------------------------- choosing tokens (no launches)
def test_greedy_is_argmax_and_sampling_is_seeded():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert next_token(logits, temperature=0.0, top_p=1.0) == 1
    draws = [next_token(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(7))
             for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed, the same choice
    many = {next_token(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(s))
            for s in range(200)}
    assert many == {0, 1, 2, 3}


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    chosen = {next_token(logits, temperature=1.0, top_p=0.8, generator=gen) for _ in range(300)}
    assert chosen == {0, 1}  # 0.5 + 0.3 reach 0.8: the tail is never drawn
    assert {next_token(logits, temperature=1.0, top_p=0.01, generator=gen) for _ in range(50)} == {0}


# ---------------------------------------------------------------- prompts
def test_prompt_ids_use_the_sft_templates(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert prompt_ids(Prompt("Hello world"), tok, chat=False) == [tok.bos_id, *tok.encode("Hello world")]
    record = {"instruction": "Add the numbers", "input": "2 3"}
    ids = prompt_ids(Prompt("Add the numbers\n2 3", record), tok, chat=False)
    full, targets = text_sample({**record, "output": "5"}, fmt="alpaca", tokenizer=tok, train_on_prompt=False,
                                where="t")
    assert ids == full[: targets.index(next(t for t in targets if t != -100))]  # exactly sft's prompt part
    chat = prompt_ids(Prompt("hi"), tok, chat=True)
    assert tok.decode(chat[1:]) == tok.decode(tok.encode(f"{ROLE_HEADERS['user']}hi\n{ROLE_HEADERS['assistant']}"))


def test_read_prompts_formats_and_refusals(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('"plain"\n{"prompt": "p"}\n\n{"instruction": "i", "input": "x"}\n'
                    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    got = read_prompts(path)
    assert [p.text for p in got] == ["plain", "p", "i\nx", "q"]
    assert got[3].record == {"messages": [{"role": "user", "content": "q"}]}  # the reply is the model's to write
    path.write_text('{"text": 1}\n')
    with pytest.raises(InputError, match=r"p.jsonl:1: expected a JSON string"):
        read_prompts(path)
    path.write_text("")
    with pytest.raises(InputError, match="holds no prompts"):
        read_prompts(path)


@pytest.mark.parametrize(("args", "message"), [
    ([], "give exactly one of --prompt TEXT and --prompts FILE.jsonl"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1 (got 0)"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p must lie in (0, 1] (got 1.5)"),
])
def test_cli_refusals_exit_2(hf_dir, tmp_path, args, message):
    result = cli("generate", "--megatron", str(hf_dir), *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_missing_checkpoint_and_too_long_prompt_exit_2(gen_megs, tmp_path):
    result = cli("generate", "--megatron", str(tmp_path / "nope"), "--prompt", "x")
    assert result.exit_code == 2 and "does not exist" in result.output
    with pytest.raises(InputError, match="exceed the model's 4096 positions"):
        generate(gen_megs["tp2pp2"], [Prompt("x")], Settings(max_new_tokens=5000))


# ---------------------------------------------------------------- parity with transformers
def hf_greedy(hf_dir: Path, ids: list[int], eos_id: int) -> list[int]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos_id,
                             pad_token_id=eos_id)
    return out[0, len(ids):].tolist()


def eos_wins_early(hf_dir: Path, out_dir: Path) -> Path:
    """A copy of the model whose EOS output row is 1.5x the row of a token greedy decoding picks at step 3,
    so that the EOS stop is exercised (a random model rarely says EOS by itself)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, out_dir)
    tok = load_tokenizer(hf_dir)
    ids = prompt_ids(Prompt(PROMPTS[0]), tok, chat=False)
    target = hf_greedy(hf_dir, ids, tok.eos_id)[3]
    (weights,) = out_dir.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["lm_head.weight"][tok.eos_id] = 1.5 * tensors["lm_head.weight"][target]
    save_file(tensors, weights, metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="session")
def gen_megs(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    eos_hf = eos_wins_early(hf_dirs["llama3"], root / "hf-eos")
    return {"hf-eos": eos_hf, "hf-llama2": hf_dirs["llama2"],
            "tp1": convert(eos_hf, root / "meg-tp1", src_format="hf", dst_format="megatron").output,
            "tp2pp2": convert(hf_dirs["llama2"], root / "meg-tp2-pp2", src_format="hf", dst_format="megatron",
                              tp=2, pp=2).output}


@pytest.mark.slow
def test_greedy_equals_transformers_at_tp1_through_the_cli(gen_megs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    answers = tmp_path / "answers.json"
    result = cli("generate", "--megatron", str(gen_megs["tp1"]), "--prompts", str(prompts),
                 "--max-new-tokens", str(NEW_TOKENS), "--json", str(answers))
    assert result.exit_code == 0, result.output
    got = json.loads(answers.read_text())
    tok = load_tokenizer(gen_megs["tp1"])
    assert [g["prompt"] for g in got] == PROMPTS
    for g in got:
        ids = prompt_ids(Prompt(g["prompt"]), tok, chat=False)
        want = hf_greedy(gen_megs["hf-eos"], ids, tok.eos_id)
        assert g["completion_ids"] + ([tok.eos_id] if g["stop"] == "eos" else []) == want
        assert g["completion"] == tok.decode(g["completion_ids"]) and g["completion"] in result.stdout
    assert got[0]["stop"] == "eos" and len(got[0]["completion_ids"]) <= 3  # EOS ends the text, not the limit


@pytest.mark.slow
def test_greedy_equals_transformers_at_tp2_pp2(gen_megs):
    events = []
    done = generate(gen_megs["tp2pp2"], [Prompt(p) for p in PROMPTS], Settings(max_new_tokens=NEW_TOKENS),
                    on_progress=lambda *e: events.append(e))
    tok = load_tokenizer(gen_megs["tp2pp2"])
    for c in done:
        want = hf_greedy(gen_megs["hf-llama2"], c.prompt_ids, tok.eos_id)
        assert c.completion_ids + ([tok.eos_id] if c.stop == "eos" else []) == want
    assert ("workers", 4, 4) in events and ("prompts", 2, 2) in events
    assert ("tokens", 2 * NEW_TOKENS, 2 * NEW_TOKENS) in events


# ---------------------------------------------------------------- progress (verify and generate share it)
def test_plain_progress_lines_when_not_a_terminal(capsys):
    from megallama.cli.common import step_progress

    with step_progress() as on_progress:  # pytest's stderr is not a terminal
        for done in range(4):
            on_progress("tokens", done, 3)
        on_progress("workers", 2, 2)
    assert capsys.readouterr().err.splitlines() == ["tokens generated: 3/3", "workers started: 2/2"]


@pytest.mark.slow
def test_verify_reports_workers_forward_and_points(gen_megs):
    from megallama.verify.layer_diff import layer_diff

    events = []
    report = layer_diff(gen_megs["hf-eos"], gen_megs["tp1"], seq_len=8, batch=1,
                        on_progress=lambda *e: events.append(e))
    assert report.passed, [p.name for p in report.points if not p.ok]  # batch 1: captures must be copies
    points = len(report.points)
    assert events[:3] == [("workers", 0, 1), ("workers", 1, 1), ("forward", 1, 1)]
    assert events[3:] == [("layers", n, points) for n in range(1, points + 1)]


# ---------------------------------------------------------------- the tokenizer's chat template, another TP x PP
# A template that writes BOS itself (as Llama 2 / 3 / Mistral's do) and one that does not (as Zephyr's).
CHAT_TEMPLATES = {
    "with-bos": ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == "
                 "'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                 "{% endif %}"),
    "no-bos": ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}[assistant] {% endif %}"),
}
CHATS = [[{"role": "user", "content": PROMPTS[0]}],  # what --chat makes of a plain prompt
         [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital?"},
          {"role": "assistant", "content": "Paris"}, {"role": "user", "content": PROMPTS[1]}]]


@pytest.fixture(scope="module")
def chat_tokenizers(hf_dirs, tmp_path_factory) -> dict[str, Path]:
    """HF tokenizer folders of the llama2 fixture's tokenizer.model, each with a chat template."""
    from transformers import LlamaTokenizer

    root = tmp_path_factory.mktemp("chat-tokenizers")
    folders = {}
    for name, template in CHAT_TEMPLATES.items():
        hf = LlamaTokenizer.from_pretrained(str(hf_dirs["llama2"]))
        hf.chat_template = template
        hf.save_pretrained(str(root / name))
        folders[name] = root / name
    return folders


def template_ids(folder: Path, messages: list[dict]) -> list[int]:
    """transformers' own rendering and tokenization of the conversation, ready for the assistant's reply."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    return list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_chat_prompts_are_the_tokenizers_own_template(chat_tokenizers, template):
    """--chat (a plain prompt as one user turn) and chat records give apply_chat_template's ids; a template that
    does not write BOS gets it in front, as sft trains on it (tests/test_sft_data.py)."""
    tok = load_tokenizer(chat_tokenizers[template])
    assert tok.kind == "hf" and tok.chat_template == CHAT_TEMPLATES[template]
    for n, messages in enumerate(CHATS):
        want = template_ids(chat_tokenizers[template], messages)
        if template == "no-bos":
            assert want[0] != tok.bos_id
            want = [tok.bos_id, *want]
        prompt = Prompt(messages[-1]["content"]) if n == 0 else Prompt(messages[-1]["content"], {"messages": messages})
        assert prompt_ids(prompt, tok, chat=True) == want
        assert prompt_ids(Prompt(PROMPTS[0]), tok, chat=False) != want  # --chat changes the prompt


@pytest.mark.slow
def test_chat_at_another_split_equals_transformers(hf_dirs, chat_tokenizers, tmp_path):
    """A torch-format checkpoint split TP2 x PP1 (per-rank files), run with --tp 1 --pp 2 and --chat through the
    CLI: greedy completions of apply_chat_template's ids equal transformers' greedy generate."""
    meg = convert(hf_dirs["llama2"], tmp_path / "meg-tp2", src_format="hf", dst_format="megatron", tp=2,
                  ckpt_format="torch").output
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"messages": CHATS[1]}) + "\n")
    answers = tmp_path / "answers.json"
    result = cli("generate", "--megatron", meg, "--tp", "1", "--pp", "2", "--chat", "--tokenizer",
                 chat_tokenizers["with-bos"], "--prompts", prompts, "--max-new-tokens", NEW_TOKENS, "--json", answers)
    assert result.exit_code == 0, result.output
    assert "workers started: 2/2" in result.stderr  # TP1 x PP2, not the checkpoint's TP2 x PP1
    tok = load_tokenizer(chat_tokenizers["with-bos"])
    for got, messages in zip(json.loads(answers.read_text()), CHATS, strict=True):
        want = hf_greedy(hf_dirs["llama2"], template_ids(chat_tokenizers["with-bos"], messages), tok.eos_id)
        assert got["completion_ids"] + ([tok.eos_id] if got["stop"] == "eos" else []) == want
