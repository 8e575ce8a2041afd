"""One copy per rank (under torchrun): load each case's checkpoint strictly into the project's GPTModel and check
the gathered logits against reference logits computed by the test. Writes one JSON result per case.

A torch-format case loads its rank file; a `"ckpt_format": "torch_dist"` case loads with megatron-core's own
`dist_checkpointing.load` (re-sharding to the case's TP x PP). A `"kind": "mcore_save"` case instead saves a
model with megatron-core's `dist_checkpointing.save`, as Megatron-LM's training does (see mcore_save.py).

Usage: python -m torch.distributed.run --nproc-per-node N tests/workers/load_and_forward.py JOB.json
JOB.json = [{"name", "ckpt", "tp", "pp", "spec", "padded", "tokens", "reference", "result"}, ...]; every
case's TP x PP must divide N (the rest is data parallel: each replica checks the same thing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import megallama.engine.runtime  # noqa: F401  (filters megatron-core start-up noise before it is imported)


def run_case(case: dict) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megallama.engine.model import build_gpt_model
    from megallama.engine.runtime import init_distributed
    from megallama.formats.megatron.torch_format import MODEL_FILE, checkpoint_dir, load_rank_file
    from megallama.spec import ModelSpec

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    tp, pp = case["tp"], case["pp"]
    init_distributed(tp=tp, pp=pp, seed=1234)
    spec = ModelSpec.from_dict(case["spec"])
    model = build_gpt_model(spec, padded_vocab_size=case["padded"], dtype="float32").eval()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if case.get("ckpt_format") == "torch_dist":
        from megatron.core import dist_checkpointing

        # as Megatron-LM's load_checkpoint: the model under "model", common.pt's entries beside it
        state = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                        str(Path(case["ckpt"]) / "release"))["model"]
        # every tensor comes from the checkpoint; `_extra_state` entries absent from a sharded state dict
        # (the output layer's) are filled in by megatron-core's load pre-hook, as in Megatron-LM
        same_keys = {k for k in model.state_dict() if not k.endswith("_extra_state")} <= set(state)
    else:
        path = checkpoint_dir(Path(case["ckpt"]), None, tp_rank, pp_rank, pp) / MODEL_FILE
        state = load_rank_file(path)["model"]
        same_keys = list(model.state_dict().keys()) == list(state.keys())
    model.load_state_dict(state, strict=True)

    tokens = torch.load(case["tokens"])  # [b, s]
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    logits: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        output = model(tokens, position_ids, None)  # last stage: [b, s, Vp/t]; others: hidden states

        def loss_func(output_tensor):
            logits.append(output_tensor.detach())
            return output_tensor.sum() * 0.0, {}

        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    ok_keys = torch.tensor([1.0 if same_keys else 0.0])
    dist.all_reduce(ok_keys, op=dist.ReduceOp.MIN)
    if ps.is_pipeline_last_stage():
        padded = gather_from_tensor_model_parallel_region(logits[0])  # [b, s, Vp]
        full = padded[..., :spec.vocab_size]  # [b, s, V]
        reference = torch.load(case["reference"])
        if tp_rank == 0 and ps.get_data_parallel_rank() == 0:
            result = {"name": case["name"], "tp": tp, "pp": pp, "keys_match": bool(ok_keys.item()),
                      "max_abs_diff": float((full.float() - reference.float()).abs().max()),
                      # zero padding rows give logit exactly 0 (formats.md P8)
                      "padding_logits_zero": bool((padded[..., spec.vocab_size:] == 0).all())}
            Path(case["result"]).write_text(json.dumps(result))
    dist.barrier()


def main(argv: list[str]) -> int:
    from megallama.engine.runtime import destroy_distributed

    for case in json.loads(Path(argv[0]).read_text()):
        if case.get("kind") == "mcore_save":
            from mcore_save import save_case

            save_case(case)
        else:
            run_case(case)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
