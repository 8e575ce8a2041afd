"""Issue #21 section 1: no code runs from a checkpoint, interrupts are reported as interrupts, bad input is
refused before any work (one line, exit 2, nothing written)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from megallama.cli import app

CONFIG = Path(__file__).parents[1] / "configs" / "sft" / "tiny-cpu.yaml"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def ckpts(hf_dir, tmp_path_factory):
    """{'torch_dist' | 'torch': a Megatron checkpoint of the LLaMA-2 fixture}, written by hf2megatron."""
    root = tmp_path_factory.mktemp("trust")
    out = {}
    for fmt in ("torch_dist", "torch"):
        result = cli("convert", "hf2megatron", "--input-dir", hf_dir, "--output-dir", root / fmt, "--ckpt-format", fmt)
        assert result.exit_code == 0, result.output
        out[fmt] = root / fmt
    return out


# ---------------------------------------------------------------- 1. no code from pickles
class Payload:
    """Unpickling this runs a shell command that creates `marker` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path, via: str):
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "exec":
            return exec, (f"open({str(self.marker)!r}, 'w').close()",)
        return os.system, (f"touch {self.marker}",)


def crafted(ckpts: dict, where: str, tmp_path: Path, via: str = "system") -> tuple[Path, Path]:
    """A copy of a checkpoint whose `where` pickle (.metadata, common.pt, model_optim_rng.pt) carries a payload."""
    marker = tmp_path / "PWNED"
    fmt = "torch" if where == "model_optim_rng.pt" else "torch_dist"
    ckpt = tmp_path / f"evil-{fmt}"
    shutil.copytree(ckpts[fmt], ckpt)
    it_dir = ckpt / "release"
    if where == ".metadata":
        metadata = pickle.loads((it_dir / ".metadata").read_bytes())
        metadata.planner_data = Payload(marker, via)  # inside an otherwise valid Metadata
        (it_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    else:
        path = it_dir / "common.pt" if where == "common.pt" else next(it_dir.glob("mp_rank_*/model_optim_rng.pt"))
        state = torch.load(path, weights_only=False)
        state["args"].evil = Payload(marker, via)
        torch.save(state, path)
    return ckpt, marker


def test_safe_unpickler_reads_both_writers_metadata(ckpts):
    """Our writer's .metadata reads through the allow-list; the payload check below is not vacuous."""
    from torch.distributed.checkpoint import FileSystemReader

    from megallama.formats.safe_pickle import read_dcp_metadata

    it_dir = ckpts["torch_dist"] / "release"
    ours, plain = read_dcp_metadata(it_dir / ".metadata"), FileSystemReader(str(it_dir)).read_metadata()
    assert ours.state_dict_metadata == plain.state_dict_metadata
    assert ours.storage_data == plain.storage_data


COMMANDS = {
    "megatron2hf": lambda c, o, hf: ("convert", "megatron2hf", "--input-dir", c, "--output-dir", o),
    "megatron2pth": lambda c, o, hf: ("convert", "megatron2pth", "--input-dir", c, "--output-dir", o),
    "megatron2megatron": lambda c, o, hf: ("convert", "megatron2megatron", "--input-dir", c, "--output-dir", o,
                                           "--tp", "2"),
    "verify": lambda c, o, hf: ("verify", "layer-diff", "--reference", hf, "--megatron", c),
    "inspect": lambda c, o, hf: ("inspect", c),
    "generate": lambda c, o, hf: ("generate", "--megatron", c, "--prompt", "hello", "--max-new-tokens", "2"),
    "sft": lambda c, o, hf: ("sft", "--config", CONFIG, f"load={c}", f"data.train={o.parent / 'train.jsonl'}",
                             f"output={o}", "train.steps=1", "train.warmup_steps=0"),
}


@pytest.fixture
def no_launch(monkeypatch):
    """Ranks must never start: any launch fails the test loudly."""
    import megallama.engine.launch as launch

    def refuse(*args, **kwargs):
        raise AssertionError("a worker was launched")

    monkeypatch.setattr(launch, "run_torchrun", refuse)
    monkeypatch.setattr(launch.subprocess, "Popen", refuse)  # also what the generate/verify launchers use


@pytest.mark.parametrize("where", [".metadata", "common.pt", "model_optim_rng.pt"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_crafted_pickle_never_runs(ckpts, hf_dir, tmp_path, no_launch, command, where):
    ckpt, marker = crafted(ckpts, where, tmp_path, via="exec" if command == "inspect" else "system")
    (tmp_path / "train.jsonl").write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    out = tmp_path / "out"
    result = cli(*COMMANDS[command](ckpt, out, hf_dir))
    assert not marker.exists(), "the payload ran"
    line = assert_one_line(result, 2, "not allowed")
    assert ("exec" if command == "inspect" else "system") in line
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_rank_side_guard_refuses_payload(ckpts, tmp_path):
    """Inside a rank, megatron-core's own reads (FileSystemReader.read_metadata, load_bytes) are restricted too."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from megallama.errors import InputError
    from megallama.formats.safe_pickle import guard_dcp_loading

    ckpt, marker = crafted(ckpts, ".metadata", tmp_path)
    saved = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
    try:
        guard_dcp_loading()
        with pytest.raises(InputError, match="posix.system is not allowed"):
            FileSystemReader(str(ckpt / "release")).read_metadata()
        planner = DefaultLoadPlanner(flatten_state_dict=False)
        planner.state_dict = {}
        item = type("Item", (), {"dest_index": type("I", (), {"fqn": "x"})()})()
        with pytest.raises(pickle.UnpicklingError):
            buf = io.BytesIO()
            torch.save([Payload(marker, "system")], buf)
            buf.seek(0)
            planner.load_bytes(item, buf)
        assert FileSystemReader(str(ckpts["torch_dist"] / "release")).read_metadata().storage_data
    finally:
        FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes = saved
    assert not marker.exists()


# ---------------------------------------------------------------- 2. --tp 0 / --pp 0
@pytest.mark.parametrize("command,fmt,flag", [
    ("hf2megatron", "torch_dist", "--tp"), ("hf2megatron", "torch", "--pp"), ("pth2megatron", "torch_dist", "--pp"),
    ("pth2megatron", "torch", "--tp"), ("megatron2megatron", "torch", "--tp"),
    ("megatron2megatron", "torch_dist", "--pp"),
    ("generate", None, "--tp")])
def test_zero_parallel_size_is_refused(ckpts, hf_dir, tmp_path, no_launch, command, fmt, flag):
    src = {"hf2megatron": hf_dir, "megatron2megatron": ckpts["torch"]}.get(command)
    if command == "pth2megatron":
        src = tmp_path / "pth"
        assert cli("convert", "hf2pth", "--input-dir", hf_dir, "--output-dir", src).exit_code == 0
    out = tmp_path / "out"
    if command == "generate":
        args = ("generate", "--megatron", ckpts["torch_dist"], "--prompt", "hi", "--json", out / "c.json", flag, "0")
    else:
        args = ("convert", command, "--input-dir", src, "--output-dir", out, "--ckpt-format", fmt, flag, "0")
    assert_one_line(cli(*args), 2, f"{flag} must be >= 1 (got 0)")
    assert not out.exists()


# ---------------------------------------------------------------- 3. an interrupt inside torch.save
# Every write of torch.save's zip writer into a stream sleeps (the .distcp files are streams), so the signal lands
# inside a write called from torch's C++ writer, which then raises RuntimeError ("enforce fail at
# inline_container.cc:672 ... unexpected pos") over the KeyboardInterrupt: what a user's Ctrl-C mostly hit.
SLOW_SAVE = """
import time
import torch.serialization as ts
busy = []
class SlowStream:
    def __init__(self, f):
        self.f = f
    def write(self, b):
        if busy:
            time.sleep(0.01)
        return self.f.write(b)
    def flush(self):
        self.f.flush()
def slow_save(*args, **kwargs):
    busy.append(1)
    try:
        return _save(*args, **kwargs)
    finally:
        busy.pop()
init, _save = ts._open_zipfile_writer_buffer.__init__, ts._save
ts._open_zipfile_writer_buffer.__init__ = lambda self, buffer: init(self, SlowStream(buffer))
ts._save = slow_save
from megallama.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_interrupt_inside_a_torch_dist_write_is_the_interrupt(hf_dir, tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    sig = signal.Signals[sig]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "convert", "hf2megatron", "--input-dir", str(hf_dir),
                             "--output-dir", str(work / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(work.glob(".out.tmp-*/release/*.distcp")):  # mid-write: the first .distcp is open
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip().splitlines() == [f"error: interrupted by {sig.name}"]
    assert os.listdir(work) == []  # neither the output nor its staging folder


# ---------------------------------------------------------------- 4. sft on a torch_dist checkpoint missing a .distcp
@pytest.mark.parametrize("resume", [False, True])
def test_sft_refuses_a_missing_distcp_before_writing(ckpts, tmp_path, no_launch, resume):
    broken = tmp_path / ("run" if resume else "broken")
    shutil.copytree(ckpts["torch_dist"], broken)
    (broken / "release" / "__0_1.distcp").unlink()
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    if resume:  # a run whose latest checkpoint lost a data file: its config.yaml must stay as it is
        (broken / "config.yaml").write_text("# the run's own config\n")
        output, extra = broken, ["--resume"]
    else:
        output, extra = tmp_path / "out", []
    before = sorted(p.name for p in output.iterdir()) if resume else None
    load = ckpts["torch_dist"] if resume else broken
    result = cli("sft", "--config", CONFIG, f"load={load}", f"data.train={train}", f"output={output}",
                 "train.steps=1", "train.warmup_steps=0", *extra)
    assert_one_line(result, 2, "__0_1.distcp is missing")
    if resume:
        assert (broken / "config.yaml").read_text() == "# the run's own config\n"
        assert sorted(p.name for p in output.iterdir()) == before
    else:
        assert not output.exists()


# ---------------------------------------------------------------- 6. rope scaling megatron-core cannot represent
def test_hf2megatron_refuses_unrepresentable_llama3_rope(hf_dirs, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["llama3"], hf)
    config = json.loads((hf / "config.json").read_text())
    config["rope_parameters"]["high_freq_factor"] = 2.0  # transformers 5 writes rope_parameters
    (hf / "config.json").write_text(json.dumps(config))
    for fmt in ("torch_dist", "torch"):
        result = cli("convert", "hf2megatron", "--input-dir", hf, "--output-dir", tmp_path / "out",
                     "--ckpt-format", fmt)
        assert_one_line(result, 2, "high_freq_factor", "hard-coded")
        assert not (tmp_path / "out").exists()
    from megallama.engine.model import check_rope_supported  # verify's check is the same one
    from megallama.errors import InputError
    from megallama.spec import ModelSpec

    with pytest.raises(InputError, match="high_freq_factor"):
        check_rope_supported(ModelSpec.from_hf_config(config))


# ---------------------------------------------------------------- 7. inspect's tokenizer
def test_inspect_does_not_call_generation_config_a_tokenizer(hf_dir, tmp_path):
    from megallama.formats.base import TOKENIZER_FILES

    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    for name in TOKENIZER_FILES:
        if name != "generation_config.json":
            (hf / name).unlink(missing_ok=True)
    assert (hf / "generation_config.json").is_file()
    assert cli("convert", "hf2megatron", "--input-dir", hf, "--output-dir", tmp_path / "td").exit_code == 0
    result = cli("inspect", tmp_path / "td", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tokenizer"] == [] and report["tokenizer_type"] is None


# ---------------------------------------------------------------- 9. missing rank files, outputs checked first
def test_missing_alibaba_rank_is_named(hf_dir, tmp_path):
    from dialect_fixtures import build

    ckpt = build("alibaba", hf_dir, tmp_path / "alibaba", tp=2, pp=1)
    missing = next(p for p in ckpt.rglob("mp_rank_01*") if p.is_dir())
    shutil.rmtree(missing)
    result = cli("convert", "megatron2hf", "--input-dir", ckpt, "--output-dir", tmp_path / "out")
    assert_one_line(result, 2, missing.name, "TP=2")


@pytest.mark.parametrize("command", ["generate", "verify"])
def test_unwritable_json_is_refused_before_the_model_runs(ckpts, hf_dir, tmp_path, no_launch, command):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = blocker / "report.json"  # a file where a folder should be: never writable
    if command == "generate":
        args = ("generate", "--megatron", ckpts["torch_dist"], "--prompt", "hi", "--json", target)
    else:
        args = ("verify", "layer-diff", "--reference", hf_dir, "--megatron", ckpts["torch_dist"], "--json", target)
    assert_one_line(cli(*args), 2, str(blocker))


# ---------------------------------------------------------------- 5. --model-config for args without the architecture
@pytest.mark.parametrize("dialect", ["fork", "alibaba"])
def test_model_config_gives_the_architecture_the_args_lack(hf_dirs, tmp_path, dialect):
    """The fork saves `args: None`, alibaba's args lack eps and theta; the user's folder stays untouched."""
    from dialect_fixtures import build
    from safetensors.torch import load_file

    hf_dir = hf_dirs["llama1" if dialect == "fork" else "llama2"]  # the fork is MHA only

    ckpt = build(dialect, hf_dir, tmp_path / dialect, tp=2, pp=1)
    for name in ("config.json", "params.json"):
        moved = ckpt / name
        if moved.is_file():
            shutil.move(moved, tmp_path / f"{dialect}-{name}")  # as the user has it: not in the checkpoint
    config = tmp_path / f"{dialect}-params.json" if dialect == "fork" else hf_dir / "config.json"
    out = tmp_path / "hf"
    assert_one_line(cli("convert", "megatron2hf", "--input-dir", ckpt, "--output-dir", out), 2, "--model-config")
    before = sorted(p.name for p in ckpt.rglob("*"))
    result = cli("convert", "megatron2hf", "--input-dir", ckpt, "--output-dir", out, "--model-config", config)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ckpt.rglob("*")) == before
    source, converted = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert source.keys() == converted.keys()
    for name, t in source.items():
        assert torch.equal(t, converted[name]), name


HF_OF = {"fork": "llama1", "alibaba": "llama2"}  # the fork is MHA only; alibaba's args do not say GQA


def argsless(hf_dirs, out: Path, dialect: str, *, tp: int = 2, pp: int = 1, tokenizer: bool = True) -> Path:
    """A dialect checkpoint whose args lack the architecture, its config.json / params.json not beside it (as the
    user has it); without `tokenizer`, no tokenizer.model either (nothing tells the true vocab)."""
    from dialect_fixtures import build

    ckpt = build(dialect, hf_dirs[HF_OF[dialect]], out, tp=tp, pp=pp)
    for name in ("config.json", "params.json") + (() if tokenizer else ("tokenizer.model",)):
        (ckpt / name).unlink(missing_ok=True)
    return ckpt


@pytest.mark.parametrize("dialect", ["fork", "alibaba"])
def test_inspect_describes_an_argsless_checkpoint_from_its_shapes(hf_dirs, tmp_path, dialect):
    """What the tensors (and alibaba's partial args) show is reported; what nothing shows is null and listed."""
    from helpers import hf_spec

    ckpt = argsless(hf_dirs, tmp_path / dialect, dialect, tp=2, pp=2, tokenizer=False)
    spec = hf_spec(hf_dirs[HF_OF[dialect]])
    result = cli("inspect", ckpt, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["tp"], report["pp"], report["ckpt_format"]) == (2, 2, "torch")
    assert report["layout"] == {"fork": "llama-fork", "alibaba": "alibaba"}[dialect]
    got = report["spec"]
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "tie_embeddings"):
        assert got[name] == getattr(spec, name), name
    never = ["norm_eps", "rope_theta", "max_position_embeddings", "num_parameters"]
    if dialect == "fork":  # args: None; no tokenizer to count the vocab
        unknown = ["num_heads", "num_kv_heads", "vocab_size"] + never
    else:  # alibaba's args name the heads and the true vocab; the fused q, k, v rows then give the KV heads
        unknown = never
        assert (got["num_heads"], got["num_kv_heads"], got["vocab_size"]) == (
            spec.num_heads, spec.num_kv_heads, spec.vocab_size)
    assert sorted(report["unknown"]) == sorted(unknown)
    assert all(got.get(name) is None for name in unknown) and report["vocab_size"] == got["vocab_size"]
    rows = {"fork": 128, "alibaba": 1}[dialect] * 2  # the dialects' vocab padding (multiple x TP)
    assert report["padded_vocab_size"] == -(-spec.vocab_size // rows) * rows
    assert "--model-config" in " ".join(report["notes"])
    table = cli("inspect", ckpt)
    assert table.exit_code == 0, table.output
    assert "norm_eps=unknown" in table.stdout and "--model-config" in " ".join(table.stdout.split())


def test_model_config_on_inspect_gives_the_whole_spec(hf_dirs, tmp_path):
    from helpers import hf_spec

    ckpt = argsless(hf_dirs, tmp_path / "fork", "fork", tokenizer=False)
    result = cli("inspect", ckpt, "--json", "--model-config", hf_dirs["llama1"])  # a folder holding config.json
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["unknown"] == [] and report["num_parameters"] == hf_spec(hf_dirs["llama1"]).num_parameters()
    assert report["spec"] == json.loads(json.dumps(hf_spec(hf_dirs["llama1"]).to_dict()))


@pytest.mark.slow  # one torchrun launch, 1 process
def test_generate_reads_an_argsless_checkpoint_with_model_config(hf_dirs, tmp_path):
    """Greedy tokens of the fork checkpoint, its architecture from the user's params.json, equal transformers'."""
    from dialect_fixtures import build
    from test_generate import NEW_TOKENS, hf_greedy

    from megallama.generate.driver import Prompt, prompt_ids
    from megallama.sft.tokenizer import load_tokenizer

    ckpt, params = build("fork", hf_dirs["llama1"], tmp_path / "fork", tp=1, pp=1), tmp_path / "params.json"
    shutil.move(ckpt / "params.json", params)  # the user's copy, not in the checkpoint
    answers = tmp_path / "answers.json"
    assert_one_line(cli("generate", "--megatron", ckpt, "--prompt", "hi"), 2, "--model-config")
    result = cli("generate", "--megatron", ckpt, "--model-config", params, "--prompt", "The history of",
                 "--max-new-tokens", NEW_TOKENS, "--json", answers)
    assert result.exit_code == 0, result.output
    (got,) = json.loads(answers.read_text())
    tok = load_tokenizer(ckpt)
    want = hf_greedy(hf_dirs["llama1"], prompt_ids(Prompt("The history of"), tok, chat=False), tok.eos_id)
    assert got["completion_ids"] + ([tok.eos_id] if got["stop"] == "eos" else []) == want


# ---------------------------------------------------------------- 10. a tokenizer type Megatron-LM's tools accept
def megatron_padding(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """megatron/training/tokenizer's vocab_size_with_padding."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_a_checkpoint_without_tokenizer_records_null_tokenizer(hf_dir, tmp_path, fmt):
    """Megatron-LM's tools/checkpoint refuses `tokenizer_type = None`; NullTokenizer with the true vocab is what
    such a checkpoint has, and its V + 1 ids (eod) pad to the rows written."""
    from megallama.formats.base import TOKENIZER_FILES

    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    for name in TOKENIZER_FILES:
        (hf / name).unlink(missing_ok=True)
    out = tmp_path / "meg"
    result = cli("convert", "hf2megatron", "--input-dir", hf, "--output-dir", out, "--ckpt-format", fmt,
                 "--tp", "2")
    assert result.exit_code == 0, result.output
    first = out / "release" / ("common.pt" if fmt == "torch_dist" else "mp_rank_00/model_optim_rng.pt")
    args = torch.load(first, weights_only=False)["args"]
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    assert args.tokenizer_type == "NullTokenizer" and args.vocab_size == vocab and args.tokenizer_model is None
    assert args.padded_vocab_size == megatron_padding(vocab + 1, 2) == megatron_padding(vocab, 2)
    flags = (out / "megatron_args.txt").read_text().splitlines()
    assert "--tokenizer-type NullTokenizer" in flags and f"--vocab-size {vocab}" in flags
    assert "NullTokenizer" in " ".join(result.output.split())


def test_no_tokenizer_type_where_null_tokenizer_would_pad_differently(tmp_path):
    """A vocab that is a multiple of 128 x TP: NullTokenizer's eod would need another 128 rows, so recording it
    would be false; nothing is recorded and the write note says why."""
    from megallama.convert import convert
    from megallama.tiny import PRESETS, make_hf_checkpoint

    hf = make_hf_checkpoint(tmp_path / "hf", PRESETS["llama2"].replace(vocab_size=256), tokenizer=False)
    report = convert(hf, tmp_path / "meg", src_format="hf", dst_format="megatron")
    args = torch.load(tmp_path / "meg" / "release" / "common.pt", weights_only=False)["args"]
    assert args.tokenizer_type is None and args.padded_vocab_size == 256
    assert any("would pad to 384 rows, not 256" in note for note in report.notes), report.notes
