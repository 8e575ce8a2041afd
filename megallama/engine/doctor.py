"""What `megallama doctor` reports: versions, device, backend, and the TP=2 x PP=2 smoke test."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import platform


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _apex() -> str | None:
    """NVIDIA apex is optional and only used when importable (never the unrelated PyPI package `apex`)."""
    try:
        mod = importlib.import_module("apex")
    except Exception:
        return None
    if not hasattr(mod, "amp") and not importlib.util.find_spec("apex.normalization"):
        return "not NVIDIA apex (unrelated PyPI package: uninstall it)"
    return getattr(mod, "__version__", "present")


def environment() -> list[tuple[str, str]]:
    import torch

    from megallama import __version__
    from megallama.engine.runtime import backend, cuda_available

    rows = [
        ("megallama", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("CUDA", f"{torch.version.cuda} ({torch.cuda.device_count()} GPU)" if cuda_available() else "not available"),
        ("megatron-core", _version("megatron-core") or "MISSING"),
        ("transformers", _version("transformers") or "MISSING"),
        ("transformer-engine", _version("transformer-engine") or _version("transformer_engine") or "absent"),
        ("apex", _apex() or "absent (optional)"),
        ("device", torch.cuda.get_device_name(0) if cuda_available() else f"cpu ({torch.get_num_threads()} threads)"),
        ("backend", backend() + ("" if cuda_available() else " (CPU compatibility layer active)")),
    ]
    return rows


def smoke_test(tp: int = 2, pp: int = 2):
    """Run megallama.engine.smoke on TP x PP local ranks; returns the CompletedProcess (captured output)."""
    from megallama.engine.launch import run_torchrun

    return run_torchrun(["-m", "megallama.engine.smoke", "--tp", str(tp), "--pp", str(pp)], nproc=tp * pp, capture=True)
