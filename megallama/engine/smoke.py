"""doctor's smoke test, one copy per rank: a tiny GPTModel at TP x PP, one forward + backward through
megatron-core's pipeline schedule. Run via `megallama doctor` (which launches torchrun)."""

from __future__ import annotations

import argparse
import sys

import torch

import megallama.engine.runtime  # noqa: F401  (filters megatron-core start-up noise before it is imported)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    args = parser.parse_args(argv)

    from functools import partial

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megallama.engine.model import build_gpt_model
    from megallama.engine.runtime import destroy_distributed, device, init_distributed
    from megallama.tiny import PRESETS

    init_distributed(tp=args.tp, pp=args.pp, seed=1234)
    spec = PRESETS["llama2"]
    model = build_gpt_model(spec, padded_vocab_size=384)
    seq, micro = 16, 2
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (micro, seq), generator=gen).to(device())
    position_ids = torch.arange(seq, device=device()).unsqueeze(0).expand(micro, -1)

    def forward_step(data_iterator, model):
        labels = torch.roll(tokens, -1, dims=1)
        output = model(tokens, position_ids, None, labels=labels)  # [b, s] per-token loss on the last stage

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach()}

        return output, partial(loss_func)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=seq, micro_batch_size=micro, forward_only=False)
    grads = [p.grad if p.grad is not None else getattr(p, "main_grad", None) for p in model.parameters()]
    ok = all(g is not None and torch.isfinite(g).all() for g in grads)
    ok_tensor = torch.tensor([1.0 if ok else 0.0], device=device())
    dist.all_reduce(ok_tensor, op=dist.ReduceOp.MIN)
    loss_value = None
    if parallel_state.is_pipeline_last_stage() and losses:
        loss_value = float(losses[0]["loss"])
    if dist.get_rank() == dist.get_world_size() - 1:
        loss_text = "n/a" if loss_value is None else f"{loss_value:.4f}"
        print(f"smoke: TP={args.tp} PP={args.pp} world={dist.get_world_size()} backend={dist.get_backend()} "
              f"loss={loss_text} grads_finite={bool(ok_tensor.item())}", flush=True)
    passed = bool(ok_tensor.item()) and (loss_value is None or torch.isfinite(torch.tensor(loss_value)))
    destroy_distributed()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
