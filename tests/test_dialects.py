"""Every Megatron dialect megallama reads (formats.md §3-4): HF -> dialect fixture (built by test code from the
documented layout, tests/dialect_fixtures.py) -> megallama -> HF is bit-exact; detection, `--layout`, refusals;
the TE-spec writer's keys and shapes against the documented layout; and one batched layer-diff over all of them."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from dialect_fixtures import DIALECTS, build
from helpers import THIRD_PARTY, cli, hf_model
from safetensors.torch import load_file

from megallama.convert import convert
from megallama.errors import InputError
from megallama.formats.megatron.torch_format import load_rank_file, open_megatron

HF_FOR = {"te": "llama2", "legacy": "llama2", "legacy_old": "llama2", "fork": "llama1", "fork_distopt": "llama1",
          "alibaba": "llama1"}
LAYOUT_OF = {"te": "mcore-te", "legacy": "legacy", "legacy_old": "legacy", "fork": "llama-fork",
             "fork_distopt": "llama-fork", "alibaba": "alibaba"}


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("tp,pp", [(2, 2), (1, 1)])
def test_dialect_to_hf_is_bit_exact(dialect, tp, pp, hf_dirs, tmp_path):
    hf = hf_dirs[HF_FOR[dialect]]
    src = build(dialect, hf, tmp_path / dialect, tp=tp, pp=pp)
    with open_megatron(src) as reader:
        assert (reader.layout.name, reader.tp, reader.pp) == (LAYOUT_OF[dialect], tp, pp)
    out = tmp_path / "hf"
    convert(src, out, src_format="megatron", dst_format="hf")
    spec, want = hf_model(hf)
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == spec.vocab_size and config["rms_norm_eps"] == spec.norm_eps
    assert config["num_key_value_heads"] == spec.num_kv_heads and config["rope_theta"] == spec.rope_theta


def test_layout_can_be_forced_and_a_wrong_one_is_refused(hf_dirs, tmp_path):
    src = build("legacy", hf_dirs["llama2"], tmp_path / "legacy", tp=1, pp=1)
    with open_megatron(src, layout="legacy") as reader:
        assert reader.layout.name == "legacy"
    with pytest.raises(InputError, match=r"has no embedding.word_embeddings.weight: not a mcore-local checkpoint"):
        open_megatron(src, layout="mcore-local")
    with pytest.raises(InputError, match="unknown Megatron layout 'megatron-deepspeed'"):
        open_megatron(src, layout="megatron-deepspeed")


def test_unknown_keys_are_refused_by_name(hf_dirs, tmp_path):
    src = build("te", hf_dirs["llama2"], tmp_path / "te", tp=1, pp=1)
    rank = src / "release/mp_rank_00/model_optim_rng.pt"
    ckpt = torch.load(rank, weights_only=False)
    ckpt["model"]["decoder.layers.0.mlp.0.weight"] = ckpt["model"].pop("decoder.layers.0.mlp.linear_fc1.weight")
    torch.save(ckpt, rank)
    with pytest.raises(InputError, match=r"missing decoder.layers.0.mlp.linear_fc1.weight; "
                                         r"mp_rank_00: cannot place decoder.layers.0.mlp.0.weight"):
        open_megatron(src)
    ckpt["model"] = {"transformer.h.0.attn.c_attn.weight": torch.zeros(2)}
    torch.save(ckpt, rank)
    with pytest.raises(InputError, match=r"no known Megatron layout .* has these keys: transformer.h.0.attn.c_attn"):
        open_megatron(src)


def test_fork_without_args_or_config_is_refused(hf_dirs, tmp_path):
    src = build("fork", hf_dirs["llama1"], tmp_path / "fork", tp=1, pp=1)
    (src / "params.json").unlink()
    with pytest.raises(InputError, match="put the model's config.json .* or params.json"):
        open_megatron(src)


def test_extra_state_is_never_unpickled(hf_dirs, tmp_path):
    """A pickled `_extra_state` tensor that would run code is read as bytes only (weights_only and never loaded)."""
    src = build("te", hf_dirs["llama2"], tmp_path / "te", tp=1, pp=1)
    rank = src / "release/mp_rank_00/model_optim_rng.pt"
    ckpt = torch.load(rank, weights_only=False)
    evil = pickle.dumps(Boom())
    ckpt["model"]["decoder.final_layernorm._extra_state"] = torch.frombuffer(bytearray(evil), dtype=torch.uint8)
    torch.save(ckpt, rank)
    with open_megatron(src) as reader:
        reader.get("model.norm.weight")
    assert load_rank_file(rank)["model"]["decoder.final_layernorm._extra_state"].dtype == torch.uint8


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled')",))


# ---------------------------------------------------------------- the TE-spec writer
def test_te_writer_matches_the_documented_layout(hf_dirs, tmp_path):
    """Every rank file equals, key for key (in order), tensor for tensor, the TE layout of formats.md 4.1 built by
    the test: fused layer_norm_weight keys, empty uint8 `_extra_state` for TE modules, None for output_layer."""
    from dialect_fixtures import padded_size, te_rank

    from megallama.formats.base import read_manifest
    from megallama.formats.hf import open_hf
    from megallama.formats.megatron.torch_format import write_megatron

    out = tmp_path / "te"
    out.mkdir()
    with open_hf(hf_dirs["llama2"]) as reader:
        write_megatron(reader, out, tp=2, pp=2, transformer_impl="transformer_engine")
    spec, sd = hf_model(hf_dirs["llama2"])
    padded = padded_size(spec.vocab_size, 2, 128)
    for s in range(2):
        for t in range(2):
            ckpt = load_rank_file(out / f"release/mp_rank_{t:02d}_{s:03d}/model_optim_rng.pt")
            want = te_rank(sd, spec, tp=2, pp=2, t=t, s=s, padded=padded,
                           extra=lambda n: torch.empty(0, dtype=torch.uint8))
            assert list(ckpt["model"]) == list(want)
            for key, value in want.items():
                got = ckpt["model"][key]
                if value is None:
                    assert got is None, key
                else:
                    assert got.dtype == value.dtype and torch.equal(got, value), key
            assert ckpt["args"].transformer_impl == "transformer_engine"
    assert "--transformer-impl transformer_engine" in (out / "megatron_args.txt").read_text().splitlines()
    assert read_manifest(out)["layout"] == "mcore-te"
    with open_megatron(out) as reader:  # and back, bit for bit
        assert reader.layout.name == "mcore-te"
        assert all(torch.equal(reader.get(name), tensor) for name, tensor in sd.items())


def test_pth2megatron_transformer_impl_option(hf_dirs, tmp_path):


    meta_dir = convert(hf_dirs["llama2"], tmp_path / "meta", src_format="hf", dst_format="meta").output
    out = tmp_path / "te"
    result = cli("convert", "pth2megatron", "--input-dir", str(meta_dir), "--output-dir", str(out),
                 "--transformer-impl", "transformer_engine", "--ckpt-format", "torch")
    assert result.exit_code == 0, result.output
    assert "--transformer-impl transformer_engine" in result.stdout
    with open_megatron(out) as reader:
        assert reader.layout.name == "mcore-te"
    bad = tmp_path / "bad"
    result = cli("convert", "pth2megatron", "--input-dir", str(meta_dir), "--output-dir", str(bad),
                 "--transformer-impl", "te")
    assert result.exit_code == 2
    assert "--transformer-impl 'te': expected one of local, transformer_engine" in result.output
    assert not bad.exists()


def test_te_file_loads_strictly_into_the_te_gpt_model(hf_dirs, tmp_path):
    """Extra, where Transformer Engine and CUDA exist (GPU machines): the real TE-spec GPTModel loads the file."""
    pytest.importorskip("transformer_engine")
    if not torch.cuda.is_available():
        pytest.skip("Transformer Engine needs CUDA")
    import subprocess
    import sys
    from pathlib import Path

    from megallama.formats.hf import open_hf
    from megallama.formats.megatron.torch_format import write_megatron

    out = tmp_path / "te"
    out.mkdir()
    with open_hf(hf_dirs["llama2"]) as reader:
        write_megatron(reader, out, tp=1, pp=1, transformer_impl="transformer_engine")
    worker = Path(__file__).parent / "workers" / "te_strict_load.py"
    proc = subprocess.run([sys.executable, str(worker), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------- layer-diff after reading each dialect
@pytest.mark.slow
def test_layer_diff_passes_for_every_dialect(hf_dirs, tmp_path):
    """One torchrun launch (all TP1 x PP1) runs every dialect against its HF model through megatron-core. The
    fork's params.json is not beside it but given as --model-config (read in the parent and in the rank); the last
    pair is NVIDIA's real legacy converter output (tests/fixtures/third_party) against the model it was made from."""
    import shutil

    from megallama.verify.layer_diff import layer_diff_many

    dialects = ["te", "legacy", "fork", "alibaba"]
    pairs = [(hf_dirs[HF_FOR[d]], build(d, hf_dirs[HF_FOR[d]], tmp_path / d, tp=1, pp=1)) for d in dialects]
    params = shutil.move(tmp_path / "fork" / "params.json", tmp_path / "fork-params.json")
    dialects.append("nvidia legacy converter")
    pairs.append((THIRD_PARTY / "source" / "hf", THIRD_PARTY / "nvidia" / "tp1"))
    configs = [params if d == "fork" else None for d in dialects]
    reports = layer_diff_many(pairs, seq_len=16, batch=1, model_configs=configs)
    for dialect, report in zip(dialects, reports, strict=True):
        assert report.passed, (dialect, report.to_json())
        assert report.max_abs_logits_diff < 1e-3, dialect


def test_cli_refuses_an_unplaceable_checkpoint_without_output(hf_dirs, tmp_path):


    src = build("alibaba", hf_dirs["llama1"], tmp_path / "alibaba", tp=2, pp=1)
    rank = src / "release/mp_rank_01/model_optim_rng.pt"
    ckpt = torch.load(rank, weights_only=False)
    encoder = ckpt["model"]["language_model"]["encoder"]
    encoder["layers.0.self_attention.rotary_emb.inv_freq"] = torch.zeros(4)  # a buffer some forks save: ignored
    encoder["layers.0.self_attention.dense.bias"] = torch.zeros(64)
    torch.save(ckpt, rank)
    out = tmp_path / "pth"
    result = cli("convert", "megatron2pth", "--input-dir", str(src), "--output-dir", str(out))
    assert result.exit_code == 2
    assert ("checkpoint does not match the alibaba layout and its config (1 problems): mp_rank_01: cannot place "
            "language_model.encoder.layers.0.self_attention.dense.bias") in " ".join(result.output.split())
    assert not out.exists()


def test_cli_layout_option_and_megatron2megatron_from_a_dialect(hf_dirs, tmp_path):
    """`--layout` forces the input layout; a legacy checkpoint re-sharded to the TE torch layout is bit-exact."""

    src = build("legacy", hf_dirs["llama2"], tmp_path / "legacy", tp=2, pp=2)
    out = tmp_path / "te"
    result = cli("convert", "megatron2megatron", "--input-dir", str(src), "--output-dir", str(out),
                 "--layout", "legacy", "--ckpt-format", "torch", "--tp", "1",
                 "--transformer-impl", "transformer_engine")
    assert result.exit_code == 0, result.output
    _, want = hf_model(hf_dirs["llama2"])
    with open_megatron(out) as reader:
        assert (reader.layout.name, reader.tp, reader.pp) == ("mcore-te", 1, 1)
        assert all(torch.equal(reader.get(name), tensor) for name, tensor in want.items())
    bad = tmp_path / "bad"
    result = cli("convert", "megatron2hf", "--input-dir", str(src), "--output-dir", str(bad),
                 "--layout", "llama-fork")
    assert result.exit_code == 2 and "does not match the llama-fork layout" in result.output
    assert not bad.exists()
