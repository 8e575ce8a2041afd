"""SFT checkpoints in pth2megatron's layout, plus what resuming needs (optimizer, LR schedule, RNG, step).

    OUTPUT/
      latest_checkpointed_iteration.txt      written by rank 0 after every rank has finished its files
      iter_0000200/mp_rank_TT[_PPP]/model_optim_rng.pt   {args, checkpoint_version, iteration, model,
                                                          optimizer, opt_param_scheduler, rng_state, sft}
                                    distrib_optim.pt     only with the distributed optimizer (its own format)
      megallama.json, megatron_args.txt, tokenizer files

The `model` dict is `GPTModel.state_dict()` of the rank, exactly what pth2megatron writes, so
`megallama convert megatron2pth` and Megatron-LM (`--ckpt-format torch`) read an SFT checkpoint like a converted one.
One writer per model-parallel rank (DP rank 0); RNG states of all DP ranks are gathered into a list, as
Megatron-LM does. Every function here is collective unless it says otherwise.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megallama import __version__
from megallama.errors import InputError
from megallama.formats.base import MANIFEST, TOKENIZER_FILES, read_manifest
from megallama.formats.megatron.local import launch_flags, megatron_args
from megallama.formats.megatron.torch_format import (
    ARGS_FILE,
    CHECKPOINT_VERSION,
    MODEL_FILE,
    TRACKER,
    checkpoint_dir,
    detect_tokenizer,
    iteration_dir,
    load_rank_file,
    write_tracker,
)
from megallama.spec import ModelSpec

DISTRIB_OPTIM_FILE = "distrib_optim.pt"


# ---------------------------------------------------------------- finding a checkpoint (no collectives)
def read_tracker(root: Path) -> int | None:
    """The iteration named by `latest_checkpointed_iteration.txt`: an int, or None for `release`."""
    path = Path(root) / TRACKER
    if not path.is_file():
        raise InputError(f"{root} holds no Megatron checkpoint ({TRACKER} is missing): convert one with "
                         "`megallama convert pth2megatron` or point `load` at an sft output")
    text = path.read_text(encoding="utf-8", errors="replace").strip()  # a binary file: refused below
    if text == "release":
        return None
    if not (text.isascii() and text.isdigit()):
        raise InputError(f"{path} holds {text[:40]!r}: expected an iteration number or 'release'")
    return int(text)


def has_checkpoint(root: Path) -> bool:
    return (Path(root) / TRACKER).is_file()


def rank_path(root: Path, iteration: int | None, *, tp_rank: int, pp_rank: int, pp: int) -> Path:
    return checkpoint_dir(root, iteration, tp_rank, pp_rank, pp) / MODEL_FILE


@dataclass
class Start:
    """Where a run starts: the folder and iteration to read, and whether that checkpoint holds training state."""

    root: Path
    iteration: int | None
    resumes: bool  # optimizer, scheduler, RNG and step come from the checkpoint

    @property
    def step(self) -> int:
        return (self.iteration or 0) if self.resumes else 0


def find_start(load: Path, output: Path, *, resume: bool) -> Start:
    """`--resume` continues `output`; otherwise `load` (a converted checkpoint, or an sft output, which continues)."""
    root = Path(output if resume else load)
    if resume and not has_checkpoint(root):
        raise InputError(f"--resume: output folder {root} holds no checkpoint yet; start without --resume")
    iteration = read_tracker(root)
    manifest = read_manifest(root) or {}
    return Start(root=root, iteration=iteration, resumes=bool(manifest.get("sft")) and iteration is not None)


# ---------------------------------------------------------------- RNG
def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _gather_rng_states() -> list[dict]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    states: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, rng_state(), group=group)
    return states


# ---------------------------------------------------------------- save
def save_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, spec: ModelSpec, base_manifest: dict,
                    tokenizer_dir: Path | None, seq_length: int, consumed_samples: int,
                    distributed_optimizer: bool, train_args: dict) -> Path:
    """Write `iter_{step:07d}` for this rank; the tracker moves to it only after every rank is done.

    `model` is the bare GPTModel (no DDP / Float16Module wrapper), so keys match pth2megatron's.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    root = Path(root)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    writer = ps.get_data_parallel_rank() == 0
    path = rank_path(root, step, tp_rank=tp_rank, pp_rank=pp_rank, pp=pp)
    rng_states = _gather_rng_states()
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
    if distributed_optimizer:  # gathers the optimizer shards of the DP group onto DP rank 0
        optimizer.save_parameter_state(str(path.parent / DISTRIB_OPTIM_FILE))
    if writer:
        saved_spec = spec.replace(dtype=_dtype_name(next(model.parameters()).dtype))
        tokenizer_type, tokenizer_model = detect_tokenizer(_tokenizer_files(tokenizer_dir), root.resolve())
        args = megatron_args(saved_spec, tp=tp, pp=pp, padded_vocab_size=base_manifest["padded_vocab_size"],
                             divisible_by=base_manifest.get("divisible_by", 128), iteration=step,
                             tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, seq_length=seq_length,
                             consumed_train_samples=consumed_samples, **train_args)
        torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": step,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "opt_param_scheduler": scheduler.state_dict(), "rng_state": rng_states,
                    "sft": {"step": step, "consumed_samples": consumed_samples}}, path)
    dist.barrier()
    if dist.get_rank() == 0:
        _write_folder_files(root, step, saved_spec, base_manifest, tokenizer_dir, args)
        write_tracker(root, step)
    dist.barrier()
    return iteration_dir(root, step)


def _write_folder_files(root: Path, step: int, spec: ModelSpec, base: dict, tokenizer_dir: Path | None,
                        args) -> None:
    """Rank 0 only: manifest, launch flags and tokenizer, beside the iteration folders."""
    for f in _tokenizer_files(tokenizer_dir):
        if not (root / f.name).exists():
            shutil.copy2(f, root / f.name)
    manifest = {**base, "tool": "megallama", "version": __version__, "format": "megatron", "spec": spec.to_dict(),
                "iteration": step, "sft": {"step": step}}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (root / ARGS_FILE).write_text("\n".join(launch_flags(args, load_dir=root.resolve())) + "\n")


def _tokenizer_files(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- load
def load_rank_state(start: Start) -> dict:
    """This rank's `model_optim_rng.pt` (no collectives)."""
    from megatron.core import parallel_state as ps

    path = rank_path(start.root, start.iteration, tp_rank=ps.get_tensor_model_parallel_rank(),
                     pp_rank=ps.get_pipeline_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_world_size())
    if not path.is_file():
        raise InputError(f"{path} is missing: the checkpoint in {start.root} is incomplete or split for another "
                         "TP x PP")
    return load_rank_file(path)


def load_model(model, state: dict) -> None:
    """Strict load into the bare GPTModel: a converted checkpoint must match the model key for key."""
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise InputError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def restore_training_state(start: Start, state: dict, *, optimizer, scheduler, distributed_optimizer: bool) -> None:
    """Optimizer (incl. fp32 master weights), LR schedule and RNG from an sft checkpoint (collective with the
    distributed optimizer)."""
    from megatron.core import parallel_state as ps

    if "optimizer" not in state or "opt_param_scheduler" not in state:
        raise InputError(f"checkpoint {start.root} has no optimizer state to resume from")
    optimizer.load_state_dict(state["optimizer"])
    if distributed_optimizer:
        path = rank_path(start.root, start.iteration, tp_rank=ps.get_tensor_model_parallel_rank(),
                         pp_rank=ps.get_pipeline_model_parallel_rank(),
                         pp=ps.get_pipeline_model_parallel_world_size()).parent / DISTRIB_OPTIM_FILE
        if not path.is_file():
            raise InputError(f"{path} is missing: the checkpoint was saved without the distributed optimizer; "
                             "resume with parallel.distributed_optimizer=false")
        _load_parameter_state(optimizer, path)
    scheduler.load_state_dict(state["opt_param_scheduler"])
    states = state.get("rng_state") or []
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if states:
        set_rng_state(states[dp_rank] if len(states) == dp else states[0])


def _load_parameter_state(optimizer, path: Path) -> None:
    """megatron-core's `load_parameter_state`, working around its torch-Adam path (no apex / TE, e.g. on CPU).

    There torch's Adam keeps a per-parameter 'step' tensor; megatron-core restores it from the param groups in
    `load_state_dict`, but then copies every key of the live state from the distrib_optim.pt file, which holds
    only param / exp_avg / exp_avg_sq (KeyError: 'step'). The steps are set aside while it loads, and each
    parameter gets its own copy back: megatron-core hands all of them one shared tensor, which torch's Adam would
    then increment once per parameter per step. It also copies into fp32 shards that are views of parameters
    requiring grad, which autograd refuses outside no_grad.
    """
    inner = [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    steps = [{p: s.pop("step") for p, s in opt.state.items() if "step" in s} for opt in inner]
    try:
        with torch.no_grad():
            optimizer.load_parameter_state(str(path))
    finally:
        for opt, saved in zip(inner, steps, strict=True):
            for param, step in saved.items():
                opt.state[param]["step"] = step.clone()
