"""Checkpoints written by the real third-party converters (tests/fixtures/third_party/, made by its make.py from
a committed tiny model): megallama reads each one, and the HF model it writes equals the source model tensor for
tensor, bit for bit (padding rows dropped). Where tests/dialect_fixtures.py checks our reading of formats.md, these
check that reading against what the tools really wrote."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from helpers import THIRD_PARTY, cli, hf_spec, hf_tensors

from megallama.formats.megatron.torch_format import load_rank_file

SOURCE_HF, SOURCE_META = THIRD_PARTY / "source" / "hf", THIRD_PARTY / "source" / "meta"

# folder: (layout megallama detects, TP, PP, padded vocab in the files, --model-config the run needs)
# The fork saves `args: None` and alibaba's args lack the norm eps, so both need the source's params.json /
# config.json, as their users have beside the checkpoint; NVIDIA's legacy saver writes Megatron's full args.
CASES = {
    "fork/tp1": ("llama-fork", 1, 1, 384, SOURCE_META),
    "fork/tp2pp2": ("llama-fork", 2, 2, 512, SOURCE_META),
    "alibaba/tp1": ("alibaba", 1, 1, 320, SOURCE_HF),
    "alibaba/tp2pp2": ("alibaba", 2, 2, 512, SOURCE_HF),
    "nvidia/tp1": ("legacy", 1, 1, 320, None),
    "nvidia/tp2pp2": ("legacy", 2, 2, 320, None),
}
VOCAB = 320


def config_option(config: Path | None) -> list:
    return ["--model-config", config] if config else []


@pytest.mark.parametrize("case", CASES)
def test_real_converter_output_to_hf_is_bit_exact(case, tmp_path):
    layout, tp, pp, _, config = CASES[case]
    out = tmp_path / "hf"
    result = cli("convert", "megatron2hf", "--input-dir", THIRD_PARTY / case, "--output-dir", out,
                 *config_option(config))
    assert result.exit_code == 0, result.output
    want, got = hf_tensors(SOURCE_HF), hf_tensors(out)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    # sizes, vocab, norm eps, rope theta, untied: all of config.json but the context length, which neither Meta's
    # params.json (the fork's input) nor NVIDIA's loader keeps (it sets 4096 for every llama2 size); alibaba's args do
    lossy = {"max_position_embeddings": 0} if layout != "alibaba" else {}
    assert hf_spec(out).replace(**lossy) == hf_spec(SOURCE_HF).replace(**lossy)


@pytest.mark.parametrize("case", CASES)
def test_real_converter_output_is_inspected(case, tmp_path):
    layout, tp, pp, padded, config = CASES[case]
    folder = THIRD_PARTY / case
    if config is not None:  # inspect has no --model-config (yet): the source's config beside a copy, as users keep it
        folder = shutil.copytree(folder, tmp_path / "checkpoint")
        for name in ("params.json", "config.json", "tokenizer.model"):
            if (config / name).is_file() and not (folder / name).exists():
                shutil.copy(config / name, folder / name)
    result = cli("inspect", folder, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["format"], report["ckpt_format"], report["layout"]) == ("megatron", "torch", layout)
    assert (report["tp"], report["pp"], report["vocab_size"], report["padded_vocab_size"]) == (tp, pp, VOCAB, padded)
    assert report["spec"]["num_layers"] == 2 and report["spec"]["num_kv_heads"] == 4


def _rank(case: str, tp_rank: int = 0, pp_rank: int = 0) -> dict:
    root = THIRD_PARTY / case
    it_dir = root / ("release" if (root / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
                     else "iter_0000001")
    _, tp, pp, _, _ = CASES[case]
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return load_rank_file(it_dir / name / "model_optim_rng.pt")


def test_the_files_hold_what_formats_md_addendum_says():
    """The facts the dialect readers rest on (formats.md, "Addendum (2026-12-02): what the real legacy converters
    write"), read from the real files, so a regenerated fixture that drifts is caught here first."""
    source = hf_tensors(SOURCE_HF)
    embed = source["model.embed_tokens.weight"]

    fork = _rank("fork/tp1")
    assert set(fork) == {"args", "checkpoint_version", "iteration", "model", "rng_state"}
    assert fork["args"] is None and fork["checkpoint_version"] == 3.0 and fork["iteration"] == 0
    words = fork["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
    head = fork["model"]["language_model"]["output_layer"]["weight"]
    assert torch.equal(words[:VOCAB], embed) and not words[VOCAB:].any() and not head[VOCAB:].any()  # zeros
    assert "layers.0.input_rmsnorm.weight" in fork["model"]["language_model"]["encoder"]

    alibaba = _rank("alibaba/tp2pp2", 1, 1)
    assert "iteration" not in alibaba and "optimizer" in alibaba
    assert isinstance(alibaba["args"], types.SimpleNamespace)
    assert (alibaba["args"].orig_vocab_size, alibaba["args"].padded_vocab_size) == (VOCAB, 512)
    assert torch.equal(alibaba["model"]["lm_head"]["weight"], source["lm_head.weight"])  # full, unpadded, per rank
    first = _rank("alibaba/tp2pp2", 1, 0)["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
    assert torch.equal(first[:64], embed[256:]) and (first[64:] == embed[-1]).all()  # padded with the last row

    nvidia = _rank("nvidia/tp2pp2", 0, 1)
    assert (THIRD_PARTY / "nvidia/tp2pp2/latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert nvidia["iteration"] == 1 and nvidia["args"].padded_vocab_size == VOCAB
    encoder = nvidia["model"]["language_model"]["encoder"]
    assert {"final_norm.weight", "layers.0.input_norm.weight", "layers.0.post_attention_norm.weight"} <= set(encoder)


def test_provenance_names_every_fixture_and_its_commit():
    provenance = json.loads((THIRD_PARTY / "provenance.json").read_text())
    for case in CASES:
        tool, folder = case.split("/")
        assert len(provenance[tool]["commit"]) == 40 and provenance[tool]["commands"][folder], case
    assert sum(f.stat().st_size for f in THIRD_PARTY.rglob("*") if f.is_file()) < 6.5e6
