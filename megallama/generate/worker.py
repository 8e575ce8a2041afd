"""megallama generate, Megatron side: one copy per rank under torchrun (launched by `megallama.generate.driver`).

Each rank builds the project's GPTModel for its TP x PP slot and fills it from the canonical Reader of the
checkpoint (`rank_state_dict`: the same rule table the converters write with), so every format megallama reads
can be generated from (`load_model`, kept apart so that adapters can be merged there). Prompts are decoded
`batch_size` at a time, left-padded, with megatron-core's static KV cache (`StaticInferenceContext`, the
`inference_context` of GPTModel.forward): one prefill pass over the prompts, then each new token is one token's
forward through megatron-core's pipeline schedule (forward_only). Rotary angles follow the cache slot, so a
left-padded row's positions are shifted by its padding; attention depends only on differences of positions,
and the mask keeps padding out of every real token's view. The last stage gathers the vocab-parallel logits
over TP and chooses the tokens; the pipeline group broadcasts them to the other stages.

Usage: python -m torch.distributed.run --nproc-per-node TP*PP -m megallama.generate.worker JOB.json
JOB.json = {"megatron", "tp", "pp", "dtype", "padded_vocab_size", "prompts": [[ids]], "eos_id", "settings", "out"};
rank 0 writes OUT/result.json = [{"ids", "stop"}] and OUT/timing.json (time to first token, tokens/s) and prints
progress lines (generate.EVENT), or OUT/error.json.
"""

from __future__ import annotations

import json
import sys
import time
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
    from megallama.engine.model import build_gpt_model
    from megallama.formats.megatron.torch_format import rank_state_dict

    tp, pp = job["tp"], job["pp"]
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    with open_reader(Path(job["megatron"]), "megatron", model_config=job.get("model_config")) as reader:
        spec = reader.spec
        state = rank_state_dict(reader, spec, tp_rank=tp_rank, tp=tp, pp_rank=pp_rank, pp=pp,
                                padded_vocab_size=job["padded_vocab_size"], dtype=job["dtype"],
                                ep_rank=ps.get_expert_model_parallel_rank(), ep=job.get("ep", 1))
    model = build_gpt_model(spec, padded_vocab_size=job["padded_vocab_size"], dtype=job["dtype"]).eval()
    model.load_state_dict(state, strict=True)
    if job.get("adapters"):  # a LoRA/DoRA run: its adapters on the base, unmerged
        from megallama.peft.lora import attach_adapters
        from megallama.peft.store import read_adapters

        attach_adapters(model, read_adapters(Path(job["adapters"])))
    return model, spec


def masks(pads: torch.Tensor, length: int, *, new: int) -> torch.Tensor:
    """Blocked (True) attention for the last `new` of `length` positions of left-padded rows [b, 1, new, length].

    Causal, and no real token attends to a row's padding; a padding query keeps its own key, so no softmax row is
    empty (an empty row is NaN, and NaN times a zero weight is still NaN in the next layer's values).
    """
    q = torch.arange(length - new, length)[:, None]  # [new, 1] query positions
    k = torch.arange(length)[None, :]  # [1, length] key positions
    pad_key = k[None] < pads[:, None, None]  # [b, 1, length]
    return ((k > q)[None] | (pad_key & (k != q)[None])).unsqueeze(1)  # [b, 1, new, length]


def last_logits(model, context, tokens: torch.Tensor, positions: torch.Tensor,
                blocked: torch.Tensor) -> torch.Tensor | None:
    """Logits [b, padded vocab] at each row's last position, on the last stage (None elsewhere): one pipeline pass
    over `tokens` [b, s], appending their keys and values to `context`'s cache (megatron-core's static KV cache)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megallama.engine.runtime import device

    tokens, positions, blocked = tokens.to(device()), positions.to(device()), blocked.to(device())
    kept: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        # last stage: [b, 1, Vp], gathered over TP (the context keeps only the last position's logits)
        output = model(tokens, positions, blocked, inference_context=context, runtime_gather_output=True)

        def keep(output_tensor):
            kept.append(output_tensor[:, -1:].detach())
            return output_tensor.sum() * 0.0, {}

        return output, keep

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                                forward_only=True)
    context.sequence_len_offset += tokens.shape[1]
    if not ps.is_pipeline_last_stage():
        return None
    return kept[0][:, -1].float()  # [b, Vp]


def share_tokens(tokens: list[int] | None, batch: int) -> list[int]:
    """The last stage's tokens (one per row), sent to every stage of this pipeline."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megallama.engine.runtime import device

    t = torch.tensor(tokens if tokens is not None else [-1] * batch, dtype=torch.long, device=device())
    dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t.tolist()


def full_forward_only(spec) -> bool:
    """Llama 4's chunked attention and attention temperature count positions from the start of the sequence inside
    our core attention, which sees only the new token's query when decoding from the KV cache: such models decode
    one prompt at a time, each token a forward of the whole sequence (exact, slower)."""
    return bool(spec.attention_chunk_size or spec.attn_temperature_tuning)


def decode_batch(model, spec, prompts: list[list[int]], s: dict, *, eos_id: int | None, generator,
                 on_step=lambda step: None) -> tuple[list[dict], float]:
    """Complete `prompts` together: one prefill pass over the left-padded prompts, then one pass of one token per
    row per step, reading earlier keys and values from the KV cache. Returns ([{"ids", "stop"}], seconds to the
    first token)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    start = time.perf_counter()
    b, longest, limit = len(prompts), max(map(len, prompts)), s["max_new_tokens"]
    context = StaticInferenceContext(b, longest + limit)
    pads = torch.tensor([longest - len(p) for p in prompts])  # [b]
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])  # [b, longest], pad id unused
    positions = (torch.arange(longest)[None] - pads[:, None]).clamp(min=0)  # [b, longest]
    blocked = masks(pads, longest, new=longest)
    new: list[list[int]] = [[] for _ in prompts]
    stop = ["length"] * b
    first = 0.0
    recompute, history = full_forward_only(spec), tokens
    for step in range(limit):
        logits = last_logits(model, context, tokens, positions, blocked)
        if step == 0 and not recompute:
            context.enable_decode_mode()
        choices = None
        if logits is not None:
            choices = [next_token(row[: spec.vocab_size], temperature=s["temperature"], top_p=s["top_p"],
                                  generator=generator) for row in logits]
        chosen = share_tokens(choices, b)
        first = first or time.perf_counter() - start
        for i, token in enumerate(chosen):
            if stop[i] == "eos":
                continue
            if token == eos_id:
                stop[i] = "eos"
            else:
                new[i].append(token)
        on_step(step + 1)
        if all(st == "eos" for st in stop):
            break
        length = longest + step + 1
        history = torch.cat([history, torch.tensor(chosen)[:, None]], dim=1)  # [b, length]
        if recompute:  # the whole sequence again, with a fresh cache (see full_forward_only)
            context = StaticInferenceContext(b, longest + limit)
            tokens, blocked = history, masks(pads, length, new=length)
            positions = (torch.arange(length)[None] - pads[:, None]).clamp(min=0)
            continue
        tokens = torch.tensor(chosen)[:, None]  # [b, 1]; finished rows run on, their tokens ignored
        positions = (length - 1 - pads)[:, None]
        blocked = masks(pads, length, new=1)
    return [{"ids": n, "stop": st} for n, st in zip(new, stop, strict=True)], first


def run(job: dict) -> tuple[list[dict], dict]:
    """Decode every prompt, `batch_size` prompts at a time; every rank returns the same results, and timings."""
    import torch.distributed as dist

    s = job["settings"]
    model, spec = load_model(job)
    dist.barrier()
    world = dist.get_world_size()
    progress("workers", world, world)
    generator = torch.Generator().manual_seed(int(s["seed"]))  # same seed on every rank: same choices
    results, prompts, limit = [], job["prompts"], s["max_new_tokens"]
    batch = 1 if full_forward_only(spec) else max(1, int(s.get("batch_size") or len(prompts)))
    start, firsts = time.perf_counter(), []
    with torch.no_grad():
        for at in range(0, len(prompts), batch):
            rows = prompts[at:at + batch]
            def on_step(step: int, at: int = at, n: int = len(rows)) -> None:
                progress("tokens", at * limit + step * n, len(prompts) * limit)

            done, first = decode_batch(model, spec, rows, s, eos_id=job["eos_id"], generator=generator,
                                       on_step=on_step)
            firsts.append(first)
            results += done
            progress("tokens", (at + len(rows)) * limit, len(prompts) * limit)
            progress("prompts", at + len(rows), len(prompts))
    seconds = time.perf_counter() - start
    tokens = sum(len(r["ids"]) + (r["stop"] == "eos") for r in results)
    timing = {"time_to_first_token_s": firsts[0], "generate_seconds": seconds, "new_tokens": tokens,
              "tokens_per_s": tokens / seconds if seconds > 0 else None}
    return results, timing


def write_error(out: Path, error: BaseException) -> None:
    code = error.exit_code if isinstance(error, MegallamaError) else 1
    message = str(error) if isinstance(error, MegallamaError) else f"{type(error).__name__}: {error}"
    (out / "error.json").write_text(json.dumps({"message": message, "exit_code": code,
                                                "traceback": traceback.format_exc()}))


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from megallama.engine.runtime import destroy_distributed, init_distributed

    job = json.loads(Path(argv[0]).read_text())
    out = Path(job["out"])
    init_distributed(tp=job["tp"], pp=job["pp"], seed=int(job["settings"]["seed"]), ep=job.get("ep", 1))
    try:
        results, timing = run(job)
        if dist.get_rank() == 0:
            (out / "result.json").write_text(json.dumps(results))
            (out / "timing.json").write_text(json.dumps(timing))
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
