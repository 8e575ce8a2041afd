"""Hub ids wherever a folder is taken: resolved offline from an HF cache folder the test builds (the layout
huggingface_hub writes: models--OWNER--NAME/refs/main -> snapshots/<commit>/...), and the one-line refusals."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from helpers import cli

from megallama.errors import InputError
from megallama.hub import FALLBACK_WEIGHTS, MODEL_FILES, looks_like_hub_id, resolve_model_path

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


# ---------------------------------------------------------------- what is fetched: allow-patterns and the .bin fallback
class FakeHub:
    """`snapshot_download` over local "remote" repos (owner/name -> folder): the files it fetches are chosen by
    huggingface_hub's own `filter_repo_objects`, which the real snapshot_download applies to the repo's file list,
    and copied into a snapshot folder; every call's patterns are recorded."""

    def __init__(self, remotes: dict[str, Path], cache: Path):
        self.remotes, self.cache, self.calls = remotes, cache, []

    def __call__(self, repo_id, *, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append({"allow_patterns": allow_patterns, "ignore_patterns": ignore_patterns, **kwargs})
        remote = self.remotes[repo_id]
        files = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / MAIN
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(remote / name, snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    def fetched(self, repo_id: str) -> set[str]:
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / MAIN
        return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}


NOT_NEEDED = {"README.md": b"# model card", ".gitattributes": b"*.bin filter=lfs", "assets/logo.png": b"\x89PNG",
              "training_args.bin": b"x", "original/consolidated.00.pth": b"x", "onnx/model.onnx": b"x"}


@pytest.fixture
def fake_hub(hf_dir, tmp_path, monkeypatch):
    """Three remote repos of the tiny model, laid out as Hub repos are: safetensors beside the files a model card
    and other formats bring; pytorch_model*.bin shards only (with their index); and Mistral's layout, whose
    consolidated.safetensors holds the whole model again in Mistral's own format."""
    import huggingface_hub
    import torch
    from helpers import hf_tensors

    remotes = {name: tmp_path / "remote" / name for name in ("org/st", "org/bin", "org/mistral")}
    tensors = hf_tensors(hf_dir)
    for remote in remotes.values():
        shutil.copytree(hf_dir, remote)
        for extra, data in NOT_NEEDED.items():
            (remote / extra).parent.mkdir(parents=True, exist_ok=True)
            (remote / extra).write_bytes(data)
    torch.save(tensors, remotes["org/st"] / "pytorch_model.bin")  # the other format of the same weights
    (remotes["org/bin"] / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        torch.save({k: tensors[k] for k in keys}, remotes["org/bin"] / file)
    (remotes["org/bin"] / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    shutil.copy2(remotes["org/mistral"] / "model.safetensors", remotes["org/mistral"] / "consolidated.safetensors")
    hub = FakeHub(remotes, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    return hub


MODEL = {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"}


def test_safetensors_repo_fetches_only_what_a_checkpoint_needs(fake_hub, tmp_path):
    """One snapshot_download call; the weights come as safetensors only (no .bin twin, no Meta original/, no
    model card, images or ONNX), and the folder converts."""
    out = tmp_path / "pth"
    result = cli("convert", "hf2pth", "--input-dir", "org/st", "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert fake_hub.fetched("org/st") == MODEL | {"model.safetensors"}
    assert len(fake_hub.calls) == 1 and "pytorch_model*.bin" not in fake_hub.calls[0]["allow_patterns"]
    assert (out / "consolidated.00.pth").is_file()


def test_bin_only_repo_falls_back_to_its_pytorch_model_shards(fake_hub, tmp_path):
    """No safetensors in the repo: a second call adds the other weight formats; only the model's .bin shards and
    their index come (not training_args.bin), and hf2megatron reads them."""
    out = tmp_path / "meg"
    result = cli("convert", "hf2megatron", "--input-dir", "org/bin", "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert [c["allow_patterns"] for c in fake_hub.calls] == [MODEL_FILES, MODEL_FILES + FALLBACK_WEIGHTS]
    assert fake_hub.fetched("org/bin") == MODEL | {"pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                                                   "pytorch_model-00002-of-00002.bin"}
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_mistral_consolidated_copy_is_not_fetched(fake_hub, tmp_path):
    """Mistral's repos hold the model twice (HF shards and consolidated.safetensors); only the HF copy is fetched."""
    result = cli("inspect", "org/mistral", "--json")
    assert result.exit_code == 0, result.output
    assert fake_hub.fetched("org/mistral") == MODEL | {"model.safetensors"}
    assert json.loads(result.stdout)["format"] == "hf"


def test_bin_only_repo_from_the_offline_cache(hub_cache, tmp_path):
    """The same fallback from a real HF cache (huggingface_hub, HF_HUB_OFFLINE=1) holding a .bin-only snapshot."""
    import torch
    from helpers import hf_tensors

    snapshot = hub_cache / "snapshots" / MAIN
    torch.save(hf_tensors(snapshot), snapshot / "pytorch_model.bin")
    (snapshot / "model.safetensors").unlink()
    out = tmp_path / "pth"
    result = cli("convert", "hf2pth", "--input-dir", "test-org/tiny-llama", "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert (out / "consolidated.00.pth").is_file()
