"""generate with megatron-core's KV cache: prompts of different lengths decoded together (left-padded), greedy
token-for-token equal to transformers' `generate` run on each prompt alone, at TP1 (CLI, two uneven batches,
--json timings) and at TP1 x PP2 (library). tests/test_generate.py covers TP2 x PP2 (two prompts, one batch).

Two torchrun launches (~10-20 s each on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from megallama.cli import app
from megallama.convert import convert
from megallama.generate.driver import Prompt, Settings, generate, prompt_ids
from megallama.generate.worker import masks
from megallama.sft.tokenizer import load_tokenizer

PROMPTS = ["The history of the printing press", "Hi", "Return a new list of numbers sorted by size and colour",
           "Once upon"]
NEW_TOKENS = 8


def hf_greedy(hf_dir: Path, prompts: list[list[int]], eos_id: int) -> list[list[int]]:
    """transformers' greedy generate (its own KV cache), one prompt at a time (no padding involved)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            row = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=eos_id, pad_token_id=eos_id)[0, len(ids):].tolist()
            out.append(row)
    return out


def test_masks_block_padding_and_the_future():
    pads = torch.tensor([0, 2])
    blocked = masks(pads, 4, new=4)  # prefill of two rows of 4 slots; row 1 starts with 2 pads
    assert blocked.shape == (2, 1, 4, 4)
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    assert torch.equal(blocked[0, 0], causal)
    assert blocked[1, 0, 3].tolist() == [True, True, False, False]  # a real token never sees padding
    assert blocked[1, 0, 1].tolist() == [True, False, True, True]  # a pad query keeps itself: no empty row
    step = masks(pads, 6, new=1)  # decoding the 6th slot
    assert step.shape == (2, 1, 1, 6) and step[0].sum() == 0 and step[1, 0, 0].tolist() == [True, True] + [False] * 4


@pytest.fixture(scope="module")
def meg_dirs(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    return {"tp1": convert(hf_dirs["llama3"], root / "tp1", src_format="hf", dst_format="megatron").output,
            "pp2": convert(hf_dirs["llama2"], root / "pp2", src_format="hf", dst_format="megatron",
                           ckpt_format="torch", pp=2).output}


@pytest.mark.slow
def test_batched_prompts_equal_transformers_at_tp1_through_the_cli(hf_dirs, meg_dirs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    answers = tmp_path / "answers.json"
    result = CliRunner().invoke(app, ["generate", "--megatron", str(meg_dirs["tp1"]), "--prompts", str(prompts),
                                      "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "3", "--json",
                                      str(answers)])
    assert result.exit_code == 0, result.output
    got = json.loads(answers.read_text())
    tok = load_tokenizer(meg_dirs["tp1"])
    ids = [prompt_ids(Prompt(p), tok, chat=False) for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)  # every prompt a different length: padding is exercised
    want = hf_greedy(hf_dirs["llama3"], ids, tok.eos_id)
    assert [g["completion_ids"] + ([tok.eos_id] if g["stop"] == "eos" else []) for g in got] == want
    timing = got[0]
    assert timing["time_to_first_token_s"] > 0 and timing["tokens_per_s"] > 0
    assert timing["new_tokens"] == sum(len(w) for w in want)


@pytest.mark.slow
def test_batched_prompts_equal_transformers_at_pp2(hf_dirs, meg_dirs):
    done = generate(meg_dirs["pp2"], [Prompt(p) for p in PROMPTS], Settings(max_new_tokens=NEW_TOKENS))
    tok = load_tokenizer(meg_dirs["pp2"])
    want = hf_greedy(hf_dirs["llama2"], [c.prompt_ids for c in done], tok.eos_id)
    assert [c.completion_ids + ([tok.eos_id] if c.stop == "eos" else []) for c in done] == want
