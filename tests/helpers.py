"""What many test files share: an HF folder's tensors, the CLI runner, the one-line refusal, spec builders,
and the tolerance table every parity test is judged by."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from megallama.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
SFT_CONFIG = ROOT / "configs" / "sft" / "tiny-cpu.yaml"
WORKERS = Path(__file__).resolve().parent / "workers"
# What real third-party converters wrote for a committed tiny model (its README and make.py tell how).
THIRD_PARTY = Path(__file__).resolve().parent / "fixtures" / "third_party"

# ---------------------------------------------------------------- tolerances: claimed level, measured value, why
# One table: a test checks the level the docs claim, never a looser one. `measured` is the worst value seen on
# the tiny fixtures (fp32, CPU, every TP x PP the tests run); each limit keeps the headroom its comment states.
TOLERANCES = {
    # verify layer-diff's own limits live in megallama.verify.layer_diff.TOLERANCES (fp32: 1e-5 relative per point,
    # 1e-5 nats of loss). docs/verify.md claims correct conversions sit >= 8x below them, every point and the
    # loss; the tests check exactly that. Measured on the fixtures: see docs/testing.md.
    "verify_headroom": 8,
    # SFT: per-step loss / grad norm / eval loss of every layout vs TP1 x PP1 (6 steps, tests/test_sft.py).
    # Measured worst relative: TP2xPP2 2.1e-7, +SP 2.5e-7, packed 1.6e-7, DP2 5.3e-8, micro 8 1.3e-7, resumed at
    # another TP x PP 1.3e-7. Checked at 2e-6 (8x above); a wrong normalisation is 2.5e-2 off.
    "sft_layout_rel": 2e-6,
    # SFT step 1 (unchanged weights) vs transformers: masked token loss measured 5.7e-8, grad norm of the per-token
    # loss 1.1e-7 (docs/performance.md). Checked at 1e-6 (9x above); the negative controls sit at >= 2.5e-2.
    "sft_vs_transformers_rel": 1e-6,
    # Megatron forward (strict load, any TP x PP) vs transformers, fp32 logits: measured <= 5e-6 absolute.
    "forward_abs": 1e-5,
    # attention: local (baddbmm) vs SDPA, packed vs separate, per tensor (logits and every gradient), relative to
    # that tensor's own max |value|: measured 4.6e-7 (gradients), 3.1e-7 (logits) at TP1 x PP1 and TP2 x PP2.
    # The negative control, a 10 % error in the smallest gradient, reads 1e-1 per tensor; one global maximum
    # would have read it as 5.5e-4 (that gradient is 1/200 of the largest), so a 0.2 % error would hide there.
    "attention_rel": 1e-5,
}


# ---------------------------------------------------------------- tensors and specs
def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (all its safetensors shards)."""
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def hf_spec(folder: Path) -> ModelSpec:
    return ModelSpec.from_hf_config(json.loads((Path(folder) / "config.json").read_text()))


def hf_model(folder: Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    return hf_spec(folder), hf_tensors(folder)


def small_spec(**changes) -> ModelSpec:
    """A GQA model small enough to build by hand: 4 layers, 4 heads in 2 KV groups, head_dim 16."""
    return ModelSpec(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=176,
                     vocab_size=128).replace(**changes)


# The head counts of the big models (queries per KV head: 4, 8, 16), on a tiny head_dim so they cost nothing.
BIG_HEADS = {  # name: (num_heads, num_kv_heads, num_layers)
    "llama3-8b": (32, 8, 32),
    "llama3-70b": (64, 8, 80),
    "llama3-405b": (128, 8, 126),
}


def big_shaped_spec(name: str, *, head_dim: int = 2, layers: int | None = None) -> ModelSpec:
    """The attention shape of a real Llama 3 model (its head and KV-head counts) on a tiny head_dim."""
    heads, kv, n_layers = BIG_HEADS[name]
    return ModelSpec(hidden_size=heads * head_dim, num_layers=layers or n_layers, num_heads=heads, num_kv_heads=kv,
                     ffn_hidden_size=8, vocab_size=16, rope_theta=500000.0)


# ---------------------------------------------------------------- the CLI
def cli(*args, **kwargs):
    """Runs `megallama ARGS...` in-process; every argument goes through str()."""
    from typer.testing import CliRunner

    from megallama.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def assert_one_line_error(result, message: str, code: int = 2, *, absent: Path | None = None) -> str:
    """The refusal contract: exit `code`, one stderr line `error: ...` holding `message` (whitespace-normalised),
    no traceback; with `absent`, that output does not exist and no staging folder of it was left beside it."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = " ".join(lines[0].split())
    assert line.startswith("error:") and message in line, result.stderr
    assert "Traceback" not in result.output
    if absent is not None:
        assert not absent.exists()
        assert not [p for p in absent.parent.iterdir() if p.name.startswith(f".{absent.name}.")]
    return line
