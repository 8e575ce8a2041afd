"""The CPU compatibility layer changes nothing outside megatron-core's CUDA plumbing (issue 13, item 5)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from megallama.engine.runtime import cuda_available

pytestmark = pytest.mark.skipif(cuda_available(), reason="the bridge is applied only when CUDA is absent")

# Applies the bridge *before* the first transformers model is built (that order left rotary inv_freq as
# uninitialised memory when torch.tensor itself was replaced), then saves the model's logits and buffers.
AFTER_BRIDGE = textwrap.dedent("""
    import sys, torch
    from megallama.engine.runtime import apply_cpu_compat
    factories = {n: getattr(torch, n) for n in ("tensor", "zeros", "empty", "arange")}
    type_name = torch.ones(1).type()
    apply_cpu_compat()
    assert all(getattr(torch, n) is f for n, f in factories.items()), "torch's factories were replaced"
    assert torch.ones(1).type() == type_name == "torch.FloatTensor"
    import megatron.core.pipeline_parallel.schedules as schedules  # imported after the bridge: redirected
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    from transformers import LlamaForCausalLM
    saved = {}
    for path in sys.argv[2:]:
        model = LlamaForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            saved[path] = {"logits": model(torch.arange(24).view(2, 12)).logits,
                           "inv_freq": model.model.rotary_emb.inv_freq}
    torch.save(saved, sys.argv[1])
""")


@pytest.mark.slow  # a subprocess that imports megatron-core and transformers: ~20 s
def test_hf_models_built_after_the_bridge_equal_ones_built_without(hf_dirs, tmp_path):
    from transformers import LlamaForCausalLM

    paths = [str(hf_dirs[p]) for p in ("llama2", "llama3")]  # default and llama3-scaled rotary
    out = tmp_path / "after.pt"
    proc = subprocess.run([sys.executable, "-c", AFTER_BRIDGE, str(out), *paths], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = torch.load(out, weights_only=True)
    for path in paths:
        model = LlamaForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = model(torch.arange(24).view(2, 12)).logits
        torch.testing.assert_close(after[path]["inv_freq"], model.model.rotary_emb.inv_freq, rtol=0, atol=0)
        torch.testing.assert_close(after[path]["logits"], logits, rtol=0, atol=0)
