"""`make bench --only llama4`'s inputs and its round-trip check (bench/scout_model.py), at a small width: the
Scout-shaped config, the streamed sharded source that transformers loads as written, and the bit-for-bit
comparison that the bench reports (it must catch one flipped bit, a missing tensor, a changed shape)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megallama.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import scout_model  # noqa: E402

SMALL = dict(layers=4, scale=0.02)  # 4 layers: layer 3 is NoPE; hidden 128, 10/2 heads of 16, vocab 4032


@pytest.fixture(scope="module")
def scout(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scout") / "hf"
    return scout_model.write_scout_hf(out, scout_model.scout_text_config(**SMALL), max_shard_bytes=400_000)


def test_full_width_config_is_scout():
    c = scout_model.scout_text_config(layers=48)
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (5120, 40, 8, 128)
    assert (c["num_local_experts"], c["num_experts_per_tok"], c["intermediate_size"]) == (16, 1, 8192)
    assert (c["intermediate_size_mlp"], c["vocab_size"], c["interleave_moe_layer_step"]) == (16384, 202048, 1)
    assert [i for i, rope in enumerate(c["no_rope_layers"]) if not rope] == list(range(3, 48, 4))
    assert c["use_qk_norm"] and c["attention_chunk_size"] == 8192 and c["dtype"] == "bfloat16"
    assert c["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                    "original_max_position_embeddings": 8192}
    shapes = scout_model.hf_tensor_shapes(scout_model.scout_text_config(layers=1))
    assert shapes["model.layers.0.feed_forward.experts.gate_up_proj"] == (16, 5120, 16384)
    one_layer = sum(2 * torch.Size(s).numel() for s in shapes.values())
    assert 8.5e9 < one_layer < 8.7e9  # the ~8.6 GB the bench docs quote


def test_source_is_what_transformers_loads(scout):
    from transformers import Llama4ForCausalLM

    index = json.loads((scout / "model.safetensors.index.json").read_text())
    files = sorted(scout.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    stored = {k: v for f in files for k, v in load_file(f).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    model, info = Llama4ForCausalLM.from_pretrained(scout, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    state = model.state_dict()
    assert set(state) == set(stored) and all(torch.equal(state[k], v) for k, v in stored.items())
    assert len({v.float().std().item() for k, v in stored.items() if v.dim() > 1}) > 1  # not one repeated block
    spec = ModelSpec.from_hf_config(json.loads((scout / "config.json").read_text()))
    assert spec.num_experts == 16 and spec.moe_layers == (0, 1, 2, 3) and spec.nope_layers == (3,)


def test_compare_tensors_catches_one_bit(scout, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(scout, copy)
    same = scout_model.compare_tensors(scout, copy)
    assert same["bit_exact"] and same["compared"] == same["tensors"] > 0
    assert same["bytes_compared"] == json.loads((scout / "model.safetensors.index.json").read_text())[
        "metadata"]["total_size"]

    name = "model.layers.2.feed_forward.experts.gate_up_proj"
    file = copy / json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = {k: v.clone() for k, v in load_file(file).items()}  # not the file's mapping: it is rewritten
    flat = tensors[name].view(-1).view(torch.int16)
    flat[-1] ^= 1  # the last value's lowest mantissa bit: a tiny numeric change
    save_file(tensors, file, metadata={"format": "pt"})
    got = scout_model.compare_tensors(scout, copy)
    assert not got["bit_exact"] and got["differ"] == [name]

    tensors[name] = tensors[name][:, :, :-1].contiguous()  # a changed shape
    save_file(tensors, file, metadata={"format": "pt"})
    assert scout_model.compare_tensors(scout, copy)["differ"] == [name]
    del tensors[name]  # a missing tensor (the index still names it: drop it there too)
    save_file(tensors, file, metadata={"format": "pt"})
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert scout_model.compare_tensors(scout, copy)["differ"] == [name]


def test_random_tensor_is_drawn_in_chunks(monkeypatch):
    monkeypatch.setattr(scout_model, "CHUNK", 1000)
    gen = torch.Generator().manual_seed(0)
    t = scout_model.random_tensor((3, 1500), gen)
    assert t.dtype == torch.bfloat16 and t.shape == (3, 1500)
    chunks = t.view(-1).float().split(1000)
    assert len({c[:10].sum().item() for c in chunks}) == len(chunks)  # each chunk a fresh draw
    assert abs(t.float().std().item() - 0.02) < 0.002
    norm = scout_model.random_tensor((2500,), gen)
    assert abs(norm.float().mean().item() - 1.0) < 0.005
