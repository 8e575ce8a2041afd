"""One copy per rank (under torchrun): the SDPA core attention against megatron-core's local DotProductAttention.

For each case (TP x PP; the rest of the world is data parallel and checks the same thing):
1. `local` vs `sdpa`: the same weights (the local model's state dict, loaded strictly into the SDPA model), one
   forward + backward of a batch through megatron-core's pipeline schedule; logits and every parameter gradient
   of this rank are compared.
2. packed vs separate (`sdpa`): three samples of different lengths packed into one thd micro-batch with
   PackedSeqParams, against the same samples run one by one; logits and gradients must agree, which holds
   only if attention stays inside each sample and rotary positions restart per sample.
Writes one JSON per case from global rank 0 with the maxima over all ranks.

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
    """(max abs difference, max abs value of `b`) over matching tensors."""
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(b[k].abs().max().item() for k in b)
    return diff, scale


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
    """Element-wise max over all ranks of every (diff, scale) pair; ranks without a value send -1."""
    import torch.distributed as dist

    names = ("logits", "grads")
    flat = torch.tensor([x for n in names for x in values.get(n, (-1.0, -1.0))], dtype=torch.float64)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    keys = torch.tensor([0.0 if values.get("same_keys", True) else 1.0])
    dist.all_reduce(keys, op=dist.ReduceOp.MAX)
    return {"logits": flat[0:2].tolist(), "grads": flat[2:4].tolist(), "same_keys": keys.item() == 0.0}


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
