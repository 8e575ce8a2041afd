"""Hub ids wherever a folder is taken: resolved offline from an HF cache folder the test builds (the layout
huggingface_hub writes: models--OWNER--NAME/refs/main -> snapshots/<commit>/...), and the one-line refusals."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from helpers import cli

from megallama.errors import InputError
from megallama.hub import looks_like_hub_id, resolve_model_path

MAIN, OLD = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(hf_dir, tmp_path, monkeypatch):
    """HF_HOME with `test-org/tiny-llama` cached at two commits (main and an older one without tokenizer)."""
    home = tmp_path / "hf-home"
    repo = home / "hub" / "models--test-org--tiny-llama"
    for commit in (MAIN, OLD):
        shutil.copytree(hf_dir, repo / "snapshots" / commit)
    (repo / "snapshots" / OLD / "tokenizer.model").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize(("arg", "expected"), [("meta-llama/Llama-2-7b-hf", True), ("owner/name.v2", True),
                                               ("./runs/x", False), ("/abs/x", False), ("a/b/c", False),
                                               ("name", False), ("runs/", False)])
def test_hub_id_shape(arg, expected):
    assert looks_like_hub_id(arg) is expected


def test_local_paths_come_back_unchanged(hf_dir, tmp_path):
    assert resolve_model_path(hf_dir) == hf_dir
    assert resolve_model_path(tmp_path / "missing") == tmp_path / "missing"  # its reader says "does not exist"
    with pytest.raises(InputError, match="--revision v1 applies to Hub ids"):
        resolve_model_path(hf_dir, revision="v1")


def test_resolves_from_the_cache_offline(hub_cache):
    assert resolve_model_path("test-org/tiny-llama") == hub_cache / "snapshots" / MAIN
    old = resolve_model_path("test-org/tiny-llama", revision=OLD)
    assert old == hub_cache / "snapshots" / OLD and not (old / "tokenizer.model").exists()


def test_convert_takes_a_hub_id(hub_cache, hf_dir, tmp_path):
    out = tmp_path / "pth"
    result = cli("convert", "hf2pth", "--input-dir", "test-org/tiny-llama",
                 "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "consolidated.00.pth").is_file() and (out / "tokenizer.model").is_file()


def test_inspect_and_hf2megatron_take_a_hub_id(hub_cache, tmp_path):
    import json

    result = cli("inspect", "test-org/tiny-llama", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "hf"
    out = tmp_path / "meg"
    result = cli("convert", "hf2megatron", "--input-dir", "test-org/tiny-llama",
                 "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"


@pytest.mark.parametrize("command", [
    ["convert", "hf2pth", "--input-dir", "test-org/missing", "--output-dir", "{out}"],
    ["verify", "layer-diff", "--reference", "test-org/missing", "--megatron", "{out}"],
    ["inspect", "test-org/missing"],
])
def test_missing_repo_offline_exits_2_with_one_line(hub_cache, tmp_path, command):
    out = tmp_path / "out"
    result = cli(*[a.format(out=out) for a in command])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0
    assert ("error: test-org/missing is not a local folder and cannot be fetched from the Hub: test-org/missing "
            "is not in the HF cache and HF_HUB_OFFLINE is set") in " ".join(result.output.split())
    assert not out.exists()


def test_no_network_exits_2_unless_cached(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(InputError, match="test-org/missing is not in the HF cache and the Hub cannot be reached"):
        resolve_model_path("test-org/missing")
    # huggingface_hub falls back to the cache when the Hub is unreachable
    assert resolve_model_path("test-org/tiny-llama") == Path(hub_cache / "snapshots" / MAIN)


def test_model_config_takes_a_hub_id(hub_cache, hf_dir, tmp_path):
    """--model-config owner/name: the repo's config.json from the cache (only config files are fetched)."""
    import json

    from dialect_fixtures import build
    from helpers import assert_one_line_error, hf_spec

    ckpt = build("alibaba", hf_dir, tmp_path / "alibaba", tp=1, pp=1)  # its args lack norm eps and rope theta
    (ckpt / "config.json").unlink()
    result = cli("inspect", ckpt, "--json", "--model-config", "test-org/tiny-llama")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["unknown"] == [] and report["spec"] == json.loads(json.dumps(hf_spec(hf_dir).to_dict()))
    assert_one_line_error(cli("inspect", ckpt, "--model-config", "test-org/no-such-model"),
                          "test-org/no-such-model is not a local folder and cannot be fetched from the Hub")
