"""Bad input across every command: exit code, one stderr line, nothing partial, inputs unchanged (issue 13).

One table, run in-process with CliRunner (no case reaches torchrun: every refusal happens before a launch).
Interruptions (SIGINT / SIGTERM / SIGHUP / SIGKILL mid-conversion) run the real CLI in a subprocess whose
tensor writes are slowed down (tests/workers/slow_cli.py), so the signal always lands mid-write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT, SFT_CONFIG, WORKERS, assert_one_line_error, cli

from megallama.convert import convert
from megallama.sft.data import make_learnable_dataset

SLOW_CLI = Path(__file__).parent / "workers" / "slow_cli.py"
BINARY = bytes(range(256)) * 4  # not UTF-8, not JSON, not YAML


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(hf_dirs, tmp_path_factory) -> dict[str, Path]:
    """Valid inputs every case starts from: HF (llama2, llama1), Meta pth, Megatron TP1 x PP1, SFT data."""
    root = tmp_path_factory.mktemp("bad-inputs")
    pth, meg, dist = root / "pth", root / "meg", root / "dist"
    convert(hf_dirs["llama2"], pth, src_format="hf", dst_format="meta")
    convert(pth, meg, src_format="meta", dst_format="megatron", ckpt_format="torch")  # what sft loads
    convert(pth, dist, src_format="meta", dst_format="megatron", ckpt_format="torch_dist")
    return {"root": root, "hf": hf_dirs["llama2"], "hf1": hf_dirs["llama1"], "pth": pth, "meg": meg, "dist": dist,
            "data": make_learnable_dataset(root / "train.jsonl", n=16, seed=0), "cfg": SFT_CONFIG}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots` (hidden ones too) with a hash of its bytes."""
    found = {}
    for root in roots:
        found[str(root)] = "dir" if root.is_dir() else _digest(root) if root.exists() else "absent"
        if root.is_dir():
            for path in root.rglob("*"):
                found[str(path)] = "dir" if path.is_dir() else _digest(path)
    return found


def tree(root: Path) -> dict[str, str]:
    """Relative path -> hash of every file under `root`."""
    return {str(p.relative_to(root)): _digest(p) for p in root.rglob("*") if p.is_file()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def locked():
    """lock(path): make a folder unwritable, even for root (chattr +i); undone after the test."""
    done: list[Path] = []

    def lock(path: Path) -> None:
        if os.geteuid() != 0:
            path.chmod(0o555)
        elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
            pytest.skip("root without chattr: cannot make a folder unwritable here")
        done.append(path)

    yield lock
    for path in done:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


# ---------------------------------------------------------------- setups: build the bad thing inside tmp
def copy_of(key: str, name: str = "in") -> Callable:
    def setup(w, tmp, lock):
        shutil.copytree(w[key], tmp / name)
        return tmp / name

    return setup


DROP = object()  # edit_json(..., key=DROP) removes the key


def edit_json(key: str, file: str, **changes) -> Callable:
    def setup(w, tmp, lock):
        folder = copy_of(key)(w, tmp, lock)
        data = json.loads((folder / file).read_text())
        data.update(changes)
        data = {k: v for k, v in data.items() if v is not DROP}
        (folder / file).write_text(json.dumps(data))

    return setup


def binary_file(key: str, file: str) -> Callable:
    def setup(w, tmp, lock):
        folder = copy_of(key)(w, tmp, lock)
        (folder / file).write_bytes(BINARY)

    return setup


def write(name: str, content: bytes | str = b"") -> Callable:
    def setup(w, tmp, lock):
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def int32_weight(w, tmp, lock):
    from safetensors.torch import load_file, save_file

    folder = copy_of("hf")(w, tmp, lock)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = (tensors[name] * 100).to(dtype=__import__("torch").int32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def tracker(text: bytes, key: str = "meg") -> Callable:
    def setup(w, tmp, lock):
        folder = copy_of(key)(w, tmp, lock)
        (folder / "latest_checkpointed_iteration.txt").write_bytes(text)

    return setup


def fork_without_config(name: str, content: bytes | None) -> Callable:
    """{tmp}/in: a Megatron-LLaMA fork checkpoint (`args: None`) without its params.json; {tmp}/NAME: a file with
    `content`, or an empty folder (content None), given as --model-config."""
    def setup(w, tmp, lock):
        from dialect_fixtures import build

        (build("fork", w["hf1"], tmp / "in", tp=1, pp=1) / "params.json").unlink()
        if content is None:
            (tmp / name).mkdir()
        else:
            write(name, content)(w, tmp, lock)

    return setup


def nonempty_output(w, tmp, lock):
    write("out/keep.txt", "an earlier output")(w, tmp, lock)


def locked_folder(name: str, *, with_file: bool = False) -> Callable:
    def setup(w, tmp, lock):
        (tmp / name).mkdir()
        if with_file:
            (tmp / name / "keep.txt").write_text("an earlier output")
        lock(tmp / name)

    return setup


def both(*setups: Callable) -> Callable:
    def setup(w, tmp, lock):
        for s in setups:
            s(w, tmp, lock)

    return setup


# ---------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    args: str  # split on spaces after formatting: {hf} {hf1} {pth} {meg} {dist} {data} {cfg} {tmp}
    message: str  # expected in the one stderr line (whitespace-normalised)
    code: int = 2
    setup: Callable | None = None


HF2PTH = "convert hf2pth --input-dir {hf} --output-dir {tmp}/out"
PTH2HF = "convert pth2hf --input-dir {pth} --output-dir {tmp}/out"
P2M = "convert pth2megatron --input-dir {pth} --output-dir {tmp}/out"
M2P = "convert megatron2pth --input-dir {meg} --output-dir {tmp}/out"
VERIFY = "verify layer-diff --reference {hf} --megatron {meg}"
SFT = "sft --config {cfg} load={meg} data.train={data} output={tmp}/run --dry-run"

CASES = [
    # usage errors: one line instead of Click's block
    Case("data-prepare-unknown-format", "data prepare --input {data} --format bogus --tokenizer {hf} "
         "--output {tmp}/out/p", "unknown data format 'bogus'"),
    Case("data-prepare-missing-tokenizer", "data prepare --input {data} --format alpaca --tokenizer {tmp}/nope "
         "--output {tmp}/out/p", "does not exist"),
    Case("usage-unknown-command", "nope", "No such command 'nope'"),
    Case("usage-missing-option", "convert hf2pth --input-dir {hf}", "Missing option '--output-dir'"),
    Case("usage-unknown-option", HF2PTH + " --bogus 1", "No such option: --bogus"),
    Case("usage-not-an-int", P2M + " --tp two", "Invalid value for '--tp'"),
    Case("usage-verify-missing", "verify layer-diff --reference {hf}", "Missing option '--megatron'"),
    Case("usage-sft-unknown-option", "sft --config {cfg} --bogus", "No such option: --bogus"),
    Case("usage-doctor-not-an-int", "doctor --tp x", "Invalid value for '--tp'"),
    # input side
    Case("input-missing", "convert hf2pth --input-dir {tmp}/nope --output-dir {tmp}/out", "does not exist"),
    Case("input-is-a-file", "convert hf2pth --input-dir {tmp}/f --output-dir {tmp}/out", "is not a folder",
         setup=write("f", "x")),
    Case("hf-binary-config", "convert hf2pth --input-dir {tmp}/in --output-dir {tmp}/out", "is not valid JSON",
         setup=binary_file("hf", "config.json")),
    Case("hf-string-size", "convert hf2pth --input-dir {tmp}/in --output-dir {tmp}/out",
         "hidden_size is 'big', expected an integer", setup=edit_json("hf", "config.json", hidden_size="big")),
    Case("hf-wrong-layers", "convert hf2pth --input-dir {tmp}/in --output-dir {tmp}/out", "unexpected tensors",
         setup=edit_json("hf", "config.json", num_hidden_layers=3)),
    Case("hf-zero-heads", "convert hf2pth --input-dir {tmp}/in --output-dir {tmp}/out", "positive integers",
         setup=edit_json("hf", "config.json", num_attention_heads=0, head_dim=DROP)),
    Case("input-rich-markup-verbatim", "convert pth2hf --input-dir {tmp}/a[/b]/x[bold] --output-dir {tmp}/out",
         "a[/b]/x[bold] does not exist"),
    Case("hf-int32-weight", "convert hf2pth --input-dir {tmp}/in --output-dir {tmp}/out",
         "model.layers.1.mlp.up_proj.weight", setup=int32_weight),
    Case("hf-bad-dtype", HF2PTH + " --dtype fp8", "unsupported dtype 'fp8'"),
    Case("hf-shards-3", HF2PTH + " --shards 3", "--shards 3 does not divide"),
    Case("pth-string-dim", "convert pth2hf --input-dir {tmp}/in --output-dir {tmp}/out",
         "dim is '64x', expected an integer", setup=edit_json("pth", "params.json", dim="64x")),
    Case("pth-list-eps", "convert pth2hf --input-dir {tmp}/in --output-dir {tmp}/out",
         "norm_eps is [1e-05], expected a number", setup=edit_json("pth", "params.json", norm_eps=[1e-5])),
    Case("pth-binary-params", "convert pth2megatron --input-dir {tmp}/in --output-dir {tmp}/out",
         "is not valid JSON", setup=binary_file("pth", "params.json")),
    Case("pth-no-params", "convert pth2hf --input-dir {tmp}/empty --output-dir {tmp}/out", "params.json",
         setup=lambda w, tmp, lock: (tmp / "empty").mkdir()),
    Case("p2m-tp-3", P2M + " --tp 3", "does not divide"),
    Case("p2m-pp-3", P2M + " --pp 3", "does not divide"),
    Case("p2m-divisible-0", P2M + " --make-vocab-size-divisible-by 0", "must be >= 1"),
    Case("m2p-binary-tracker", "convert megatron2pth --input-dir {tmp}/in --output-dir {tmp}/out",
         "expected 'release' or an iteration number", setup=tracker(BINARY)),
    Case("m2p-word-tracker", "convert megatron2pth --input-dir {tmp}/in --output-dir {tmp}/out",
         "holds 'latest'", setup=tracker(b"latest\n")),
    Case("m2p-tracker-missing-iteration", "convert megatron2pth --input-dir {tmp}/in --output-dir {tmp}/out",
         "which does not exist", setup=tracker(b"7\n")),
    Case("m2p-dist-binary-tracker", "convert megatron2pth --input-dir {tmp}/in --output-dir {tmp}/out",
         "expected 'release' or an iteration number", setup=tracker(BINARY, "dist")),
    Case("m2p-dist-shards-3", "convert megatron2pth --input-dir {dist} --output-dir {tmp}/out --shards 3",
         "--shards 3 does not divide"),
    Case("m2p-pth-as-megatron", "convert megatron2pth --input-dir {pth} --output-dir {tmp}/out",
         "latest_checkpointed_iteration.txt"),
    # output side: refused before any work, with what to do
    Case("out-overlaps-input", "convert hf2pth --input-dir {tmp}/in --output-dir {tmp}/in/sub", "overlap",
         setup=copy_of("hf")),
    Case("out-contains-input", "convert hf2pth --input-dir {tmp}/in --output-dir {tmp} --force", "overlap",
         setup=copy_of("hf")),
    Case("out-not-empty", HF2PTH, "is not empty: pass --force", setup=nonempty_output),
    Case("out-is-a-file", HF2PTH, "exists and is not a folder: pass --force", setup=write("out", "x")),
    Case("out-parent-is-a-file", "convert hf2pth --input-dir {hf} --output-dir {tmp}/f/out",
         "it is a file, not a folder", setup=write("f", "x")),
    Case("out-grandparent-is-a-file", "convert pth2hf --input-dir {pth} --output-dir {tmp}/f/a/b/out",
         "it is a file, not a folder", setup=write("f", "x")),
    Case("out-parent-unwritable", "convert hf2pth --input-dir {hf} --output-dir {tmp}/ro/out",
         "cannot write to", setup=locked_folder("ro")),
    Case("out-missing-under-unwritable", "convert pth2megatron --input-dir {pth} --output-dir {tmp}/ro/a/b",
         "cannot write to", setup=locked_folder("ro")),
    Case("out-empty-unwritable", "convert megatron2pth --input-dir {meg} --output-dir {tmp}/ro",
         "cannot write to", setup=locked_folder("ro")),
    Case("out-force-over-unreplaceable", "convert pth2megatron --input-dir {pth} --output-dir {tmp}/ro --force",
         "cannot replace", setup=locked_folder("ro", with_file=True)),
    # verify
    Case("verify-reference-missing", "verify layer-diff --reference {tmp}/nope --megatron {meg}", "does not exist"),
    Case("verify-reference-is-a-file", "verify layer-diff --reference {tmp}/f --megatron {meg}", "is not a folder",
         setup=write("f", "x")),
    Case("verify-megatron-missing", "verify layer-diff --reference {hf} --megatron {tmp}/nope", "does not exist"),
    Case("verify-seq-len-beyond-max", VERIFY + " --seq-len 100000", "exceeds the model's max_position_embeddings"),
    Case("verify-dist-seq-len-beyond-max", "verify layer-diff --reference {pth} --megatron {dist} --seq-len 5000",
         "--seq-len 5000 exceeds the model's max_position_embeddings 4096"),
    Case("verify-seq-len-1", VERIFY + " --seq-len 1", "--seq-len must be >= 2"),
    Case("verify-bad-dtype", VERIFY + " --dtype fp8", "unsupported dtype 'fp8'"),
    Case("verify-data-missing", VERIFY + " --data {tmp}/nope.txt", "does not exist"),
    Case("verify-other-model", "verify layer-diff --reference {hf1} --megatron {meg}", "different models"),
    Case("verify-model-config-missing", VERIFY + " --model-config {tmp}/no-config", "no-config does not exist"),
    Case("verify-json-is-a-folder", VERIFY + " --json {tmp}", "is a folder"),
    Case("verify-json-parent-is-a-file", VERIFY + " --json {tmp}/f/report.json", "it is a file, not a folder",
         setup=write("f", "x")),
    Case("verify-json-unwritable", VERIFY + " --json {tmp}/ro/report.json", "cannot write to",
         setup=locked_folder("ro")),
    # generate
    Case("generate-missing", "generate --megatron {tmp}/nope --prompt x", "Megatron folder"),
    Case("generate-not-a-checkpoint", "generate --megatron {tmp}/empty --prompt x",
         "has no latest_checkpointed_iteration.txt", setup=lambda w, tmp, lock: (tmp / "empty").mkdir()),
    Case("generate-no-prompt", "generate --megatron {meg}", "give exactly one of --prompt TEXT and --prompts"),
    Case("generate-pp-3", "generate --megatron {meg} --prompt x --pp 3", "PP=3 does not divide the 4 layers"),
    Case("generate-bad-dtype", "generate --megatron {dist} --prompt x --dtype fp8", "unsupported dtype 'fp8'"),
    Case("generate-negative-temperature", "generate --megatron {meg} --prompt x --temperature -1",
         "--temperature must be >= 0"),
    Case("generate-binary-prompts", "generate --megatron {meg} --prompts {tmp}/p.jsonl", "is not UTF-8 text",
         setup=write("p.jsonl", BINARY)),
    Case("generate-model-config-missing", "generate --megatron {meg} --prompt x --model-config {tmp}/no-config",
         "no-config does not exist"),
    Case("generate-model-config-empty-folder", "generate --megatron {tmp}/in --prompt x --model-config {tmp}/empty",
         "holds neither config.json (HF) nor params.json (Meta)", setup=fork_without_config("empty", None)),
    # inspect
    Case("inspect-missing", "inspect {tmp}/nope", "is not a folder"),
    Case("inspect-model-config-missing", "inspect {meg} --model-config {tmp}/no-config", "no-config does not exist"),
    Case("inspect-empty", "inspect {tmp}/empty", "is no checkpoint megallama knows",
         setup=lambda w, tmp, lock: (tmp / "empty").mkdir()),
    Case("inspect-unknown-layout", "inspect {meg} --layout bogus", "unknown Megatron layout 'bogus'"),
    Case("inspect-binary-tracker", "inspect {tmp}/in", "expected 'release' or an iteration number",
         setup=tracker(BINARY)),
    # the other converters
    Case("h2m-tp-3", "convert hf2megatron --input-dir {hf} --output-dir {tmp}/out --tp 3", "TP=3 does not divide"),
    Case("h2m-pp-3", "convert hf2megatron --input-dir {hf} --output-dir {tmp}/out --pp 3", "PP=3 does not divide"),
    Case("h2m-unknown-format", "convert hf2megatron --input-dir {hf} --output-dir {tmp}/out --ckpt-format zip",
         "unknown --ckpt-format 'zip'"),
    Case("h2m-binary-config", "convert hf2megatron --input-dir {tmp}/in --output-dir {tmp}/out", "is not valid JSON",
         setup=binary_file("hf", "config.json")),
    Case("m2h-unknown-layout", "convert megatron2hf --input-dir {meg} --output-dir {tmp}/out --layout bogus",
         "unknown Megatron layout 'bogus'"),
    Case("m2h-dist-bad-dtype", "convert megatron2hf --input-dir {dist} --output-dir {tmp}/out --dtype fp8",
         "unsupported dtype 'fp8'"),
    Case("m2h-binary-tracker", "convert megatron2hf --input-dir {tmp}/in --output-dir {tmp}/out",
         "expected 'release' or an iteration number", setup=tracker(BINARY, "dist")),
    Case("m2m-tp-3", "convert megatron2megatron --input-dir {meg} --output-dir {tmp}/out --tp 3",
         "TP=3 does not divide"),
    Case("m2m-overlap", "convert megatron2megatron --input-dir {tmp}/in --output-dir {tmp}/in/sub", "overlap",
         setup=copy_of("dist")),
    Case("m2m-unknown-format", "convert megatron2megatron --input-dir {dist} --output-dir {tmp}/out --ckpt-format x",
         "unknown --ckpt-format 'x'"),
    Case("m2h-model-config-missing", "convert megatron2hf --input-dir {meg} --output-dir {tmp}/out --model-config "
         "{tmp}/no-config.json", "no-config.json does not exist"),
    Case("m2h-model-config-not-json", "convert megatron2hf --input-dir {tmp}/in --output-dir {tmp}/out "
         "--model-config {tmp}/c.json", "is not valid JSON", setup=fork_without_config("c.json", BINARY)),
    Case("m2m-out-not-empty", "convert megatron2megatron --input-dir {dist} --output-dir {tmp}/out",
         "is not empty: pass --force", setup=nonempty_output),
    # sft (all --dry-run: nothing would start even if a check were missing)
    Case("sft-lr-nan", SFT + " train.lr=nan", "train.lr='nan': expected float (finite)"),
    Case("sft-steps-inf", SFT + " train.steps=inf", "train.steps='inf': expected int (finite)"),
    Case("sft-lr-negative", SFT + " train.lr=-1", "learning rates must satisfy"),
    Case("sft-unknown-key", SFT + " train.lrr=1", "did you mean train.lr"),
    Case("sft-config-missing", "sft --config {tmp}/nope.yaml", "does not exist"),
    Case("sft-binary-config", "sft --config {tmp}/c.yaml", "is not UTF-8 text", setup=write("c.yaml", BINARY)),
    Case("sft-binary-data", "sft --config {cfg} load={meg} data.train={tmp}/d.jsonl output={tmp}/run --dry-run",
         "is not UTF-8 text", setup=write("d.jsonl", BINARY)),
    Case("sft-binary-tracker", "sft --config {cfg} load={tmp}/in data.train={data} output={tmp}/run --dry-run",
         "expected an iteration number or 'release'", setup=tracker(BINARY)),
    Case("sft-tp-mismatch", SFT + " --tp 2", "is split for TP=1 PP=1"),
    Case("sft-model-config-missing", SFT + " load_model_config={tmp}/no-config", "no-config does not exist"),
    Case("sft-weights-only-nothing-to-resume", SFT + " --resume-weights-only", "holds no checkpoint yet"),
    Case("sft-output-parent-is-a-file", "sft --config {cfg} load={meg} data.train={data} output={tmp}/f/run "
         "--dry-run", "it is a file, not a folder", setup=write("f", "x")),
    Case("sft-output-unwritable", "sft --config {cfg} load={meg} data.train={data} output={tmp}/ro/run --dry-run",
         "cannot write to", setup=locked_folder("ro")),
]


@pytest.fixture
def no_launch(monkeypatch) -> list:
    """Refused before any work: a torchrun launch (verify, generate, sft) is recorded and fails the test."""
    launches: list = []

    def launcher(*args, **kwargs):
        launches.append(args)
        raise AssertionError(f"a refusal started torchrun: {args}")

    monkeypatch.setattr("megallama.engine.launch.run_torchrun", launcher)
    monkeypatch.setattr("megallama.engine.launch.stream_torchrun", launcher)
    return launches


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, tmp_path, locked, no_launch):
    if case.setup is not None:
        case.setup(world, tmp_path, locked)
    paths = {k: v for k, v in world.items() if k != "root"}
    args = case.args.format(tmp=tmp_path, **paths).split()
    inputs = [world["hf"], world["hf1"], world["pth"], world["meg"], world["dist"], world["data"], tmp_path]
    before = snapshot(*inputs)
    beside = sorted(os.listdir(world["root"]))

    result = cli(*args)

    lines = result.stderr.strip().splitlines()
    assert result.exit_code == case.code, result.output
    assert len(lines) == 1, result.stderr
    assert case.message in " ".join(lines[0].split()), result.stderr
    assert result.stdout == "", result.stdout
    assert snapshot(*inputs) == before  # inputs unchanged, nothing written, no staging left behind
    assert sorted(os.listdir(world["root"])) == beside
    assert no_launch == []


def test_the_table_covers_every_command():
    """Every command the CLI has (walked from the Typer app, so a new command needs its rows here)."""
    from megallama.cli import app

    groups = {g.name: g.typer_instance for g in app.registered_groups}
    every = {c.name for c in app.registered_commands} | \
        {f"{name} {c.name}" for name, group in groups.items() for c in group.registered_commands}
    words = [c.args.split() for c in CASES]
    covered = {" ".join(w[:2]) if w[0] in groups else w[0] for w in words}
    assert every <= covered, f"commands without a bad-input row: {sorted(every - covered)}"
    assert "nope" in covered and len(CASES) >= 70


# ---------------------------------------------------------------- failures in the middle of a write
class FailingWrite:
    """on_tensor callback that raises `error` after `after` tensors were written (a bug injected mid-write)."""

    def __init__(self, after: int, error: BaseException):
        self.after, self.error, self.calls = after, error, 0

    @contextlib.contextmanager
    def progress(self, title, total_bytes=None):
        def on_tensor(name, nbytes):
            self.calls += 1
            if self.calls > self.after:
                raise self.error

        on_tensor.set_total = lambda nbytes: None
        yield on_tensor


@pytest.mark.parametrize("command, source, error, code, message", [  # injected bugs; real disk errors below
    ("pth2megatron", "pth", RuntimeError("injected bug"), 3, "internal error: RuntimeError: injected bug"),
    ("hf2pth", "hf", MemoryError(), 3, "internal error: MemoryError"),
])
def test_failed_force_run_keeps_the_old_output(world, tmp_path, monkeypatch, command, source, error, code, message):
    import megallama.cli.convert as cli_convert

    out = tmp_path / "out"
    shutil.copytree(world["pth"], out)  # an earlier, complete output
    before = snapshot(tmp_path, world[source])
    failing = FailingWrite(after=3, error=error)
    monkeypatch.setattr(cli_convert, "byte_progress", failing.progress)
    result = cli("convert", command, "--input-dir", str(world[source]), "--output-dir", str(out),
                 "--force")
    assert result.exit_code == code, result.output
    assert failing.calls == 4  # it did fail mid-write, after three tensors
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path, world[source]) == before


def limited_file_size(limit: int) -> Callable[[], None]:
    """preexec_fn: files this process writes may not grow past `limit` bytes; write() then fails with EFBIG
    (SIGXFSZ, which would kill the process instead, is ignored): a real failed write inside torch.save."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow  # a subprocess CLI: ~5 s
@pytest.mark.parametrize("command, source", [("pth2megatron", "pth"), ("megatron2pth", "meg")])
def test_file_size_limit_mid_write_keeps_the_old_output(world, tmp_path, command, source):
    out = tmp_path / "out"
    shutil.copytree(world["pth"], out)  # an earlier, complete output
    before = snapshot(tmp_path, world[source])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MEGALLAMA_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "megallama", "convert", command, "--input-dir", str(world[source]),
                           "--output-dir", str(out), "--force"], capture_output=True, text=True, env=env,
                          timeout=300, preexec_fn=limited_file_size(64 << 10))  # files are ~0.8 MB
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "File too large" in lines[0], proc.stderr
    assert snapshot(tmp_path, world[source]) == before  # old output intact, no staging left


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1.5x the Meta pth fixture's size, mounted for the test (needs root and mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_mid_write_keeps_the_old_output(world, small_disk):
    """ENOSPC from the kernel, part-way through the new output: exit 2, one line, the old output untouched."""
    out = small_disk / "out"
    shutil.copytree(world["pth"], out)  # ~0.8 MB of 1.5: the new copy cannot fit beside it
    before = snapshot(small_disk)
    result = cli("convert", "hf2pth", "--input-dir", world["hf"], "--output-dir", out, "--force")
    assert_one_line_error(result, "No space left on device")
    assert snapshot(small_disk) == before


def test_existing_empty_folder_is_written_into(world, tmp_path):
    out = tmp_path / "mount"  # stands for a mount point: the folder itself is kept, never renamed
    out.mkdir()
    inode = out.stat().st_ino
    result = cli("convert", "pth2hf", "--input-dir", str(world["pth"]), "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    assert out.stat().st_ino == inode
    assert (out / "config.json").is_file() and (out / "megallama.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(os.listdir(tmp_path)) == ["mount"]


def test_replacing_an_output_file_with_force_leaves_nothing_behind(world, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    result = cli("convert", "hf2pth", "--input-dir", world["hf"], "--output-dir", target, "--force")
    assert result.exit_code == 0, result.output
    assert (target / "params.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- interruptions (real processes)
def start_slow(args: list[str], delay: float = 0.5) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(SLOW_CLI), str(delay), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_staging(folder: Path, proc: subprocess.Popen, pattern: str = ".out.tmp-*") -> None:
    """Until the staging folder exists, plus one slowed tensor: the conversion is mid-write."""
    deadline = time.monotonic() + 120
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()


@pytest.mark.parametrize("sig, command, source", [
    (signal.SIGTERM, "hf2pth", "hf"),
    (signal.SIGINT, "pth2megatron", "pth"),
    (signal.SIGHUP, "megatron2pth", "meg"),
])
@pytest.mark.slow
def test_signal_mid_conversion_leaves_nothing(world, tmp_path, sig, command, source):
    out = tmp_path / "out"
    before = snapshot(world[source])
    proc = start_slow(["convert", command, "--input-dir", str(world[source]), "--output-dir", str(out)])
    wait_for_staging(tmp_path, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip().splitlines() == [f"error: interrupted by {sig.name}"]
    assert os.listdir(tmp_path) == []  # neither the output nor its staging folder
    assert snapshot(world[source]) == before


@pytest.mark.slow
def test_sigkill_leftovers_are_removed_by_the_next_run(world, tmp_path):
    out = tmp_path / "out"
    proc = start_slow(["convert", "hf2pth", "--input-dir", str(world["hf"]), "--output-dir", str(out)])
    wait_for_staging(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    stale = tmp_path / f".out.tmp-{proc.pid}"
    assert stale.is_dir()  # what a SIGKILL leaves: the dead process's staging folder
    result = cli("convert", "hf2pth", "--input-dir", str(world["hf"]), "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    flat = "".join(result.stdout.replace("│", "").split())  # the note, unwrapped from the summary table
    assert f"removed{stale}leftbyprocess{proc.pid},whichisnolongerrunning" in flat, result.stdout
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_killed_between_the_two_renames_restores_the_previous_output(world, tmp_path):
    from megallama.staging import remove_stale_staging

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    shutil.copytree(world["pth"], tmp_path / f".out.old-{dead}")  # the old output, moved aside
    (tmp_path / f".out.tmp-{dead}").mkdir()  # and the new one, not yet renamed
    notes = remove_stale_staging(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert tree(out) == tree(world["pth"])
    assert any("restored the previous output" in n for n in notes) and len(notes) == 2


# ---------------------------------------------------------------- internal errors: exit 3, not 1 (a FAIL verdict)
def test_crashed_verify_worker_exits_3(world, monkeypatch):
    import megallama.engine.launch

    def crashed(target, *, nproc, on_line, extra=None, keep=40):
        return -9, ["Killed"]

    monkeypatch.setattr(megallama.engine.launch, "stream_torchrun", crashed)
    result = cli("verify", "layer-diff", "--reference", str(world["hf"]), "--megatron",
                 str(world["meg"]))
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines()[-1] == "error: Megatron workers (TP=1, PP=1) exited with -9: Killed"
    assert "Traceback" not in result.output


@pytest.fixture
def faulty_workers(monkeypatch):
    """fault(kind): torchrun ranks started from now on really fail (tests/workers/fault_hook/sitecustomize.py)."""
    def fault(kind: str) -> None:
        path = os.pathsep.join([str(WORKERS / "fault_hook"), str(ROOT), os.environ.get("PYTHONPATH", "")])
        monkeypatch.setenv("PYTHONPATH", path)
        monkeypatch.setenv("MEGALLAMA_TEST_FAULT", kind)

    return fault


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True])
def test_verify_worker_that_really_crashes_exits_3(world, faulty_workers, monkeypatch, debug):
    faulty_workers("crash")
    if debug:
        monkeypatch.setenv("MEGALLAMA_DEBUG", "1")
    else:
        monkeypatch.delenv("MEGALLAMA_DEBUG", raising=False)
    result = cli("verify", "layer-diff", "--reference", world["hf"], "--megatron", world["meg"])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: RuntimeError: injected crash in a torchrun worker", result.stderr
    if debug:  # the worker's own traceback, down to where it broke
        assert "Traceback (most recent call last)" in result.stderr and "build_gpt_model" in result.stderr
    else:  # progress lines, then the one error line
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_sft_worker_that_really_crashes_exits_3(world, faulty_workers, tmp_path, capfd):
    faulty_workers("crash")
    result = cli("sft", "--config", SFT_CONFIG, f"load={world['meg']}", f"data.train={world['data']}",
                 f"output={tmp_path / 'run'}", "train.steps=1", "train.warmup_steps=0")
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines()[-1] == ("error: sft workers failed (exit code 1); see the log above")
    log = capfd.readouterr().err  # the ranks write to the terminal: their traceback is the log above
    assert "Traceback (most recent call last)" in log and "RuntimeError: injected crash in a torchrun worker" in log


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # an unreaped zombie has stopped too


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_sigterm_stops_the_torchrun_ranks_too(tmp_path):
    """A SIGTERM to megallama (not to its process group) must not leave verify / sft / doctor ranks running."""
    rank = tmp_path / "sleepy_rank.py"
    rank.write_text(f"import os, time\nopen({str(tmp_path)!r} + f'/rank-{{os.getpid()}}', 'w').close()\n"
                    "time.sleep(120)\n")
    driver = ("from megallama.cli.common import stop_signals_interrupt\n"
              "from megallama.engine.launch import run_torchrun\n"
              f"with stop_signals_interrupt():\n    run_torchrun([{str(rank)!r}], nproc=2)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "driver.log").open("w")  # not a pipe: orphaned ranks would hold it open
    proc = subprocess.Popen([sys.executable, "-c", driver], env=env, stdout=log, stderr=log)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(ranks := [int(p.name[5:]) for p in tmp_path.glob("rank-*")]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()
            time.sleep(0.1)
        assert all(alive(pid) for pid in ranks)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in ranks), "torchrun's ranks outlived megallama"
    finally:
        for pid in ranks:  # never leave them to the rest of the test session
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        log.close()
