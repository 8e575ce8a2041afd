"""megallama generate, Megatron side: one copy per rank under torchrun (launched by `megallama.generate.driver`).

Each rank builds the project's GPTModel for its TP x PP slot and fills it from the canonical Reader of the
checkpoint (`rank_state_dict`: the same rule table the converters write with), so every format megallama reads
can be generated from. Decoding is a plain loop: each new token is one forward of the whole sequence through
megatron-core's pipeline schedule (forward_only; no KV cache, which is fine at the sizes this runs on CPU);
the last stage gathers the vocab-parallel logits over TP and chooses the token, and the pipeline group
broadcasts it to the other stages.

Usage: python -m torch.distributed.run --nproc-per-node TP*PP -m megallama.generate.worker JOB.json
JOB.json = {"megatron", "tp", "pp", "dtype", "padded_vocab_size", "prompts": [[ids]], "eos_id", "settings", "out"};
rank 0 writes OUT/result.json = [{"ids", "stop"}] and prints progress lines (generate.EVENT), or OUT/error.json.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

import megallama.engine.runtime  # noqa: F401  (filters megatron-core start-up noise before it is imported)
from megallama.errors import InputError, MegallamaError
from megallama.generate.driver import EVENT, next_token


def progress(what: str, done: int, total: int) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(EVENT + json.dumps({"what": what, "done": done, "total": total}), flush=True)


def load_model(job: dict):
    """This rank's GPTModel, filled from the canonical Reader and loaded strictly (every key, every shape)."""
    from megatron.core import parallel_state as ps

    from megallama.convert import open_reader
    from megallama.formats.megatron.torch_format import rank_state_dict
    from megallama.engine.model import build_gpt_model

    tp, pp = job["tp"], job["pp"]
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    with open_reader(Path(job["megatron"]), "megatron") as reader:
        spec = reader.spec
        state = rank_state_dict(reader, spec, tp_rank=tp_rank, tp=tp, pp_rank=pp_rank, pp=pp,
                                padded_vocab_size=job["padded_vocab_size"], dtype=job["dtype"])
    model = build_gpt_model(spec, padded_vocab_size=job["padded_vocab_size"], dtype=job["dtype"]).eval()
    model.load_state_dict(state, strict=True)
    if job.get("adapters"):  # a LoRA/DoRA run: its adapters on the base, unmerged
        from megallama.peft.lora import attach_adapters
        from megallama.peft.store import read_adapters

        attach_adapters(model, read_adapters(Path(job["adapters"])))
    return model, spec


def last_logits(model, ids: list[int]) -> torch.Tensor | None:
    """Logits [padded vocab] at the last position, on the last stage (None elsewhere): one pipeline pass."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megallama.engine.runtime import device

    tokens = torch.tensor([ids], device=device())  # [1, s]
    position_ids = torch.arange(len(ids), device=device()).unsqueeze(0)
    kept: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        output = model(tokens, position_ids, None)  # causal mask built inside; last stage: [1, s, Vp/t]

        def keep(output_tensor):
            kept.append(output_tensor[:, -1:].detach())
            return output_tensor.sum() * 0.0, {}

        return output, keep

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=len(ids), micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return gather_from_tensor_model_parallel_region(kept[0].contiguous())[0, -1].float()  # [Vp]


def share_token(token: int | None) -> int:
    """The last stage's token, sent to every stage of this pipeline."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megallama.engine.runtime import device

    t = torch.tensor([-1 if token is None else token], dtype=torch.long, device=device())
    dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return int(t.item())


def run(job: dict) -> list[dict]:
    """Decode every prompt; every rank returns the same results."""
    import torch.distributed as dist

    s = job["settings"]
    model, spec = load_model(job)
    dist.barrier()
    world = dist.get_world_size()
    progress("workers", world, world)
    generator = torch.Generator().manual_seed(int(s["seed"]))  # same seed on every rank: same choices
    results, prompts, limit = [], job["prompts"], s["max_new_tokens"]
    with torch.no_grad():
        for n, prompt in enumerate(prompts):
            ids, new, stop = list(prompt), [], "length"
            for step in range(limit):
                logits = last_logits(model, ids)
                choice = None
                if logits is not None:
                    choice = next_token(logits[: spec.vocab_size], temperature=s["temperature"], top_p=s["top_p"],
                                        generator=generator)
                token = share_token(choice)
                progress("tokens", n * limit + step + 1, len(prompts) * limit)
                if token == job["eos_id"]:
                    stop = "eos"
                    break
                ids.append(token)
                new.append(token)
            progress("tokens", (n + 1) * limit, len(prompts) * limit)
            progress("prompts", n + 1, len(prompts))
            results.append({"ids": new, "stop": stop})
    return results


def write_error(out: Path, error: BaseException) -> None:
    code = error.exit_code if isinstance(error, MegallamaError) else 1
    message = str(error) if isinstance(error, MegallamaError) else f"{type(error).__name__}: {error}"
    (out / "error.json").write_text(json.dumps({"message": message, "exit_code": code}))


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from megallama.engine.runtime import destroy_distributed, init_distributed

    job = json.loads(Path(argv[0]).read_text())
    out = Path(job["out"])
    init_distributed(tp=job["tp"], pp=job["pp"], seed=int(job["settings"]["seed"]))
    try:
        results = run(job)
        if dist.get_rank() == 0:
            (out / "result.json").write_text(json.dumps(results))
        return 0
    except Exception as e:  # one clear line for the parent; the traceback stays on this rank's output
        if not isinstance(e, InputError):
            traceback.print_exc()
        write_error(out, e)
        return 1
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
