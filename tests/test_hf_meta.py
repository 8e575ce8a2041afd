"""HF <-> Meta pth: bit-exact round trips, Meta's shard layout, and refusals that leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, cli, hf_tensors

from megallama.convert import convert
from megallama.formats.hf import open_hf, write_hf
from megallama.formats.meta import open_meta
from megallama.spec import ModelSpec, meta_ffn_size
from megallama.tiny import PRESETS, make_hf_checkpoint
from megallama.transforms import hf_to_meta_rotary

SHARDS = (1, 2)


def hf2pth(src: Path, dst: Path, **kwargs):
    return convert(src, dst, src_format="hf", dst_format="meta", **kwargs)


def pth2hf(src: Path, dst: Path, **kwargs):
    return convert(src, dst, src_format="meta", dst_format="hf", **kwargs)


def pth_tensors(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(f, weights_only=True) for f in sorted(Path(folder).glob("consolidated.*.pth"))]


def assert_same_tensors(want: dict, got: dict) -> None:
    assert sorted(want) == sorted(got)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def assert_same_config(want_dir: Path, got_dir: Path) -> None:
    want = json.loads((want_dir / "config.json").read_text())
    got = json.loads((got_dir / "config.json").read_text())
    want.pop("transformers_version", None)
    assert {k: got.get(k) for k in want} == want
    assert ModelSpec.from_hf_config(got) == ModelSpec.from_hf_config(want)


@pytest.fixture(scope="module")
def pth_dirs(hf_dirs, tmp_path_factory):
    """{(preset, shards): Meta pth folder converted from the HF fixture}."""
    root = tmp_path_factory.mktemp("pth")
    return {(p, m): hf2pth(hf_dirs[p], root / f"{p}-{m}", shards=m).output for p in PRESETS for m in SHARDS}


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_round_trip_is_bit_exact(hf_dirs, pth_dirs, tmp_path, preset, shards):
    back = pth2hf(pth_dirs[preset, shards], tmp_path / "hf").output
    assert_same_tensors(hf_tensors(hf_dirs[preset]), hf_tensors(back))
    assert_same_config(hf_dirs[preset], back)
    manifest = json.loads((back / "megallama.json").read_text())
    assert manifest["format"] == "hf" and len(manifest["sources"]) == shards


@pytest.mark.parametrize("preset", list(PRESETS))
def test_params_json_reproduces_the_hf_config(pth_dirs, preset):
    params = json.loads((pth_dirs[preset, 1] / "params.json").read_text())
    spec = PRESETS[preset]
    assert meta_ffn_size(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == 176
    assert (params["n_heads"], params["n_kv_heads"], params["vocab_size"]) == (4, spec.num_kv_heads, 320)
    assert params["norm_eps"] == spec.norm_eps
    assert params.get("rope_theta", 10000.0) == spec.rope_theta
    assert ("rope_theta" in params) == (spec.rope_theta != 10000.0)  # Llama-2's ModelArgs rejects the key
    assert params.get("use_scaled_rope", False) == (spec.rope_scaling is not None)


def test_qk_rows_in_meta_order_with_their_own_head_counts(hf_dirs, pth_dirs):
    hf = hf_tensors(hf_dirs["llama2"])
    (meta,) = pth_tensors(pth_dirs["llama2", 1])
    q, k = hf["model.layers.1.self_attn.q_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(meta["layers.1.attention.wq.weight"], hf_to_meta_rotary(q, 4))
    assert torch.equal(meta["layers.1.attention.wk.weight"], hf_to_meta_rotary(k, 2))  # ng, not nh (P2)
    assert torch.equal(meta["layers.1.attention.wv.weight"], hf["model.layers.1.self_attn.v_proj.weight"])


def test_tied_embeddings_write_output_equal_to_embedding(pth_dirs):
    (meta,) = pth_tensors(pth_dirs["tied", 1])
    assert torch.equal(meta["output.weight"], meta["tok_embeddings.weight"])
    with open_meta(pth_dirs["tied", 1]) as reader:  # the manifest says tied: output.weight is dropped again
        assert reader.spec.tie_embeddings and "lm_head.weight" not in reader.names()


# E with m=2 (formats.md 1.4, Appendix B) at vocab 320: LLaMA-1/2 split the embedding on dim 1, Llama 3 on dim 0.
@pytest.mark.parametrize("preset,embed_shape", [("llama1", (320, 32)), ("llama2", (320, 32)), ("llama3", (160, 64))])
def test_two_shards_split_as_meta_releases(pth_dirs, preset, embed_shape):
    kv_rows = 16 if PRESETS[preset].num_kv_heads == 2 else 32
    want = {"tok_embeddings.weight": embed_shape, "output.weight": (160, 64), "norm.weight": (64,),
            "layers.0.attention.wq.weight": (32, 64), "layers.0.attention.wk.weight": (kv_rows, 64),
            "layers.0.attention.wv.weight": (kv_rows, 64), "layers.0.attention.wo.weight": (64, 32),
            "layers.0.feed_forward.w1.weight": (88, 64), "layers.0.feed_forward.w3.weight": (88, 64),
            "layers.0.feed_forward.w2.weight": (64, 88), "layers.0.attention_norm.weight": (64,)}
    parts = pth_tensors(pth_dirs[preset, 2])
    (whole,) = pth_tensors(pth_dirs[preset, 1])
    assert len(parts) == 2
    for part in parts:
        assert {n: tuple(part[n].shape) for n in want} == want
    dim = 1 if embed_shape[1] == 32 else 0
    for name, cat_dim in [("tok_embeddings.weight", dim), ("layers.3.attention.wk.weight", 0),
                          ("layers.3.attention.wo.weight", 1), ("layers.3.feed_forward.w2.weight", 1)]:
        assert torch.equal(torch.cat([p[name] for p in parts], dim=cat_dim), whole[name]), name
    assert torch.equal(parts[0]["norm.weight"], parts[1]["norm.weight"])


@pytest.mark.parametrize("shards", SHARDS)
def test_each_shard_file_holds_only_its_slices(pth_dirs, shards):
    for f in sorted(pth_dirs["llama2", shards].glob("consolidated.*.pth")):
        state = torch.load(f, weights_only=True)
        payload = sum(t.numel() * t.element_size() for t in state.values())
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in state.values())
        assert payload < f.stat().st_size < payload + 64 * 1024


def test_bf16_source_dtype_is_kept(tmp_path):
    src = make_hf_checkpoint(tmp_path / "bf16", "llama2", dtype="bfloat16", tokenizer=False)
    pth = hf2pth(src, tmp_path / "pth", shards=2).output
    assert all(t.dtype == torch.bfloat16 for part in pth_tensors(pth) for t in part.values())
    back = pth2hf(pth, tmp_path / "hf").output
    assert_same_tensors(hf_tensors(src), hf_tensors(back))
    assert_same_config(src, back)


def test_dtype_option_casts(hf_dir, tmp_path):
    pth = hf2pth(hf_dir, tmp_path / "pth", dtype="bf16").output
    assert all(t.dtype == torch.bfloat16 for t in pth_tensors(pth)[0].values())
    back = pth2hf(pth, tmp_path / "hf").output
    want = {n: t.to(torch.bfloat16) for n, t in hf_tensors(hf_dir).items()}
    assert_same_tensors(want, hf_tensors(back))
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    half = pth2hf(pth, tmp_path / "hf16", dtype="fp16").output
    assert all(t.dtype == torch.float16 for t in hf_tensors(half).values())


# ---------------------------------------------------------------- other inputs and outputs
def test_sharded_safetensors_input(pth_dirs, tmp_path):
    src = make_hf_checkpoint(tmp_path / "sharded", "llama2", shard_bytes="200KB", tokenizer=False)
    assert (src / "model.safetensors.index.json").exists()
    pth = hf2pth(src, tmp_path / "pth").output
    assert_same_tensors(pth_tensors(pth_dirs["llama2", 1])[0], pth_tensors(pth)[0])


@pytest.mark.parametrize("preset", ["llama2", "tied"])
def test_pytorch_model_bin_input(hf_dirs, pth_dirs, tmp_path, preset):
    from transformers import LlamaForCausalLM

    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(hf_dirs[preset] / "config.json", src)
    state = LlamaForCausalLM.from_pretrained(hf_dirs[preset]).state_dict()
    assert "lm_head.weight" in state  # a tied .bin stores the alias too: the reader must drop it
    torch.save(state, src / "pytorch_model.bin")
    with open_hf(src) as reader:
        assert ("lm_head.weight" in reader.names()) == (preset != "tied")
    pth = hf2pth(src, tmp_path / "pth").output
    assert_same_tensors(pth_tensors(pth_dirs[preset, 1])[0], pth_tensors(pth)[0])


def test_sharded_safetensors_output_loads_in_transformers(pth_dirs, hf_dirs, tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "hf"
    out.mkdir()
    with open_meta(pth_dirs["llama2", 2]) as reader:
        report = write_hf(reader, out, max_shard_bytes=200_000)
    assert "model.safetensors.index.json" in report.files and len(list(out.glob("*.safetensors"))) > 1
    assert_same_tensors(hf_tensors(hf_dirs["llama2"]), hf_tensors(out))
    tokens = torch.tensor([[1, 5, 77, 300, 12]])
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(out)(tokens).logits
        want = LlamaForCausalLM.from_pretrained(hf_dirs["llama2"])(tokens).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("preset", ["llama2", "tied"])
def test_pth2hf_output_loads_with_transformers_and_autotokenizer(hf_dirs, pth_dirs, tmp_path, preset):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = pth2hf(pth_dirs[preset, 2], tmp_path / "hf").output
    text = "Return a new dictionary with keys from iterable"
    ids = AutoTokenizer.from_pretrained(out)(text).input_ids
    assert ids[0] == 1 and ids == AutoTokenizer.from_pretrained(hf_dirs[preset])(text).input_ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(out)(tokens).logits
        want = LlamaForCausalLM.from_pretrained(hf_dirs[preset])(tokens).logits
    assert torch.equal(got, want)


def test_official_meta_layout(hf_dirs, pth_dirs, tmp_path):
    """params.json one level down, vocab_size -1, tokenizer.model in the parent, a rope.freqs key, no manifest."""
    root = tmp_path / "llama"
    shutil.copytree(pth_dirs["llama2", 2], root / "7B")
    (root / "7B" / "megallama.json").unlink()
    (root / "7B" / "tokenizer.model").rename(root / "tokenizer.model")
    params = json.loads((root / "7B" / "params.json").read_text())
    (root / "7B" / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    shard0 = torch.load(root / "7B" / "consolidated.00.pth", weights_only=True)
    torch.save({**shard0, "rope.freqs": torch.ones(8)}, root / "7B" / "consolidated.00.pth")
    with open_meta(root) as reader:
        assert reader.spec.vocab_size == 320 and reader.tokenizer_files == [root / "tokenizer.model"]
    back = pth2hf(root, tmp_path / "hf").output
    assert_same_tensors(hf_tensors(hf_dirs["llama2"]), hf_tensors(back))
    assert (back / "tokenizer.model").exists() and (back / "tokenizer_config.json").exists()


def test_transformers_4_config_spelling(hf_dirs, pth_dirs, tmp_path):
    """rope_theta / rope_scaling / torch_dtype (4.x) read the same as rope_parameters / dtype (5.x)."""
    src = _copy(hf_dirs["llama3"], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("dtype")
    cfg.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype="float32")
    (src / "config.json").write_text(json.dumps(cfg))
    pth = hf2pth(src, tmp_path / "pth").output
    assert (pth / "params.json").read_text() == (pth_dirs["llama3", 1] / "params.json").read_text()
    assert_same_tensors(pth_tensors(pth_dirs["llama3", 1])[0], pth_tensors(pth)[0])
    with open_meta(pth) as reader, open_hf(hf_dirs["llama3"]) as original:
        assert reader.spec == original.spec


def test_refuses_shard_counts_that_do_not_divide(hf_dir, tmp_path):
    from megallama.errors import InputError

    with pytest.raises(InputError, match="--shards 3 does not divide the model's attention heads 4, KV heads 2"):
        hf2pth(hf_dir, tmp_path / "pth", shards=3)
    assert not (tmp_path / "pth").exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- CLI: summary and one-line refusals
def assert_refused(result, out: Path, message: str) -> None:
    assert_one_line_error(result, message, absent=out)


def test_cli_hf2pth_and_pth2hf_print_a_summary(hf_dir, tmp_path):
    result = cli("convert", "hf2pth", "--base_model", hf_dir, "--output_dir", tmp_path / "pth",
                 "--output_type", "pth", "--shards", "2")
    assert result.exit_code == 0, result.output
    assert "GB/s" in result.stdout and "peak RSS" in result.stdout and "consolidated.01.pth" in result.stdout
    result = cli("convert", "pth2hf", "--input-dir", tmp_path / "pth", "--output-dir", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    assert_same_tensors(hf_tensors(hf_dir), hf_tensors(tmp_path / "hf"))


def test_cli_refuses_non_empty_output_without_force(hf_dir, tmp_path):
    out = tmp_path / "pth"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("convert", "hf2pth", "--input-dir", hf_dir, "--output-dir", out)
    assert result.exit_code == 2 and "is not empty: pass --force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert cli("convert", "hf2pth", "--input-dir", hf_dir, "--output-dir", out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "consolidated.00.pth").exists()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_cli_missing_config(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path / "src")
    (src / "config.json").unlink()
    assert_refused(cli("convert", "hf2pth", "--input-dir", src, "--output-dir", tmp_path / "out"),
                   tmp_path / "out", f"no config.json in {src}")


def test_cli_shape_contradicting_config(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_config(src, intermediate_size=192)
    assert_refused(cli("convert", "hf2pth", "--input-dir", src, "--output-dir", tmp_path / "out"), tmp_path / "out",
                   "contradict its config: model.layers.0.mlp.gate_proj.weight (176, 64) (expected (192, 64))")


def test_cli_unsupported_rope_scaling(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_config(src, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    assert_refused(cli("convert", "hf2pth", "--input-dir", src, "--output-dir", tmp_path / "out"),
                   tmp_path / "out", "unsupported rope scaling type 'yarn'")


def test_cli_truncated_safetensors(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path / "src")
    _truncate(src / "model.safetensors")
    assert_refused(cli("convert", "hf2pth", "--input-dir", src, "--output-dir", tmp_path / "out"),
                   tmp_path / "out", f"cannot read {src / 'model.safetensors'}")


def test_cli_truncated_pth(pth_dirs, tmp_path):
    src = _copy(pth_dirs["llama2", 2], tmp_path / "src")
    _truncate(src / "consolidated.01.pth")
    assert_refused(cli("convert", "pth2hf", "--input-dir", src, "--output-dir", tmp_path / "out"),
                   tmp_path / "out", f"cannot read {src / 'consolidated.01.pth'}")


def test_cli_shards_that_disagree(pth_dirs, tmp_path):
    src = _copy(pth_dirs["llama2", 2], tmp_path / "src")
    shard = torch.load(src / "consolidated.01.pth", weights_only=True)
    shard["layers.2.ffn_norm.weight"] = shard["layers.2.ffn_norm.weight"] + 1
    torch.save(shard, src / "consolidated.01.pth")
    assert_refused(cli("convert", "pth2hf", "--input-dir", src, "--output-dir", tmp_path / "out"), tmp_path / "out",
                   "shards disagree: layers.2.ffn_norm.weight differs between consolidated.00.pth and "
                   "consolidated.01.pth")


def test_cli_missing_shard(pth_dirs, tmp_path):
    src = _copy(pth_dirs["llama2", 2], tmp_path / "src")
    (src / "consolidated.00.pth").unlink()
    assert_refused(cli("convert", "pth2hf", "--input-dir", src, "--output-dir", tmp_path / "out"),
                   tmp_path / "out", "are not numbered 00..00 (found consolidated.01.pth): is one missing?")


# ---------------------------------------------------------------- streaming
_STREAM_SCRIPT = """
import sys
from pathlib import Path
import megallama.formats.base as base
import megallama.formats.hf as hf
hf.REMAP_BYTES, hf.MAX_SHARD_BYTES = 3_000_000, 2_000_000
import megallama.formats.checksums as checksums
checksums.HASH_BLOCK = 1 << 20  # the manifest hash reads 16 MB blocks: more than this whole tiny model
from megallama.convert import convert

def kib(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

root = Path(sys.argv[1])
for _ in range(2):  # the first pass also pays for lazy imports; report the second
    growth = []
    for src, fmt, out, kwargs in (("src", "meta", "pth", {"shards": 8}), ("pth", "hf", "hf", {})):
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
        before = kib("VmRSS")
        convert(root / src, root / out, src_format="meta" if fmt == "hf" else "hf", dst_format=fmt, force=True,
                **kwargs)
        growth.append(f"{fmt} {(kib('VmHWM') - before) * 1024}")
print("\\n".join(growth))
"""


@pytest.mark.slow
def test_peak_memory_stays_near_one_output_shard(tmp_path):
    """26 MB model, 3.3 MB Meta shards, 2 MB HF files: neither direction may grow by half the model."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")

    from safetensors.torch import save_file

    from megallama.names import expected_shapes

    spec = ModelSpec(hidden_size=128, num_layers=32, num_heads=8, num_kv_heads=8, ffn_hidden_size=352,
                     vocab_size=256)
    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file({n: torch.randn(s, generator=gen) for n, s in expected_shapes(spec).items()},
              str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(spec.to_hf_config()))
    model_bytes = (src / "model.safetensors").stat().st_size
    run = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(tmp_path)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    growth = dict(line.split() for line in run.stdout.splitlines())
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 4
    for fmt, grew in growth.items():
        assert int(grew) < model_bytes / 2, (fmt, int(grew), model_bytes)
