"""One copy per rank (under torchrun): the SDPA core attention against megatron-core's local DotProductAttention.

For each case (TP x PP; the rest of the world is data parallel and checks the same thing):
1. `local` vs `sdpa`: the same weights (the local model's state dict, loaded strictly into the SDPA model), one
   forward + backward of a batch through megatron-core's pipeline schedule; logits and every parameter gradient
   of this rank are compared, each tensor relative to its own scale; a negative control puts a 10 % error into
   the smallest gradient and reports what the comparison (and one global maximum) makes of it.
2. packed vs separate (`sdpa`): three samples of different lengths packed into one thd micro-batch with
   PackedSeqParams, against the same samples run one by one; logits and gradients must agree, which holds
   only if attention stays inside each sample and rotary positions restart per sample.
Writes one JSON per case from global rank 0: per check [worst relative difference, smallest scale] over ranks.

Usage: python -m torch.distributed.run --nproc-per-node N tests/workers/attention_parity.py JOB.json
JOB.json = {"cases": [[tp, pp], ...], "result": PATH}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import megallama.engine.runtime  # noqa: F401  (filters megatron-core start-up noise before it is imported)
from megallama.tiny import PRESETS

SPEC = PRESETS["llama2"]  # hidden 64, 4 layers, 4 heads / 2 KV heads (GQA)
PADDED = 384


def schedule(model, tokens: torch.Tensor, labels: torch.Tensor, packed=None) -> torch.Tensor | None:
    """Forward + backward of one micro-batch; summed token loss. Returns this rank's logits (last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    logits: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        output = model(tokens, position_ids, None, packed_seq_params=packed)

        def loss_func(output_tensor):
            logits.append(output_tensor.detach().clone())
            loss = vocab_parallel_cross_entropy(output_tensor.float(), labels).sum()
            return loss, {}

        return output, loss_func

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=False)
    return logits[0] if logits else None


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(worst relative difference over the tensors, smallest scale seen): each tensor is judged against its own
    max |value| of `b`, so a small gradient (a norm weight's, say) cannot hide under the largest one."""
    assert a.keys() == b.keys()
    worst, smallest = 0.0, float("inf")
    for k in a:
        diff, scale = (a[k] - b[k]).abs().max().item(), b[k].abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
        smallest = min(smallest, scale)
    return worst, smallest


def control(reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Negative control on the real gradients: the smallest non-zero gradient 10 % off, everything else exact.
    Returns (what max_diff says, what one global maximum would have said: max diff / max scale)."""
    small = min((k for k in reference if reference[k].abs().max() > 0), key=lambda k: reference[k].abs().max())
    wrong = {k: t * 1.1 if k == small else t for k, t in reference.items()}
    diff = (wrong[small] - reference[small]).abs().max().item()
    return max_diff(wrong, reference)[0], diff / max(t.abs().max().item() for t in reference.values())


def build(attention: str, state: dict | None = None):
    from megallama.engine.model import build_gpt_model

    model = build_gpt_model(SPEC, padded_vocab_size=PADDED, dtype="float32", attention=attention)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def local_vs_sdpa(gen: torch.Generator) -> dict:
    from megatron.core import parallel_state as ps

    tokens = torch.randint(0, SPEC.vocab_size, (2, 24), generator=gen)
    labels = torch.randint(0, SPEC.vocab_size, (2, 24), generator=gen)
    local = build("local")
    state = local.state_dict()
    sdpa = build("sdpa", state)
    same_keys = list(sdpa.state_dict().keys()) == list(state.keys())
    out = {}
    logits_local = schedule(local, tokens, labels)
    logits_sdpa = schedule(sdpa, tokens, labels)
    if ps.is_pipeline_last_stage():
        out["logits"] = max_diff({"l": logits_sdpa}, {"l": logits_local})
    out["grads"] = max_diff(grads(sdpa), grads(local))
    out["control"] = control(grads(local))
    out["same_keys"] = same_keys
    return out


def packed_vs_separate(gen: torch.Generator) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [7, 12, 5]  # 24 tokens: a multiple of TP for sequence-parallel-free TP2
    samples = [torch.randint(0, SPEC.vocab_size, (1, n), generator=gen) for n in lengths]
    targets = [torch.randint(0, SPEC.vocab_size, (1, n), generator=gen) for n in lengths]
    state = build("local").state_dict()
    separate, packed = build("sdpa", state), build("sdpa", state)
    logits_separate = [schedule(separate, x, y) for x, y in zip(samples, targets, strict=True)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    logits_packed = schedule(packed, torch.cat(samples, 1), torch.cat(targets, 1), packed=params)
    out = {"grads": max_diff(grads(packed), grads(separate))}
    if ps.is_pipeline_last_stage():
        out["logits"] = max_diff({"l": logits_packed}, {"l": torch.cat(logits_separate, 1)})
    return out


def reduce_max(values: dict) -> dict:
    """Over all ranks: the worst relative difference and the smallest scale of logits and grads, the largest
    values of the control; ranks without a value send a neutral one."""
    import torch.distributed as dist

    worst = torch.tensor([values.get(n, (-1.0, 0.0))[0] for n in ("logits", "grads")]
                         + list(values.get("control", (-1.0, -1.0))), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    smallest = torch.tensor([-values.get(n, (0.0, float("inf")))[1] for n in ("logits", "grads")],
                            dtype=torch.float64)  # min over ranks, as a max of negatives
    dist.all_reduce(smallest, op=dist.ReduceOp.MAX)
    keys = torch.tensor([0.0 if values.get("same_keys", True) else 1.0])
    dist.all_reduce(keys, op=dist.ReduceOp.MAX)
    out = {"logits": [worst[0].item(), -smallest[0].item()], "grads": [worst[1].item(), -smallest[1].item()],
           "same_keys": keys.item() == 0.0}
    if "control" in values:
        out["control"] = [worst[2].item(), worst[3].item()]
    return out


def main(argv: list[str]) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megallama.engine.runtime import destroy_distributed, init_distributed

    job = json.loads(Path(argv[0]).read_text())
    results = []
    for tp, pp in job["cases"]:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_distributed(tp=tp, pp=pp, seed=1234)
        gen = torch.Generator().manual_seed(0)  # the same data on every rank
        for name, check in (("local_vs_sdpa", local_vs_sdpa), ("packed_vs_separate", packed_vs_separate)):
            results.append({"tp": tp, "pp": pp, "check": name, **reduce_max(check(gen))})
    if dist.get_rank() == 0:
        Path(job["result"]).write_text(json.dumps(results))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
