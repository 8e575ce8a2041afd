"""HF Hub ids wherever a model folder is taken: `meta-llama/Llama-2-7b-hf` works like a local folder.

An argument that is not an existing path and looks like `owner/name` is fetched with huggingface_hub's
`snapshot_download` (only weights, configs and tokenizer files; README, images, the other weight format and
Mistral's consolidated.safetensors copy are skipped) into the usual HF cache, and the snapshot folder is returned.
The environment is read at call time: HF_HOME / HF_HUB_CACHE pick the cache, HF_TOKEN authenticates gated repos,
HF_HUB_OFFLINE=1 uses the cache only, HF_ENDPOINT names a mirror.

Example:
    resolve_model_path("meta-llama/Llama-2-7b-hf")            # ~/.cache/huggingface/hub/models--.../snapshots/<sha>
    resolve_model_path("runs/llama-7b-tp2")                   # an existing folder comes back unchanged
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from megallama.errors import InputError

# owner/name as the Hub spells them (letters, digits, - _ .); no leading "." or "/" so relative paths stay paths
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a checkpoint needs: configs (config.json, params.json, *.index.json, tokenizer_config.json ...), the
# safetensors weights, and the tokenizer. Other weight files only when the repo has no safetensors.
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja"]
FALLBACK_WEIGHTS = ["pytorch_model*.bin", "consolidated.*.pth", "latest_checkpointed_iteration.txt",
                    "*/mp_rank_*/*.pt", "*.distcp", "*/.metadata", "*/common.pt", "*/metadata.json"]
# Never needed: Mistral's repos carry a second copy of the whole model in its own format (consolidated.safetensors,
# which no reader here takes) beside the HF shards; "*.safetensors" alone would fetch it, doubling the download.
SKIPPED_FILES = ["consolidated*.safetensors"]
_TRUE = ("1", "on", "yes", "true")


def looks_like_hub_id(arg: str) -> bool:
    return bool(HUB_ID.match(str(arg))) and not str(arg).endswith((".", "-"))


def resolve_model_path(arg: str | Path, revision: str | None = None) -> Path:
    """A local folder for `arg`: the path itself when it exists (or is not a Hub id), else a Hub snapshot.

    Raises InputError (exit 2, one line) when the repo or revision does not exist, access is refused, or the
    Hub cannot be reached and the cache does not hold the snapshot.
    """
    path = Path(arg).expanduser()
    if path.exists() or not looks_like_hub_id(str(arg)):
        if revision is not None:
            raise InputError(f"--revision {revision} applies to Hub ids, but {arg} is a local path")
        return path
    folder = _download(str(arg), revision, MODEL_FILES)
    if not any(folder.glob("*.safetensors")):
        folder = _download(str(arg), revision, MODEL_FILES + FALLBACK_WEIGHTS)
    return folder


CONFIG_FILES = ["config.json", "params.json"]  # what --model-config reads from a Hub repo: no weights


def resolve_model_config(arg: str | Path | None, name: str = "--model-config") -> Path | None:
    """--model-config (sft: `name` load_model_config) as a local path: the path itself when it exists, else the Hub
    snapshot folder of the repo's config.json / params.json only (no weights). InputError (one line) for a path
    that does not exist or a repo the Hub cannot give."""
    if arg is None:
        return None
    path = Path(arg).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(str(arg)):
        raise InputError(f"{name} {arg} does not exist")
    return _download(str(arg), None, CONFIG_FILES)


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    env = os.environ
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    cache = env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]).expanduser() / "hub") if env.get("HF_HOME")
                                        else None)
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                      allow_patterns=patterns, ignore_patterns=SKIPPED_FILES,
                                      token=env.get("HF_TOKEN") or None, endpoint=env.get("HF_ENDPOINT") or None))
    except Exception as e:  # huggingface_hub raises a dozen types (HTTP, connection, cache); one line for each
        raise InputError(f"{repo_id} is not a local folder and cannot be fetched from the Hub: "
                         f"{_reason(e, where, offline)}") from None


def _reason(error: Exception, where: str, offline: bool) -> str:
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return f"{where} is gated: accept its licence on huggingface.co and set HF_TOKEN"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"no model repo {where} (or it is private: set HF_TOKEN)"
    if isinstance(error, errors.RevisionNotFoundError):
        return f"no revision {where}"
    if isinstance(error, errors.LocalEntryNotFoundError) or offline:
        return (f"{where} is not in the HF cache and " + ("HF_HUB_OFFLINE is set" if offline else
                                                          "the Hub cannot be reached"))
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"[:300]
