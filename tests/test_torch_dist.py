"""torch_dist: megallama's output judged by megatron-core, megatron-core's output read by megallama.

One 4-rank torchrun launch (gloo, CPU) does all the multi-process work:
- every preset's torch_dist checkpoint (written once, TP-independent) is loaded by megatron-core's
  `dist_checkpointing.load` into the project's GPTModel at 1x1, 2x1, 1x2 and 2x2; the gathered fp32 logits must
  equal transformers' within the verify tolerance (1x1 and 2x1 / 1x2 run as data-parallel replicas);
- megatron-core's own `dist_checkpointing.save` writes the LLaMA-2 model (with Adam state and RNG, iter_N +
  tracker, Megatron-LM's top-level dict) at 2x2 and at 1x1.
The rest runs in this process: megallama reads megatron-core's saves bit-exactly, its own metadata equals
megatron-core's, torch <-> torch_dist round trips are bit-exact, and bad input exits 2 with one line.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli, hf_model, hf_tensors

from megallama.convert import convert
from megallama.engine.launch import run_torchrun
from megallama.formats.base import DictReader
from megallama.formats.megatron.torch_dist import DistCheckpoint, dist_key, open_torch_dist, write_torch_dist
from megallama.formats.megatron.torch_format import open_megatron, write_megatron
from megallama.spec import padded_vocab_size

WORKER = Path(__file__).parent / "workers" / "load_and_forward.py"
PRESETS = ("llama1", "llama2", "llama3", "tied")
GRID = [(1, 1), (2, 1), (1, 2), (2, 2)]
TOLERANCE = 1e-5
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


@pytest.fixture(scope="module")
def launched(hf_dirs, tmp_path_factory):
    """Runs the one 4-rank launch; returns (root, cases)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("torch_dist")
    tokens = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, root / "tokens.pt")
    cases = []
    for preset in PRESETS:
        spec, tensors = hf_model(hf_dirs[preset])
        ckpt = root / f"{preset}-dist"
        ckpt.mkdir()
        write_torch_dist(DictReader(spec, tensors), ckpt)  # one checkpoint for every TP x PP
        model = LlamaForCausalLM.from_pretrained(hf_dirs[preset], torch_dtype=torch.float32).eval()
        with torch.no_grad():
            torch.save(model(tokens).logits, root / f"{preset}.ref.pt")  # [b, s, V]
        for tp, pp in GRID:
            cases.append(dict(name=preset, ckpt=str(ckpt), ckpt_format="torch_dist", tp=tp, pp=pp,
                              spec=spec.to_dict(), padded=padded_vocab_size(spec.vocab_size, tp),
                              tokens=str(root / "tokens.pt"), reference=str(root / f"{preset}.ref.pt"),
                              result=str(root / f"{preset}_{tp}x{pp}.json")))
    spec, tensors = hf_model(hf_dirs["llama2"])
    for tp, pp in [(2, 2), (1, 1)]:
        padded = padded_vocab_size(spec.vocab_size, tp)
        source = root / f"llama2-torch-{tp}x{pp}"
        source.mkdir()
        write_megatron(DictReader(spec, tensors), source, tp=tp, pp=pp)
        cases.append(dict(kind="mcore_save", name="llama2", source=str(source), ckpt=str(root / f"mcore-{tp}x{pp}"),
                          tp=tp, pp=pp, spec=spec.to_dict(), padded=padded, iteration=5))
    for variant in ("model_only", "fully_parallel", "singleton_local_shards"):  # at 1x1, the 4 ranks are DP 4
        cases.append(dict(kind="mcore_save", name="llama2", source=str(root / "llama2-torch-1x1"),
                          ckpt=str(root / f"mcore-1x1-{variant}"), tp=1, pp=1, spec=spec.to_dict(),
                          padded=padded_vocab_size(spec.vocab_size, 1), iteration=5, model_only=True,
                          **({variant: True} if variant != "model_only" else {})))
    job = root / "job.json"
    job.write_text(json.dumps(cases))
    proc = run_torchrun([str(WORKER), str(job)], nproc=4, capture=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, cases


@pytest.mark.slow
def test_megatron_core_loads_our_output_at_every_tp_pp(launched):
    _, cases = launched
    results = [json.loads(Path(c["result"]).read_text()) for c in cases if c.get("kind") != "mcore_save"]
    assert len(results) == len(PRESETS) * len(GRID)
    for r in results:
        assert r["keys_match"] and r["padding_logits_zero"], r
        assert r["max_abs_diff"] <= TOLERANCE, r


@pytest.mark.slow
def test_megatron_core_save_at_2x2_reads_back_bit_exact(launched, hf_dirs, tmp_path):
    """A training run's checkpoint (optimizer, RNG, iter_N, no megallama.json) -> HF equals the source weights."""
    root, _ = launched
    ckpt = root / "mcore-2x2"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "5"
    names = DistCheckpoint(ckpt / "iter_0000005").metadata.state_dict_metadata
    assert any(k.startswith("optimizer.") for k in names) and any(k.startswith("rng_state") for k in names)
    result = cli("convert", "megatron2hf", "--input-dir", ckpt, "--output-dir", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    source, out = hf_tensors(hf_dirs["llama2"]), hf_tensors(tmp_path / "hf")
    assert source.keys() == out.keys()
    for name, t in source.items():
        assert torch.equal(t, out[name]), name


@pytest.mark.slow
def test_our_metadata_equals_megatron_cores(launched, hf_dirs, tmp_path):
    """Same model, same weights: every model key, global shape, chunk, dtype and `_extra_state` object of our
    .metadata is what megatron-core's own save at 1x1 holds, in the same order, and the tensors are equal."""
    root, _ = launched
    spec, tensors = hf_model(hf_dirs["llama2"])
    write_torch_dist(DictReader(spec, tensors), tmp_path / "ours", iteration=5)
    ours = DistCheckpoint(tmp_path / "ours" / "iter_0000005")
    theirs = DistCheckpoint(root / "mcore-1x1" / "iter_0000005")
    model_keys = [k for k in theirs.metadata.state_dict_metadata if k.startswith(MODEL_PREFIXES)]
    assert list(ours.metadata.state_dict_metadata) == model_keys
    for key in model_keys:
        assert ours.metadata.state_dict_metadata[key] == theirs.metadata.state_dict_metadata[key], key
    for key, md in ours.tensors.items():
        whole = ((0,) * len(md.size), tuple(md.size))
        assert torch.equal(ours.read(key, *whole), theirs.read(key, *whole)), key
    common = torch.load(tmp_path / "ours" / "iter_0000005" / "common.pt", weights_only=False)
    theirs_common = torch.load(root / "mcore-1x1" / "iter_0000005" / "common.pt", weights_only=False)
    assert set(common) == set(theirs_common) - {"optimizer"}  # its param groups; we write no optimizer
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 5
    assert common["content_metadata"] == theirs_common["content_metadata"]


def storage(it_dir: Path) -> dict:
    """{(key, chunk offset): (file, byte offset, length)}: where .metadata says each chunk's bytes are."""
    md = DistCheckpoint(it_dir).metadata
    return {(i.fqn, None if i.offset is None else tuple(i.offset)): (s.relative_path, s.offset, s.length)
            for i, s in md.storage_data.items()}


def chunks(it_dir: Path) -> dict:
    """.metadata's tensors with their chunk lists sorted: which rank planned a chunk first only orders the list."""
    md = DistCheckpoint(it_dir).metadata.state_dict_metadata
    return {k: (v.properties, v.size, sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
            if hasattr(v, "chunks") else v for k, v in md.items()}


@pytest.mark.slow
def test_our_storage_is_megatron_cores(launched, hf_dirs, tmp_path):
    """Against megatron-core's own save of the model alone (what a converter writes; Megatron-LM's
    --no-save-optim --no-save-rng) at DP 4 without fully-parallel save (DP rank 0 writes, as at DP 1): the same
    .metadata, and in storage_data every chunk in the same file with the same serialized length. Within a file
    megatron-core orders the chunks differently (so byte offsets differ); readers go by storage_data's offsets."""
    root, _ = launched
    spec, tensors = hf_model(hf_dirs["llama2"])
    write_torch_dist(DictReader(spec, tensors), tmp_path / "ours", iteration=5)
    ours, theirs = tmp_path / "ours" / "iter_0000005", root / "mcore-1x1-model_only" / "iter_0000005"
    assert DistCheckpoint(ours).metadata.state_dict_metadata == DistCheckpoint(theirs).metadata.state_dict_metadata
    mine, core = storage(ours), storage(theirs)
    assert {k: (f, n) for k, (f, _, n) in mine.items()} == {k: (f, n) for k, (f, _, n) in core.items()}
    assert sorted(p.name for p in ours.glob("*.distcp")) == sorted(p.name for p in theirs.glob("*.distcp"))
    for key, (file, offset, length) in core.items():  # and the bytes at each place are the same chunk
        with open(ours / mine[key][0], "rb") as a, open(theirs / file, "rb") as b:
            a.seek(mine[key][1])
            b.seek(offset)
            assert a.read(length) == b.read(length), key


@pytest.mark.slow
def test_a_fully_parallel_save_holds_the_same_chunks_spread_over_the_ranks(launched, hf_dirs, tmp_path):
    """Megatron-LM's default --ckpt-fully-parallel-save at DP 4: the same .metadata as ours, the chunks' bytes
    spread over the DP ranks' files (so its storage_data differs from a single writer's by design), and both
    read back to the same tensors."""
    root, _ = launched
    spec, tensors = hf_model(hf_dirs["llama2"])
    write_torch_dist(DictReader(spec, tensors), tmp_path / "ours", iteration=5)
    ours, theirs = tmp_path / "ours" / "iter_0000005", root / "mcore-1x1-fully_parallel" / "iter_0000005"
    assert chunks(ours) == chunks(theirs)
    spread, single = storage(theirs), storage(ours)
    assert spread.keys() == single.keys()
    assert len({f.split("_")[2] for f, _, _ in spread.values()}) > 1  # __<rank>_<i>.distcp: several ranks wrote
    assert all(length == single[key][2] for key, (_, _, length) in spread.items())  # the same serialized chunks
    for folder in (tmp_path / "ours", root / "mcore-1x1-fully_parallel"):
        with open_torch_dist(folder) as reader:
            assert all(torch.equal(reader.get(name), t) for name, t in tensors.items()), folder


@pytest.mark.slow
def test_reads_megatron_cores_unstacked_layers(launched, hf_dirs):
    """megatron-core's save with singleton_local_shards keeps each layer under its own number (no leading layer
    axis) and stores linear_fc1's SwiGLU halves as two tensors (`weight_w`, `weight_v`); the reader gives the
    same tensors."""
    root, _ = launched
    _, tensors = hf_model(hf_dirs["llama2"])
    ckpt = root / "mcore-1x1-singleton_local_shards"
    keys = DistCheckpoint(ckpt / "iter_0000005").metadata.state_dict_metadata
    assert any(k.startswith("decoder.layers.3.") for k in keys) and "decoder.layers.mlp.linear_fc1.weight" not in keys
    assert "decoder.layers.3.mlp.linear_fc1.weight_w" in keys and "decoder.layers.3.mlp.linear_fc1.weight_v" in keys
    with open_torch_dist(ckpt) as reader:
        assert all(torch.equal(reader.get(name), t) for name, t in tensors.items())


def test_key_table_matches_megatron_core_keys_map():
    """The TE names we write are megatron-core's local-spec sharded_state_dict_keys_map."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    assert dist_key("decoder.layers.3.input_layernorm.weight", 3) == (
        "decoder.layers." + keys_map["input_layernorm."] + "weight")
    assert dist_key("decoder.layers.3.pre_mlp_layernorm.weight", 3) == (
        "decoder.layers." + keys_map["pre_mlp_layernorm."] + "weight")


@pytest.fixture(scope="module")
def dist_llama2(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_llama2")
    result = cli("convert", "hf2megatron", "--input-dir", hf_dirs["llama2"], "--output-dir", root / "meg",
                 "--tp", "2", "--pp", "2")
    assert result.exit_code == 0, result.output
    return root / "meg"


def test_cli_default_is_torch_dist_with_launch_flags(dist_llama2):
    flags = (dist_llama2 / "megatron_args.txt").read_text().splitlines()
    assert "--ckpt-format torch_dist" in flags
    assert "--tensor-model-parallel-size 2" in flags and "--pipeline-model-parallel-size 2" in flags
    assert (dist_llama2 / "release" / "metadata.json").is_file()
    assert (dist_llama2 / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert not any(p.name.startswith("mp_rank_") for p in (dist_llama2 / "release").iterdir())


def test_torch_dist_torch_round_trips_bit_exact(dist_llama2, tmp_path):
    """torch_dist -> torch (2x2) -> torch_dist: global tensors equal; torch -> torch_dist -> torch: rank files equal."""
    assert cli("convert", "megatron2megatron", "--input-dir", dist_llama2, "--output-dir", tmp_path / "t",
               "--ckpt-format", "torch", "--tp", "2", "--pp", "2").exit_code == 0
    assert cli("convert", "megatron2megatron", "--input-dir", tmp_path / "t", "--output-dir", tmp_path / "d",
               "--tp", "2").exit_code == 0
    assert cli("convert", "megatron2megatron", "--input-dir", tmp_path / "d", "--output-dir", tmp_path / "t2",
               "--ckpt-format", "torch", "--tp", "2", "--pp", "2").exit_code == 0
    a, b = DistCheckpoint(dist_llama2 / "release"), DistCheckpoint(tmp_path / "d" / "release")
    assert a.metadata.state_dict_metadata == b.metadata.state_dict_metadata
    for key, md in a.tensors.items():
        whole = ((0,) * len(md.size), tuple(md.size))
        assert torch.equal(a.read(key, *whole), b.read(key, *whole)), key
    for rank in sorted((tmp_path / "t" / "release").iterdir()):
        x = torch.load(rank / "model_optim_rng.pt", weights_only=False)["model"]
        y = torch.load(tmp_path / "t2" / "release" / rank.name / "model_optim_rng.pt", weights_only=False)["model"]
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k] is None and y[k] is None) or torch.equal(x[k], y[k]), (rank.name, k)


def test_reader_matches_torch_format_reader(dist_llama2, tmp_path):
    """Both readers give the same canonical tensors for the same model."""
    convert(dist_llama2, tmp_path / "t", src_format="megatron", dst_format="megatron", ckpt_format="torch", tp=2)
    with open_torch_dist(dist_llama2) as a, open_megatron(tmp_path / "t") as b:
        assert a.spec == b.spec and a.names() == b.names()
        for name in a.names():
            assert torch.equal(a.get(name), b.get(name)), name


def _fails_cleanly(src: Path, out: Path) -> str:
    result = cli("convert", "megatron2hf", "--input-dir", src, "--output-dir", out)
    assert result.exit_code == 2, result.output
    assert not out.exists()
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_bad_input_exits_2_one_line_nothing_written(dist_llama2, hf_dirs, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(dist_llama2, truncated)
    distcp = max((truncated / "release").glob("*.distcp"), key=lambda p: p.stat().st_size)
    distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])
    assert "truncated" in _fails_cleanly(truncated, tmp_path / "out1")

    no_metadata = tmp_path / "no_metadata"
    shutil.copytree(dist_llama2, no_metadata)
    (no_metadata / "release" / ".metadata").unlink()
    assert ".metadata" in _fails_cleanly(no_metadata, tmp_path / "out2")

    other = tmp_path / "other"  # llama2's megallama.json and tracker around LLaMA-1's tensors (4 KV heads, not 2)
    shutil.copytree(dist_llama2, other)
    shutil.rmtree(other / "release")
    assert cli("convert", "hf2megatron", "--input-dir", hf_dirs["llama1"], "--output-dir",
               tmp_path / "llama1").exit_code == 0
    shutil.copytree(tmp_path / "llama1" / "release", other / "release")
    assert "linear_qkv" in _fails_cleanly(other, tmp_path / "out3")


@pytest.mark.slow
def test_verify_layer_diff_passes_on_torch_dist(hf_dirs, tmp_path):
    """verify reads torch_dist: each rank loads its slices with megatron-core's dist_checkpointing (1 x 1 here)."""
    meg = tmp_path / "meg"
    assert cli("convert", "hf2megatron", "--input-dir", hf_dirs["tied"], "--output-dir", meg).exit_code == 0
    result = cli("verify", "layer-diff", "--reference", hf_dirs["tied"], "--megatron", meg,
                 "--seq-len", "16")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output


_STREAM_SCRIPT = """
import sys
from pathlib import Path
import torch
from megallama.formats.megatron.torch_dist import write_torch_dist
from megallama.names import expected_shapes
from megallama.spec import ModelSpec

class Generated:  # makes each canonical tensor when asked: nothing is mapped or cached
    def __init__(self, layers):
        self.spec = ModelSpec(hidden_size=512, num_layers=layers, num_heads=8, num_kv_heads=8, ffn_hidden_size=1408,
                              vocab_size=1024)
    tokenizer_files, source_files = [], []
    def names(self):
        return list(expected_shapes(self.spec))
    def get(self, name):
        return torch.full(expected_shapes(self.spec)[name], float(len(name)))

def kib(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

for n, layers in enumerate((1, 16)):  # the first pass pays for lazy imports; report the second
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = kib("VmRSS")
    write_torch_dist(Generated(layers), Path(sys.argv[1]) / f"out{n}")
print((kib("VmHWM") - before) * 1024)
"""


@pytest.mark.slow
def test_writer_memory_stays_near_one_tensor(tmp_path):
    """A 200 MB model written as torch_dist: the process grows by a few tensors (2.9 MB each), not the model."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    run = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "out1" / "release").glob("*.distcp"))
    assert model_bytes > 190e6
    grew = int(run.stdout.split()[-1])
    assert grew < 20e6, (grew, model_bytes)


def test_reads_te_spec_extras(hf_dirs, tmp_path):
    """What the TE spec adds on disk (core_attention and final-norm `_extra_state` objects) is ignored. (Unstacked
    layers are checked on megatron-core's own save: test_reads_megatron_cores_unstacked_layers.)"""
    from megallama.formats.megatron.local import megatron_args
    from megallama.formats.megatron.torch_dist import _bytes_item, common_state, save_dcp, write_items

    spec, tensors = hf_model(hf_dirs["llama2"])
    padded = padded_vocab_size(spec.vocab_size, 1)
    items = write_items(tensors.__getitem__, spec, padded=padded)
    te = [_bytes_item(f"decoder.layers.self_attention.core_attention._extra_state/shard_{i}_{spec.num_layers}",
                      torch.empty(0, dtype=torch.uint8)) for i in range(spec.num_layers)]
    save_dcp(tmp_path / "te", items + te + [_bytes_item("decoder.final_layernorm._extra_state")])

    for folder in ("te",):
        (tmp_path / folder / "latest_checkpointed_iteration.txt").write_text("release")
        (tmp_path / folder / "release").mkdir()
        for f in list((tmp_path / folder).iterdir()):
            if f.is_file() and f.name != "latest_checkpointed_iteration.txt":
                f.rename(tmp_path / folder / "release" / f.name)
        args = megatron_args(spec, tp=1, pp=1, padded_vocab_size=padded, divisible_by=128,
                             transformer_impl="transformer_engine", ckpt_format="torch_dist")
        torch.save(common_state(args, None), tmp_path / folder / "release" / "common.pt")
        with open_torch_dist(tmp_path / folder) as reader:
            for name, t in tensors.items():
                assert torch.equal(reader.get(name), t), (folder, name)
