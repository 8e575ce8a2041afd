"""The SDPA core attention (megallama.engine.attention) against megatron-core's local DotProductAttention, and the
choice of core attention (`train.attention`).

One torchrun launch (4 ranks) runs tests/workers/attention_parity.py at TP1 x PP1 (4 replicas) and TP2 x PP2:
logits and every gradient of SDPA equal the local attention's within fp32 rounding, tensor by tensor, the state
dict keys are the same, and a packed thd micro-batch equals its samples run one by one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import TOLERANCES

from megallama.engine.launch import run_torchrun
from megallama.engine.model import ATTENTIONS, check_attention
from megallama.engine.runtime import cuda_available
from megallama.errors import InputError

WORKER = Path(__file__).parent / "workers" / "attention_parity.py"
# fp32 rounding, per tensor against its own scale: the fused softmax and the unfused baddbmm + softmax round
# differently, a few units in the last place per op, carried through four layers and the backward; a wrong mask
# or GQA grouping is off by O(1). See TOLERANCES in tests/helpers.py.
RELATIVE = TOLERANCES["attention_rel"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("attention")
    job = root / "job.json"
    job.write_text(json.dumps({"cases": [[1, 1], [2, 2]], "result": str(root / "result.json")}))
    proc = run_torchrun([str(WORKER), str(job)], nproc=4, capture=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((root / "result.json").read_text())
    print(json.dumps(results))  # the measured values, for the tolerance table (pytest -s)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
@pytest.mark.parametrize("check", ["local_vs_sdpa", "packed_vs_separate"])
def test_sdpa_matches_local_attention(parity, tp, pp, check):
    (result,) = [r for r in parity if (r["tp"], r["pp"], r["check"]) == (tp, pp, check)]
    assert result["same_keys"], result
    for what in ("logits", "grads"):
        worst, smallest = result[what]
        assert smallest > 0, result  # every tensor compared had real values
        assert worst <= RELATIVE, (what, result)
    if check == "local_vs_sdpa":
        # negative control on the real gradients: the smallest gradient 10 % off must fail the per-tensor check
        per_tensor, _global = result["control"]
        assert per_tensor == pytest.approx(0.1, rel=1e-3) and per_tensor > RELATIVE, result


def test_attention_choices_and_refusals():
    from megallama.sft.config import load_config, validate

    assert ATTENTIONS == ("sdpa", "local", "te")
    for name in ("sdpa", "local"):
        check_attention(name)
    with pytest.raises(InputError, match="expected one of sdpa, local, te"):
        check_attention("flash")
    if not cuda_available() or importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(InputError, match="attention te needs a CUDA GPU with Transformer Engine"):
            check_attention("te")
        with pytest.raises(InputError, match="attention te needs a CUDA GPU"):  # refused before any launch
            validate(load_config(None, ["train.attention=te"]))
