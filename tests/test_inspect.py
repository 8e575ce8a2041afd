"""`megallama inspect` on every format: HF, Meta, Megatron torch (each layout), Megatron torch_dist; JSON and
table output; a folder it cannot place is exit 2 with what it found."""

from __future__ import annotations

import json

import pytest
import torch
from dialect_fixtures import build
from helpers import cli

from megallama.convert import convert
from megallama.formats.megatron.args import megatron_args
from megallama.spec import ModelSpec


def inspect_json(path) -> dict:
    result = cli("inspect", str(path), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def folders(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    hf = hf_dirs["llama2"]
    return {
        "hf": hf,
        "meta": convert(hf, root / "meta", src_format="hf", dst_format="meta", shards=2).output,
        "local": convert(hf, root / "local", src_format="hf", dst_format="megatron", tp=2, pp=2,
                  ckpt_format="torch").output,
        "dist": convert(hf, root / "dist", src_format="hf", dst_format="megatron", tp=2, pp=2).output,
        "te": build("te", hf, root / "te", tp=2, pp=1),
        "legacy": build("legacy", hf, root / "legacy", tp=1, pp=2),
        "fork": build("fork_distopt", hf_dirs["llama1"], root / "fork", tp=1, pp=1),
        "alibaba": build("alibaba", hf_dirs["llama1"], root / "alibaba", tp=2, pp=1),
    }


def test_hf_and_meta(folders):
    spec = ModelSpec.from_hf_config(json.loads((folders["hf"] / "config.json").read_text()))
    hf = inspect_json(folders["hf"])
    assert (hf["format"], hf["dtype"], hf["vocab_size"], hf["num_parameters"]) == (
        "hf", "float32", 320, spec.num_parameters())
    assert hf["spec"]["num_kv_heads"] == 2 and "tokenizer.model" in hf["tokenizer"]
    assert hf["tokenizer_type"] == "Llama2Tokenizer"
    meta = inspect_json(folders["meta"])
    assert (meta["format"], meta["shards"], meta["num_parameters"]) == ("meta", 2, spec.num_parameters())


@pytest.mark.parametrize("name,layout,tp,pp,iteration,padded,optimizer", [
    ("local", "mcore-local", 2, 2, "release", 512, False),
    ("te", "mcore-te", 2, 1, "release", 512, False),
    ("legacy", "legacy", 1, 2, 1, 384, False),
    ("fork", "llama-fork", 1, 1, "release", 384, True),  # model_rng.pt + the optimizer's own folders
    ("alibaba", "alibaba", 2, 1, "release", 320, False),  # its dummy optimizer dict is not optimizer state
])
def test_megatron_torch_layouts(folders, name, layout, tp, pp, iteration, padded, optimizer):
    got = inspect_json(folders[name])
    assert (got["format"], got["ckpt_format"], got["layout"]) == ("megatron", "torch", layout)
    assert (got["tp"], got["pp"], got["iteration"], got["padded_vocab_size"]) == (tp, pp, iteration, padded)
    assert got["optimizer_state"] is optimizer
    assert got["vocab_size"] == 320 and got["dtype"] == "float32"


def test_optimizer_state_is_reported(folders, tmp_path):
    import shutil

    src = shutil.copytree(folders["local"], tmp_path / "sft")
    for rank in src.glob("release/mp_rank_*/model_optim_rng.pt"):
        ckpt = torch.load(rank, weights_only=False)
        ckpt["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": []}
        torch.save(ckpt, rank)
    assert inspect_json(src)["optimizer_state"] is True


def test_torch_dist(hf_dirs, tmp_path):
    """A torch_dist folder as megatron-core writes it (formats.md addendum): DCP .metadata + common.pt args."""
    import torch.distributed.checkpoint as dcp

    spec = ModelSpec.from_hf_config(json.loads((hf_dirs["llama2"] / "config.json").read_text()))
    it_dir = tmp_path / "dist" / "iter_0000007"
    it_dir.mkdir(parents=True)
    state = {"embedding.word_embeddings.weight": torch.zeros(384, 64, dtype=torch.bfloat16),
             "decoder.layers.self_attention.linear_qkv.weight": torch.zeros(4, 128, 64, dtype=torch.bfloat16)}
    dcp.save(state, checkpoint_id=str(it_dir), no_dist=True)
    args = megatron_args(spec.replace(dtype="bfloat16"), tp=2, pp=2, padded_vocab_size=384, divisible_by=128,
                         ckpt_format="torch_dist")
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7}, it_dir / "common.pt")
    (it_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (tmp_path / "dist" / "latest_checkpointed_iteration.txt").write_text("7")
    got = inspect_json(tmp_path / "dist")
    assert (got["format"], got["ckpt_format"], got["tp"], got["pp"], got["iteration"]) == (
        "megatron", "torch_dist", 2, 2, 7)
    assert (got["dtype"], got["padded_vocab_size"], got["vocab_size"], got["optimizer_state"]) == (
        "bfloat16", 384, 320, False)


def test_table_output(folders):
    result = cli("inspect", str(folders["te"]))
    assert result.exit_code == 0, result.output
    assert "mcore-te" in result.stdout and "padded_vocab_size" in result.stdout


def test_unplaceable_folder_is_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "weights").mkdir()
    result = cli("inspect", str(tmp_path))
    assert result.exit_code == 2
    assert "is no checkpoint megallama knows" in result.output and "found: notes.txt, weights/" in result.output


def test_layout_can_be_forced(folders):
    result = cli("inspect", str(folders["legacy"]), "--json", "--layout", "legacy")
    assert result.exit_code == 0 and json.loads(result.stdout)["layout"] == "legacy"
    result = cli("inspect", str(folders["legacy"]), "--layout", "alibaba")
    assert result.exit_code == 2 and "not match the alibaba layout" in result.output


def test_megallama_torch_dist(folders):
    got = inspect_json(folders["dist"])
    assert (got["format"], got["ckpt_format"], got["layout"], got["tp"], got["pp"]) == (
        "megatron", "torch_dist", "mcore", 2, 2)
    assert (got["vocab_size"], got["padded_vocab_size"], got["dtype"], got["optimizer_state"]) == (
        320, 512, "float32", False)
