"""The Meta-style reference model on converted pth computes what transformers computes on the HF original."""

from __future__ import annotations

import pytest
import torch

from megallama.convert import convert
from megallama.formats.hf import open_hf
from megallama.tiny import PRESETS
from megallama.verify.reference import MetaReference, rope_frequencies


@pytest.fixture(scope="module")
def hf_models(hf_dirs):
    from transformers import LlamaForCausalLM

    return {p: LlamaForCausalLM.from_pretrained(hf_dirs[p]).eval() for p in PRESETS}


def tokens(seq: int = 48) -> torch.Tensor:
    return torch.randint(0, 320, (2, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_reference_on_pth_matches_transformers_on_hf(hf_dirs, hf_models, tmp_path, preset, shards):
    pth = convert(hf_dirs[preset], tmp_path / "pth", src_format="hf", dst_format="meta", shards=shards).output
    ref = MetaReference.from_meta_dir(pth)
    with torch.no_grad():
        ours, theirs = ref(tokens()), hf_models[preset](tokens()).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["llama3", "tied"])
def test_rope_frequencies_match_transformers(hf_models, preset):
    # Short prompts hide a wrong llama3 scaling factor (formats.md 2.6): compare the frequencies themselves.
    inv_freq = hf_models[preset].model.rotary_emb.inv_freq
    torch.testing.assert_close(rope_frequencies(PRESETS[preset]), inv_freq, rtol=1e-6, atol=0)


def test_capture_records_every_intermediate(hf_dirs, hf_models):
    with open_hf(hf_dirs["llama2"]) as reader:  # verify reuses the reference on any canonical reader
        ref = MetaReference.from_reader(reader)
    capture: dict = {}
    with torch.no_grad():
        logits = ref(tokens(16), capture=capture)
        hidden = hf_models["llama2"](tokens(16), output_hidden_states=True).hidden_states
    layers = [f"layers.{i}{part}" for i in range(4) for part in (".attention", ".mlp", "")]
    assert list(capture) == ["embedding", *layers, "norm", "logits"]
    assert all(capture[name].shape == (2, 16, 64) for name in ["embedding", *layers, "norm"])
    assert capture["logits"] is logits
    torch.testing.assert_close(capture["embedding"], hidden[0], rtol=0, atol=0)
    for i in range(3):  # HF's hidden_states[i + 1] is the output of layer i (the last one is after the norm)
        torch.testing.assert_close(capture[f"layers.{i}"], hidden[i + 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(capture["layers.1"], capture["layers.0"] + capture["layers.1.attention"]
                               + capture["layers.1.mlp"], rtol=0, atol=1e-6)


def test_forward_builds_rotary_and_mask_on_the_input_device():
    # No GPU here: the meta device stands in, and refuses to mix with CPU tensors just as CUDA would.
    with torch.device("meta"):
        model = MetaReference(PRESETS["llama3"])
    capture: dict = {}
    logits = model(torch.zeros(2, 5, dtype=torch.long, device="meta"), capture=capture)
    assert logits.shape == (2, 5, 320) and capture["layers.3"].device.type == "meta"
