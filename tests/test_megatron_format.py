"""Megatron torch format (megatron-core local spec): bit-exact round trips, the layout pinned on example E
(formats.md Appendix B), metadata, the reader's refusals, and the CLI path through Meta pth."""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import big_shaped_spec, cli, hf_model, hf_tensors, small_spec

from megallama import transforms as T
from megallama.errors import InputError
from megallama.formats.base import DictReader, read_manifest
from megallama.formats.megatron.torch_format import (
    MODEL_FILE,
    TRACKER,
    canonical_from_ranks,
    checkpoint_dict,
    checkpoint_dir,
    detect_tokenizer,
    load_rank_file,
    megatron_args,
    open_megatron,
    rank_state_dict,
    save_rank_file,
    write_megatron,
)
from megallama.names import expected_shapes
from megallama.spec import ModelSpec, padded_vocab_size

E = small_spec()
CONFIGS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]


def hf_reader(hf_dir: Path) -> DictReader:
    """The HF fixture as a canonical reader (HF names and rotary order are canonical), independent of hf.py."""
    reader = DictReader(*hf_model(hf_dir))
    reader.tokenizer_files = [hf_dir / "tokenizer.model"]
    return reader


def write(reader, tmp_path: Path, name: str = "meg", **kwargs) -> Path:
    out = tmp_path / name
    out.mkdir()
    kwargs.setdefault("tp", 1)
    kwargs.setdefault("pp", 1)
    write_megatron(reader, out, **kwargs)
    return out


def read_all(path: Path) -> tuple[ModelSpec, dict]:
    with open_megatron(path) as r:
        return r.spec, {n: r.get(n) for n in r.names()}


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("preset", ["llama1", "llama2", "llama3", "tied"])
def test_round_trip_bit_exact(hf_dirs, tmp_path, preset):
    src = hf_reader(hf_dirs[preset])
    for tp, pp in CONFIGS:
        if src.spec.num_kv_heads % tp:  # 4 x 1 only for LLaMA-1's 4 KV heads
            continue
        spec, tensors = read_all(write(src, tmp_path, f"t{tp}p{pp}", tp=tp, pp=pp))
        assert spec == src.spec
        assert sorted(tensors) == sorted(src.names())
        for name, t in tensors.items():
            assert torch.equal(t, src.get(name)), (tp, pp, name)


def test_dtype_cast_and_args(hf_dirs, tmp_path):
    src = hf_reader(hf_dirs["llama3"])
    out = write(src, tmp_path, tp=2, pp=2, dtype="bf16")
    spec, tensors = read_all(out)
    assert spec == src.spec.replace(dtype="bfloat16")
    for name, t in tensors.items():
        assert torch.equal(t, src.get(name).to(torch.bfloat16)), name
    args = load_rank_file(checkpoint_dir(out, None, 1, 1, 2) / MODEL_FILE)["args"]
    assert args.bf16 and not args.fp16 and args.params_dtype == torch.bfloat16
    assert "--bf16" in (out / "megatron_args.txt").read_text().splitlines()


def test_canonical_from_ranks_in_memory():
    tensors = labelled(E)
    states = [[rank_state_dict(tensors.get, E, tp_rank=t, tp=2, pp_rank=p, pp=2, padded_vocab_size=256)
               for t in range(2)] for p in range(2)]
    back = canonical_from_ranks(states, E)
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)


# ---------------------------------------------------------------- layout pinned on example E
def labelled(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Every element of every tensor holds a different integer (exact in fp32): any misplaced row is visible."""
    out, offset = {}, 1
    for name, shape in expected_shapes(spec).items():
        n = int(torch.Size(shape).numel())
        out[name] = torch.arange(offset, offset + n, dtype=torch.float32).reshape(shape)
        offset += n
    assert offset < 2**24
    return out


@pytest.fixture(scope="module")
def e_dir(tmp_path_factory):
    tensors = labelled(E)
    out = tmp_path_factory.mktemp("E") / "meg"
    out.mkdir()
    write_megatron(DictReader(E, tensors), out, tp=2, pp=2, divisible_by=128)
    return out, tensors


def test_example_e_files_and_metadata(e_dir):
    out, _ = e_dir
    assert (out / TRACKER).read_text() == "release"
    assert sorted(p.name for p in (out / "release").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    ckpt = load_rank_file(out / "release/mp_rank_01_001" / MODEL_FILE)
    assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 0
    a = ckpt["args"]
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.padded_vocab_size, a.vocab_size) == (
        2, 2, 256, 128)
    assert (a.num_layers, a.hidden_size, a.ffn_hidden_size, a.num_attention_heads, a.num_query_groups) == (
        4, 64, 176, 4, 2)
    assert a.group_query_attention and a.swiglu and a.normalization == "RMSNorm" and not a.add_bias_linear
    assert a.position_embedding_type == "rope" and a.add_position_embedding and not a.rotary_interleaved
    assert a.untie_embeddings_and_output_weights and a.ckpt_format == "torch" and a.transformer_impl == "local"
    m = read_manifest(out)
    assert m["format"] == "megatron" and (m["tp"], m["pp"], m["vocab_size"], m["padded_vocab_size"]) == (2, 2, 128, 256)
    assert m["rotary_interleaved"] is False and m["transformer_impl"] == "local" and m["divisible_by"] == 128


def layer_keys(j: int) -> list[str]:
    p = f"decoder.layers.{j}."
    return [p + "input_layernorm.weight", p + "self_attention.linear_proj.weight",
            p + "self_attention.linear_proj._extra_state", p + "self_attention.linear_qkv.weight",
            p + "self_attention.linear_qkv._extra_state", p + "pre_mlp_layernorm.weight",
            p + "mlp.linear_fc1.weight", p + "mlp.linear_fc1._extra_state", p + "mlp.linear_fc2.weight",
            p + "mlp.linear_fc2._extra_state"]


def test_example_e_keys_in_model_order(e_dir):
    out, _ = e_dir
    first = load_rank_file(out / "release/mp_rank_01_000" / MODEL_FILE)["model"]
    last = load_rank_file(out / "release/mp_rank_00_001" / MODEL_FILE)["model"]
    assert list(first) == ["embedding.word_embeddings.weight", *layer_keys(0), *layer_keys(1)]
    assert list(last) == [*layer_keys(0), *layer_keys(1), "decoder.final_layernorm.weight", "output_layer.weight",
                          "output_layer._extra_state"]
    assert all(v is None for k, v in last.items() if k.endswith("_extra_state"))


def test_example_e_tensors(e_dir):
    out, src = e_dir
    model = {(t, p): load_rank_file(checkpoint_dir(out, None, t, p, 2) / MODEL_FILE)["model"]
             for t in range(2) for p in range(2)}
    for (t, p), m in model.items():
        for j in range(2):
            i = 2 * p + j  # stage-local numbering: stage 1's layer 0 is global layer 2
            pre, glob = f"decoder.layers.{j}.", f"model.layers.{i}."
            q, k, v = (src[glob + f"self_attn.{x}_proj.weight"] for x in "qkv")
            # rank t holds group t: q heads 2t, 2t+1, then k_t, v_t (16 rows each)
            assert torch.equal(m[pre + "self_attention.linear_qkv.weight"],
                               torch.cat([q[32 * t:32 * t + 32], k[16 * t:16 * t + 16], v[16 * t:16 * t + 16]]))
            gate, up = src[glob + "mlp.gate_proj.weight"], src[glob + "mlp.up_proj.weight"]
            assert torch.equal(m[pre + "mlp.linear_fc1.weight"],
                               torch.cat([gate[88 * t:88 * t + 88], up[88 * t:88 * t + 88]]))  # 88 gate, 88 up
            assert torch.equal(m[pre + "mlp.linear_fc2.weight"],
                               src[glob + "mlp.down_proj.weight"][:, 88 * t:88 * t + 88])
            assert torch.equal(m[pre + "self_attention.linear_proj.weight"],
                               src[glob + "self_attn.o_proj.weight"][:, 32 * t:32 * t + 32])
            assert torch.equal(m[pre + "input_layernorm.weight"], src[glob + "input_layernorm.weight"])
            assert torch.equal(m[pre + "pre_mlp_layernorm.weight"], src[glob + "post_attention_layernorm.weight"])
    # vocab 128 padded to 256 = 2 x 128: rank 0 has every real row, rank 1 only zero padding
    assert torch.equal(model[0, 0]["embedding.word_embeddings.weight"], src["model.embed_tokens.weight"])
    assert torch.equal(model[1, 0]["embedding.word_embeddings.weight"], torch.zeros(128, 64))
    assert torch.equal(model[0, 1]["output_layer.weight"], src["lm_head.weight"])
    assert torch.equal(model[1, 1]["output_layer.weight"], torch.zeros(128, 64))
    assert torch.equal(model[1, 1]["decoder.final_layernorm.weight"], src["model.norm.weight"])


def test_rank_files_store_only_rank_sized_storages(e_dir):
    out, _ = e_dir
    for path in (out / "release").glob("*/" + MODEL_FILE):
        for key, t in load_rank_file(path)["model"].items():
            if t is not None:
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (path.parent.name, key)


@pytest.mark.parametrize("window_bytes", [1 << 26, 1])
def test_streamed_rank_file_equals_torch_save(tmp_path, monkeypatch, window_bytes):
    # save_rank_file fills a skip_data skeleton in place; the result must be what torch.save of the dict gives,
    # also when every tensor waits for the previous one to be written (a 1-byte window)
    monkeypatch.setattr("megallama.formats.streaming.WINDOW_BYTES", window_bytes)
    src, args = labelled(E), megatron_args(E, tp=2, pp=2, padded_vocab_size=256, divisible_by=128)
    streamed, whole = tmp_path / "a" / MODEL_FILE, tmp_path / "b" / MODEL_FILE
    save_rank_file(streamed, src.get, E, args, tp_rank=1, tp=2, pp_rank=1, pp=2, padded_vocab_size=256)
    whole.parent.mkdir()
    model = rank_state_dict(src.get, E, tp_rank=1, tp=2, pp_rank=1, pp=2, padded_vocab_size=256)
    torch.save(checkpoint_dict(model, args, None), whole)
    with zipfile.ZipFile(streamed) as a, zipfile.ZipFile(whole) as b:
        assert a.testzip() is None  # every CRC is right
        assert a.namelist() == b.namelist()
        for x, y in zip(a.infolist(), b.infolist(), strict=True):  # serialization_id too: it hashes the CRCs
            assert (x.CRC, a.read(x)) == (y.CRC, b.read(y)), x.filename


def test_tied_keys(tmp_path):
    tied = E.replace(tie_embeddings=True)
    src = {k: v for k, v in labelled(tied).items()}
    single = write(DictReader(tied, src), tmp_path, "pp1", tp=2)
    m = load_rank_file(checkpoint_dir(single, None, 0, 0, 1) / MODEL_FILE)["model"]
    assert "output_layer.weight" not in m and "output_layer._extra_state" in m  # shared with the embedding
    staged = write(DictReader(tied, src), tmp_path, "pp2", tp=2, pp=2)
    last = load_rank_file(checkpoint_dir(staged, None, 0, 1, 2) / MODEL_FILE)["model"]
    assert torch.equal(last["output_layer.weight"], src["model.embed_tokens.weight"])  # P9: last stage's copy


# ---------------------------------------------------------------- launch flags
def test_megatron_args_txt(hf_dirs, tmp_path):
    out = write(hf_reader(hf_dirs["llama3"]), tmp_path, tp=2, pp=2, divisible_by=64)
    lines = (out / "megatron_args.txt").read_text().splitlines()
    for flag in ["--ckpt-format torch", "--transformer-impl local", f"--load {out.resolve()}", "--finetune",
                 "--num-layers 4", "--hidden-size 64", "--ffn-hidden-size 176", "--num-attention-heads 4",
                 "--group-query-attention", "--num-query-groups 2", "--normalization RMSNorm",
                 "--norm-epsilon 1e-05", "--swiglu", "--disable-bias-linear", "--position-embedding-type rope",
                 "--rotary-base 500000", "--use-rope-scaling", "--rope-scaling-factor 8",
                 "--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by 64",
                 "--tensor-model-parallel-size 2", "--pipeline-model-parallel-size 2",
                 "--tokenizer-type Llama2Tokenizer", f"--tokenizer-model {out.resolve() / 'tokenizer.model'}"]:
        assert flag in lines, flag
    assert not any(x.startswith(("--bf16", "--fp16", "--no-position-embedding")) for x in lines)
    assert (out / "tokenizer.model").is_file()


def test_megatron_args_llama1_and_tied(hf_dirs, tmp_path):
    l1 = (write(hf_reader(hf_dirs["llama1"]), tmp_path, "l1") / "megatron_args.txt").read_text().splitlines()
    assert "--norm-epsilon 1e-06" in l1 and "--rotary-base 10000" in l1
    assert not any(x.startswith(("--group-query-attention", "--use-rope-scaling")) for x in l1)
    tied = (write(hf_reader(hf_dirs["tied"]), tmp_path, "tied") / "megatron_args.txt").read_text().splitlines()
    assert "--untie-embeddings-and-output-weights" not in tied and "--rope-scaling-factor 32" in tied


# ---------------------------------------------------------------- reader: other layouts, refusals
def test_iteration_folder_and_optimizer_state_ignored(tmp_path):
    tensors = labelled(E)
    reader = DictReader(E, tensors)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05hello")  # any SentencePiece-looking bytes
    reader.tokenizer_files = [tmp_path / "tokenizer.model"]
    out = write(reader, tmp_path, tp=2, iteration=5)
    assert (out / TRACKER).read_text() == "5" and (out / "iter_0000005").is_dir()
    path = checkpoint_dir(out, 5, 1, 0, 1) / MODEL_FILE
    ckpt = torch.load(path, weights_only=False)
    ckpt["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-5}]}
    ckpt["rng_state"] = [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}]
    torch.save(ckpt, path)
    spec, back = read_all(out)
    assert spec == E and all(torch.equal(back[n], tensors[n]) for n in tensors)
    with open_megatron(out / "iter_0000005") as r:  # an iteration folder itself is accepted
        assert r.spec == E and r.tokenizer_files == [out / "tokenizer.model"]


def test_no_manifest_falls_back_to_args(hf_dirs, tmp_path):
    src = hf_reader(hf_dirs["llama3"])
    out = write(src, tmp_path, tp=2)
    (out / "megallama.json").unlink()
    spec, back = read_all(out)
    assert spec == src.spec.replace(bos_token_id=1, eos_token_id=2)
    assert all(torch.equal(back[n], src.get(n)) for n in back)


def test_no_manifest_no_vocab_keeps_padded_rows(tmp_path):
    out = write(DictReader(E.replace(vocab_size=100), labelled(E.replace(vocab_size=100))), tmp_path, tp=2,
                args_overrides={"vocab_size": None})
    (out / "megallama.json").unlink()
    with open_megatron(out) as r:
        assert r.spec.vocab_size == 256 and "true vocab unknown" in r.notes[0]
        assert torch.equal(r.get("model.embed_tokens.weight")[100:], torch.zeros(156, 64))


@pytest.mark.parametrize("damage,message", [
    ("tracker", "holds 'latest'"),
    ("no_tracker", "not a Megatron torch-format checkpoint folder"),
    ("truncate", "is not a readable torch checkpoint"),
    ("missing_rank", "is missing model_optim_rng.pt for mp_rank_01_001"),
    ("te_keys", "mp_rank_01_001: cannot place decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"),
    ("missing_key", "missing decoder.layers.1.mlp.linear_fc2.weight"),
])
def test_reader_refusals(tmp_path, damage, message):
    out = write(DictReader(E, labelled(E)), tmp_path, tp=2, pp=2)
    rank = out / "release/mp_rank_01_001" / MODEL_FILE
    if damage == "tracker":
        (out / TRACKER).write_text("latest")
    elif damage == "no_tracker":
        (out / TRACKER).unlink()
    elif damage == "truncate":
        rank.write_bytes(rank.read_bytes()[:1000])
    elif damage == "missing_rank":
        shutil.rmtree(rank.parent)
    else:
        ckpt = torch.load(rank, weights_only=False)
        model = ckpt["model"]
        if damage == "te_keys":
            model["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"] = model.pop(
                "decoder.layers.0.input_layernorm.weight")
        else:
            del model["decoder.layers.1.mlp.linear_fc2.weight"]
        torch.save(ckpt, rank)
    with pytest.raises(InputError, match=message):
        open_megatron(out)


def test_writer_refuses_bad_parallel(tmp_path):
    with pytest.raises(InputError, match="TP=4 does not divide the 2 KV heads"):
        write(DictReader(E, labelled(E)), tmp_path, tp=4)
    with pytest.raises(InputError, match="PP=3 does not divide the 4 layers"):
        write(DictReader(E, labelled(E)), tmp_path, "b", pp=3)


# ---------------------------------------------------------------- CLI: the whole path through Meta pth
@pytest.fixture(scope="module")
def pth_dirs(hf_dirs, tmp_path_factory):
    """{preset: Meta pth folder} made by `megallama convert hf2pth`."""
    root = tmp_path_factory.mktemp("pth")
    for preset, hf in hf_dirs.items():
        result = cli("convert", "hf2pth", "--input-dir", hf, "--output-dir", root / preset)
        assert result.exit_code == 0, result.output
    return {preset: root / preset for preset in hf_dirs}


@pytest.mark.parametrize("preset,tp,pp", [("llama1", 4, 1), ("llama2", 2, 2), ("llama3", 2, 2), ("tied", 1, 2)])
def test_cli_hf_pth_megatron_pth_hf_bit_exact(hf_dirs, pth_dirs, tmp_path, preset, tp, pp):
    meg, pth, hf = tmp_path / "meg", tmp_path / "pth", tmp_path / "hf"
    result = cli("convert", "pth2megatron", "--input_dir", pth_dirs[preset], "--output_dir", meg,
                 "--tensor_size", tp, "--pipeline_size", pp, "--ckpt-format", "torch")
    assert result.exit_code == 0, result.output
    assert "GB/s" in result.stdout and "peak RSS" in result.stdout
    assert f"--load {meg.resolve()}" in result.stdout  # the launch flags are printed, and saved
    assert (meg / "megatron_args.txt").read_text().strip() in result.stdout
    assert (meg / "tokenizer.model").read_bytes() == (hf_dirs[preset] / "tokenizer.model").read_bytes()
    manifest = read_manifest(meg)
    assert manifest["spec"]["rope_theta"] == ModelSpec.from_hf_config(
        json.loads((hf_dirs[preset] / "config.json").read_text())).rope_theta
    assert str(pth_dirs[preset] / "consolidated.00.pth") in manifest["sources"]
    assert cli("convert", "megatron2pth", "--input-dir", meg, "--output-dir", pth).exit_code == 0
    assert cli("convert", "pth2hf", "--input-dir", pth, "--output-dir", hf).exit_code == 0
    want, got = hf_tensors(hf_dirs[preset]), hf_tensors(hf)
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_cli_model_size_folder_convention(pth_dirs, tmp_path):
    # the reference scripts' --input_dir X --model_size 7B reads X/7B/
    shutil.copytree(pth_dirs["llama2"], tmp_path / "weights" / "7B")
    result = cli("convert", "pth2megatron", "--input_dir", tmp_path / "weights", "--model_size", "7B",
                 "--output_dir", tmp_path / "meg", "--tensor_size", 2, "--ckpt-format", "torch")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "meg/release/mp_rank_01" / MODEL_FILE).is_file()


@pytest.mark.parametrize("flags,message", [
    (["--tp", 4], "error: TP=4 does not divide the 2 KV heads (choose a TP that divides 2)"),
    (["--pp", 3], "error: PP=3 does not divide the 4 layers"),
])
def test_cli_refusals_leave_nothing(pth_dirs, tmp_path, flags, message):
    out = tmp_path / "meg"
    result = cli("convert", "pth2megatron", "--input-dir", pth_dirs["llama2"], "--output-dir", out, *flags)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [message], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".meg.")]


def test_cli_megatron2pth_refuses_a_broken_checkpoint(tmp_path):
    out = write(DictReader(E, labelled(E)), tmp_path, tp=2)
    (out / TRACKER).write_text("garbage")
    result = cli("convert", "megatron2pth", "--input-dir", out, "--output-dir", tmp_path / "pth")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "holds 'garbage': expected 'release' or an iteration number" in result.stderr
    assert not (tmp_path / "pth").exists()


def test_detect_tokenizer(hf_dirs, tmp_path):
    sp = hf_dirs["llama2"] / "tokenizer.model"
    tiktoken = tmp_path / "tiktoken" / "tokenizer.model"
    tiktoken.parent.mkdir()
    tiktoken.write_text("IQ== 0\nIg== 1\n")  # Llama 3's Meta tokenizer.model: "<base64 token> <rank>" lines
    hf_json = tmp_path / "tokenizer.json"
    hf_json.write_text("{}")
    out = Path("/ckpt")
    assert detect_tokenizer([sp], out) == ("Llama2Tokenizer", "/ckpt/tokenizer.model")
    assert detect_tokenizer([tiktoken, hf_json], out) == ("HuggingFaceTokenizer", "/ckpt")
    assert detect_tokenizer([tiktoken], out) == ("TikTokenizer", "/ckpt/tokenizer.model")
    assert detect_tokenizer([], out) == (None, None)


def test_synthetic_meta_checkpoint_converts(tmp_path):
    # the generator behind the 1B measurement, at toy size: Meta's layout, spec read back exactly
    from megallama.formats.meta import open_meta
    from megallama.synthetic import make_meta_checkpoint

    spec = E.replace(dtype="bfloat16", num_layers=2)
    make_meta_checkpoint(tmp_path / "pth", spec, seed=1)
    with open_meta(tmp_path / "pth") as r:
        assert r.spec == spec
        out = write(r, tmp_path, tp=2)
        want = {n: r.get(n) for n in r.names()}
    _, got = read_all(out)
    assert all(torch.equal(got[n], want[n]) for n in want)


# ---------------------------------------------------------------- the shapes of the big models, in memory
@pytest.mark.parametrize("model, tp", [("llama3-8b", 4), ("llama3-70b", 8), ("llama3-405b", 8)])
def test_big_head_counts_at_tp_and_16_layers_at_pp4(model, tp):
    """The real head counts (4, 8, 16 queries per KV head) at TP 4 / 8 with 16 layers in 4 stages, tiny head_dim:
    each rank holds its own KV groups and its stage's 4 layers numbered 0-3, and the ranks give back every
    canonical tensor bit for bit."""
    spec = big_shaped_spec(model, layers=16)
    tensors = labelled(spec)
    padded = padded_vocab_size(spec.vocab_size, tp, 128)
    states = [[rank_state_dict(tensors.get, spec, tp_rank=t, tp=tp, pp_rank=p, pp=4, padded_vocab_size=padded)
               for t in range(tp)] for p in range(4)]
    nh, ng, dh, h = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    for p, stage in enumerate(states):
        for t, state in enumerate(stage):
            layers = {int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")}
            assert layers == {0, 1, 2, 3}, (p, t)
            qkv = state["decoder.layers.3.self_attention.linear_qkv.weight"]
            assert qkv.shape == ((nh + 2 * ng) // tp * dh, h)
            groups = ng // tp  # rank t's KV heads, taken from global layer 4p+3's k_proj
            k = tensors[f"model.layers.{4 * p + 3}.self_attn.k_proj.weight"][t * groups * dh:(t + 1) * groups * dh]
            _, k_rank, _ = T.split_qkv(qkv, num_heads=nh // tp, num_kv_heads=groups)
            assert torch.equal(k_rank, k), (p, t)
    back = canonical_from_ranks(states, spec)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[n], tensors[n]) for n in tensors)
