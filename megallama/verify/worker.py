"""verify layer-diff, Megatron side: one copy per rank under torchrun (launched by `megallama.verify.layer_diff`).

Each rank builds the project's GPTModel for its TP x PP slot, loads its own rank file strictly, and runs one
forward through megatron-core's pipeline schedule (forward_only) with hooks on the compared modules. mcore keeps
hidden states as [s, b, h]; captures are stored as [b, s, h] like the reference's. Embedding, attention and MLP
outputs are already complete on every TP rank (vocab-parallel embedding and row-parallel linears all-reduce), so
only TP rank 0 of each stage writes them; the vocab-parallel logits are all-gathered over TP first.

Usage: python -m torch.distributed.run --nproc-per-node TP*PP -m megallama.verify.worker JOBS.json
JOBS.json = {"dtype", "jobs": [{"spec", "tp", "pp", "padded_vocab_size", "rotary_interleaved", "rank_files",
"layout", "megatron", "tokens", "out"}, ...]}; writes OUT/capture-PPP.pt per stage, or OUT/error.json when a job
cannot run. A checkpoint of another layout (TE, legacy, forks) is read as canonical tensors and re-split into this
rank's local-spec dict in memory: one model engine, every dialect.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

import megallama.engine.runtime  # noqa: F401  (filters megatron-core start-up noise before it is imported)
from megallama.errors import InputError, MegallamaError


def to_bsh(t: torch.Tensor) -> torch.Tensor:
    """[s, b, ...] -> [b, s, ...] on the CPU, detached from the graph. Always a copy: with b = 1 the transpose is
    already contiguous, and the residual add that follows the hook would change the captured tensor in place."""
    return t.detach().transpose(0, 1).to("cpu").clone(memory_format=torch.contiguous_format)


def add_hooks(model, captures: dict) -> list:
    """Forward hooks on every compared module of this stage; layer names use global indices."""

    def keep(name: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output  # linears/attention/layers return (out, bias)
            if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                out = out + output[1]  # the o_proj / down_proj bias, which mcore adds in bias-dropout-add
            captures[name] = to_bsh(out)

        return hook

    hooks = []
    if getattr(model, "pre_process", False):
        hooks.append(model.embedding.register_forward_hook(keep("embedding")))
    for layer in model.decoder.layers:
        i = layer.layer_number - 1  # mcore numbers layers globally from 1 (the stage offset is included)
        hooks += [layer.self_attention.register_forward_hook(keep(f"layers.{i}.attention")),
                  layer.mlp.register_forward_hook(keep(f"layers.{i}.mlp")),
                  layer.register_forward_hook(keep(f"layers.{i}"))]
    final_norm = getattr(model.decoder, "final_layernorm", None)
    if final_norm is not None:
        hooks.append(final_norm.register_forward_hook(keep("final_norm")))
    return hooks


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel [b, s, Vp/t] -> [b, s, Vp], with megatron-core's own TP gather (last dim, rank order)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits.contiguous())


def rank_state(job: dict, spec, *, tp_rank: int, pp_rank: int) -> tuple[dict, Path]:
    """This rank's local-spec `model` dict: its own file, or built from another layout's canonical tensors."""
    from megallama.formats.megatron.local import LOCAL
    from megallama.formats.megatron.torch_format import load_rank_file, open_megatron, rank_state_dict

    path = Path(job["rank_files"][pp_rank * job["tp"] + tp_rank])
    if job.get("layout", LOCAL.name) != LOCAL.name or job.get("ep", 1) > 1:  # EP: this expert rank's experts
        from megatron.core import parallel_state as ps

        with open_megatron(Path(job["megatron"]), layout=job.get("layout"),
                           model_config=job.get("model_config")) as reader:
            return rank_state_dict(reader, spec, tp_rank=tp_rank, tp=job["tp"], pp_rank=pp_rank, pp=job["pp"],
                                   padded_vocab_size=job["padded_vocab_size"], ep=job.get("ep", 1),
                                   ep_rank=ps.get_expert_model_parallel_rank()), path
    state = load_rank_file(path).get("model")
    if not isinstance(state, dict):
        raise InputError(f"{path} has no 'model' state dict")
    return state, path


def load_model(job: dict, dtype: str):
    """The GPTModel of this rank with its own rank file loaded strictly (every key, every shape)."""
    from megatron.core import parallel_state as ps

    from megallama.engine.model import build_gpt_model
    from megallama.spec import ModelSpec

    spec = ModelSpec.from_dict(job["spec"])
    model = build_gpt_model(spec, padded_vocab_size=job["padded_vocab_size"], dtype=dtype,
                            rotary_interleaved=job["rotary_interleaved"],
                            **job.get("engine_overrides", {})).eval()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    path = Path(job["rank_files"][pp_rank * job["tp"] + tp_rank])
    if path.is_dir():  # a torch_dist iteration folder: megatron-core reads this rank's slices, as Megatron-LM does
        from megatron.core import dist_checkpointing
        from megatron.core.safe_globals import SAFE_GLOBALS

        with torch.serialization.safe_globals(SAFE_GLOBALS):  # common.pt's args (weights_only, data classes only)
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))["model"]
    else:
        state, path = rank_state(job, spec, tp_rank=tp_rank, pp_rank=pp_rank)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{path} does not fit the model its manifest describes: "
                         f"{str(e).splitlines()[0]} {' '.join(str(e).split())[:300]}") from None
    if job.get("adapters"):  # a LoRA/DoRA run: its adapters on the base just loaded, unmerged
        from megallama.peft.lora import attach_adapters
        from megallama.peft.store import read_adapters

        attach_adapters(model, read_adapters(Path(job["adapters"])))
    return model


def run_job(job: dict, dtype: str) -> dict[str, torch.Tensor]:
    """One forward of this rank's stage; returns its captures ([b, s, ...]), logits gathered on the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megallama.engine.runtime import device

    model = load_model(job, dtype)
    tokens = torch.load(job["tokens"], weights_only=True).to(device())  # [b, s]
    b, s = tokens.shape
    position_ids = torch.arange(s, device=device()).unsqueeze(0).expand(b, -1)
    captures: dict[str, torch.Tensor] = {}
    hooks = add_hooks(model, captures)
    logits: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        output = model(tokens, position_ids, None)  # causal mask built inside; last stage: [b, s, Vp/t]

        def keep_logits(output_tensor):
            logits.append(output_tensor.detach())
            return output_tensor.sum() * 0.0, {}

        return output, keep_logits

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    for h in hooks:
        h.remove()
    if ps.is_pipeline_last_stage():
        captures["logits"] = gather_vocab(logits[0]).to("cpu")  # padding columns are cut by the parent
    del model
    return captures


PROGRESS = "@@megallama-verify "  # prefix of the progress lines rank 0 prints for the parent


def progress(what: str, done: int, total: int) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(PROGRESS + json.dumps({"what": what, "done": done, "total": total}), flush=True)


def parse_progress(line: str, on_progress) -> bool:
    """Parent side: hand a progress line to `on_progress(what, done, total)`; False for any other line."""
    if not line.startswith(PROGRESS):
        return False
    if on_progress is not None:
        event = json.loads(line[len(PROGRESS):])
        on_progress(event["what"], event["done"], event["total"])
    return True


def write_error(out: Path, error: BaseException) -> None:
    code = error.exit_code if isinstance(error, MegallamaError) else 1
    message = str(error) if isinstance(error, MegallamaError) else f"{type(error).__name__}: {error}"
    (out / "error.json").write_text(json.dumps({"message": message, "exit_code": code,
                                                "traceback": traceback.format_exc()}))


def main(argv: list[str]) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megallama.engine.runtime import destroy_distributed, init_distributed, reinit_model_parallel

    plan = json.loads(Path(argv[0]).read_text())
    jobs, dtype = plan["jobs"], plan["dtype"]
    split = (jobs[0]["tp"], jobs[0]["pp"], jobs[0].get("ep", 1))
    init_distributed(tp=split[0], pp=split[1], seed=1234, ep=split[2])
    progress("workers", dist.get_world_size(), dist.get_world_size())  # every rank has joined the group
    status = 0
    for number, job in enumerate(jobs, 1):
        out = Path(job["out"])
        if (job["tp"], job["pp"], job.get("ep", 1)) != split:  # another split in the same launch
            split = (job["tp"], job["pp"], job.get("ep", 1))
            reinit_model_parallel(tp=split[0], pp=split[1], ep=split[2], seed=1234)
        try:
            captures = run_job(job, dtype)
        except Exception as e:  # one clear line for the parent; the traceback stays on this rank's stderr
            traceback.print_exc()
            write_error(out, e)
            status = 1
            break
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:  # EP: DP ranks agree
            torch.save(captures, out / f"capture-{ps.get_pipeline_model_parallel_rank():03d}.pt")
        dist.barrier()
        progress("forward", number, len(jobs))
    destroy_distributed()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
