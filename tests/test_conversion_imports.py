"""The conversion path stays light and quiet: no transformers or megatron-core import, Megatron-LM's enums in
`args` read without megatron-core, and a refused pickle in a rank file gives exactly one stderr line."""

import enum
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megallama.formats.megatron.torch_format import MODEL_FILE, MegatronStandIn, load_rank_file

ROOT = Path(__file__).resolve().parent.parent

# Runs `megallama` commands in one fresh interpreter, then prints which heavy packages got imported.
RUN_CLI = r"""
import json, sys
from megallama.cli import app
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        app(argv, prog_name="megallama")
    except SystemExit as e:
        codes.append(e.code or 0)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"megatron", "transformers"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def run_cli(*commands: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", RUN_CLI, json.dumps([[str(a) for a in c] for c in commands])],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_convert_commands_import_neither_transformers_nor_megatron(hf_dir, tmp_path):
    pth, meg, back, hf = (tmp_path / n for n in ("pth", "meg", "back", "hf"))
    result = run_cli(["convert", "hf2pth", "--input-dir", hf_dir, "--output-dir", pth],
                     ["convert", "pth2megatron", "--input-dir", pth, "--output-dir", meg, "--tp", "2", "--pp", "2"],
                     ["convert", "megatron2pth", "--input-dir", meg, "--output-dir", back],
                     ["convert", "pth2hf", "--input-dir", back, "--output-dir", hf])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 0, 0], "heavy": []}, result.stderr
    assert (hf / "model.safetensors").is_file()


# ---------------------------------------------------------------- pickles naming foreign classes
class ModelType(enum.Enum):  # pickled under megatron-core's name by `save_as_megatron_lm`
    encoder_or_decoder = 1


class Evil:
    """Runs a shell command when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def save_renaming(obj, path: Path, renames: dict) -> None:
    """torch.save `obj`, writing the globals in `renames` ({object: b"module\\nname"}) under other names."""

    class Pickler(pickle._Pickler):
        def save_global(self, o, name=None):
            for key, new in renames.items():
                if o is key:
                    self.write(pickle.GLOBAL + new + b"\n")
                    self.memoize(o)
                    return
            super().save_global(o, name)

    module = type(sys)("renaming_pickle")
    module.Pickler, module.Unpickler, module.load = Pickler, pickle.Unpickler, pickle.load
    torch.save(obj, path, pickle_module=module)


@pytest.fixture(scope="module")
def megatron_dir(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("meg")
    result = run_cli(["convert", "hf2pth", "--input-dir", hf_dir, "--output-dir", root / "pth"],
                     ["convert", "pth2megatron", "--input-dir", root / "pth", "--output-dir", root / "meg",
                      "--ckpt-format", "torch"])
    assert result.returncode == 0, result.stderr
    return root / "meg"


def rank_file(meg: Path) -> Path:
    return meg / "release" / "mp_rank_00" / MODEL_FILE


@pytest.mark.slow
def test_megatron_lm_enums_in_args_load_as_inert_stand_ins(megatron_dir, tmp_path):
    meg = tmp_path / "meg"
    subprocess.run(["cp", "-r", str(megatron_dir), str(meg)], check=True)
    (meg / "megallama.json").unlink()  # the spec now comes from the args namespace itself
    ckpt = torch.load(rank_file(meg), weights_only=False)
    ckpt["args"].model_type = ModelType.encoder_or_decoder
    marker = tmp_path / "ran"
    ckpt["args"].hook = Evil(marker)
    save_renaming(ckpt, rank_file(meg), {ModelType: b"megatron.core.enums\nModelType",
                                         os.system: b"megatron.training.utils\nrun"})
    args = load_rank_file(rank_file(meg))["args"]
    assert isinstance(args.model_type, MegatronStandIn) and args.model_type.args == (1,)
    assert repr(args.model_type) == "megatron.core.enums.ModelType(1,)"
    assert isinstance(args.hook, MegatronStandIn) and not marker.exists()  # recorded, never called

    result = run_cli(["convert", "megatron2pth", "--input-dir", meg, "--output-dir", tmp_path / "pth"])
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"codes": [0], "heavy": []}, result.stderr
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["malicious", "corrupt"])
def test_refused_rank_pickle_prints_one_line(megatron_dir, tmp_path, damage):
    meg = tmp_path / "meg"
    subprocess.run(["cp", "-r", str(megatron_dir), str(meg)], check=True)
    marker = tmp_path / "ran"
    if damage == "malicious":
        ckpt = torch.load(rank_file(meg), weights_only=False)
        ckpt["args"].hook = Evil(marker)
        torch.save(ckpt, rank_file(meg))
    else:
        data = bytearray(rank_file(meg).read_bytes())
        at = data.index(b"data.pkl") + 60  # inside the pickle stream
        data[at:at + 16] = b"\xff" * 16
        rank_file(meg).write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}
    result = subprocess.run([sys.executable, "-m", "megallama", "convert", "megatron2pth", "--input-dir", str(meg),
                             "--output-dir", str(tmp_path / "pth")], capture_output=True, text=True, env=env,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "is not a readable torch checkpoint" in lines[0]
    if damage == "malicious":
        assert "it would unpickle posix.system, which is not allowed" in lines[0]
    assert not marker.exists() and not (tmp_path / "pth").exists()


# ---------------------------------------------------------------- make gpu-check without a GPU
@pytest.mark.slow
def test_gpu_check_without_cuda_skips(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--out", str(out)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert (result.returncode, result.stdout) == (0, "no GPU: skipped\n"), result.stderr
    assert not out.exists()


def test_gpu_check_mfu_arithmetic():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu import flops_per_token, peak_flops

    from megallama.spec import ModelSpec

    spec = ModelSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=100)
    assert flops_per_token(spec, 16) == 6 * spec.num_parameters() + 12 * 2 * 64 * 16
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Some new GPU") is None


# ---------------------------------------------------------------- manifest checksums hashed in the background
def test_prefetched_sha256_matches_and_notices_a_change(tmp_path):
    import hashlib

    from megallama.formats.base import prefetch_sha256, sha256

    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(1 << 20))
    prefetch_sha256([path])
    assert sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    prefetch_sha256([path])
    path.write_bytes(b"changed, and a different size")  # a stale prefetch must not be used
    assert sha256(path) == hashlib.sha256(b"changed, and a different size").hexdigest()


# ---------------------------------------------------------------- start-up: help and the first byte read
FIRST_READ = r"""
import json, sys, time
t0 = time.perf_counter()
import megallama.formats.checksums as checksums
seen = {}
original = checksums.hash_file
def hash_file(path):
    seen.setdefault("first_read_s", time.perf_counter() - t0)
    seen.setdefault("torch_imported", "torch" in sys.modules)
    return original(path)
checksums.hash_file = hash_file
from megallama.cli import app
try:
    app(json.loads(sys.argv[1]), prog_name="megallama")
except SystemExit as e:
    seen["code"] = e.code or 0
seen["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "megatron", "transformers"})
print(json.dumps(seen))
"""


def test_help_imports_no_torch():
    for argv in (["--help"], ["convert", "hf2pth", "--help"], ["convert", "megatron2hf", "--help"]):
        result = subprocess.run([sys.executable, "-c", FIRST_READ, json.dumps(argv)], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["code"] == 0 and report["heavy"] == [], (argv, report)


def test_conversion_reads_its_input_before_importing_torch(hf_dir, tmp_path):
    argv = ["convert", "hf2pth", "--input-dir", str(hf_dir), "--output-dir", str(tmp_path / "pth")]
    result = subprocess.run([sys.executable, "-c", FIRST_READ, json.dumps(argv)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and report["torch_imported"] is False, report
    assert report["first_read_s"] < 2.0, report  # about 0.3 s on an idle 2-core machine (docs/performance.md)
