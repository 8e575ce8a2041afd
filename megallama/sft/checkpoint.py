"""SFT checkpoints (Megatron-LM's torch_dist by default, or its per-rank torch format) and what resuming needs.

    OUTPUT/
      latest_checkpointed_iteration.txt      names the newest complete checkpoint; replaced (atomically) only
                                             after every rank has finished writing it
      iter_0000200/                          torch_dist: see dist_checkpoint.py
      iter_0000200/mp_rank_TT[_PPP]/model_optim_rng.pt   torch: {args, checkpoint_version, iteration, model,
                                                          optimizer, opt_param_scheduler, rng_state, sft}
                                    distrib_optim.pt     torch, only with the distributed optimizer
      megallama.json, megatron_args.txt, tokenizer files

torch format: the `model` dict is `GPTModel.state_dict()` of the rank, exactly what pth2megatron writes, so
`megallama convert megatron2pth` and Megatron-LM (`--ckpt-format torch`) read it like a converted checkpoint;
one writer per model-parallel rank (DP rank 0). RNG states of all DP ranks are gathered into a list, as
Megatron-LM does with --data-parallel-random-init (it reads entry 0 otherwise).

Crash safety: a checkpoint counts only once the tracker names it. A save killed midway leaves an iteration
folder newer than the tracker; `--resume` ignores it and the next save removes it (`remove_uncommitted`).
Test hook: with MEGALLAMA_TEST_KILL_IN_SAVE=STEP in the environment, rank 0 SIGKILLs itself while saving step
STEP, after every rank has written its data files and before the checkpoint is committed (tests/test_sft.py).
Every function here is collective unless it says otherwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from functools import partial
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
)
from megallama.sft import dist_checkpoint
from megallama.spec import ModelSpec

FORMATS = ("torch_dist", "torch")
KILL_IN_SAVE = "MEGALLAMA_TEST_KILL_IN_SAVE"  # test-only hook, see the module docstring
_ITERATION = re.compile(r"^iter_(\d{7})$")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
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


def checkpoint_format(it_dir: Path) -> str:
    """"torch_dist" (metadata.json, as Megatron-LM detects it) or "torch" (mp_rank_* folders)."""
    it_dir = Path(it_dir)
    if dist_checkpoint.is_dist_checkpoint(it_dir):
        return "torch_dist"
    if it_dir.is_dir() and any(_RANK_DIR.match(p.name) for p in it_dir.iterdir()):
        return "torch"
    if it_dir.is_dir() and (it_dir / dist_checkpoint.COMMON_FILE).is_file():
        raise InputError(f"torch_dist checkpoint {it_dir} is incomplete: metadata.json is missing (a save that did "
                         "not finish?)")
    raise InputError(f"{it_dir} holds neither a torch_dist checkpoint (metadata.json) nor mp_rank_* folders")


def torch_grid(it_dir: Path) -> tuple[int, int]:
    """(TP, PP) of a torch-format iteration folder, from its mp_rank_TT[_PPP] folder names."""
    ranks = [m.groups() for p in Path(it_dir).iterdir() if (m := _RANK_DIR.match(p.name))]
    return max(int(t) for t, _ in ranks) + 1, max(int(q or 0) for _, q in ranks) + 1


@dataclass
class Start:
    """Where a run starts: the folder and iteration to read, its format, and what comes from it besides weights."""

    root: Path
    iteration: int | None
    continues: bool  # an sft checkpoint: the step (data position, LR schedule) continues from it
    resumes: bool  # optimizer (fp32 master weights, Adam moments), scheduler and RNG come from it, too
    fmt: str = "torch"

    @property
    def step(self) -> int:
        return (self.iteration or 0) if self.continues else 0

    @property
    def it_dir(self) -> Path:
        return iteration_dir(self.root, self.iteration)


def find_start(load: Path, output: Path, *, resume: bool, weights_only: bool = False) -> Start:
    """`--resume` continues `output`; otherwise `load` (a converted checkpoint, or an sft output, which continues).

    `weights_only` (Megatron-LM's --no-load-optim --no-load-rng): weights and step only, fresh optimizer state.
    """
    root = Path(output if resume else load)
    if resume and not has_checkpoint(root):
        raise InputError(f"--resume: output folder {root} holds no checkpoint yet; start without --resume")
    iteration = read_tracker(root)
    manifest = read_manifest(root) or {}
    continues = bool(manifest.get("sft")) and iteration is not None
    return Start(root=root, iteration=iteration, continues=continues, resumes=continues and not weights_only,
                 fmt=checkpoint_format(iteration_dir(root, iteration)))


def foreign_manifest(root: Path, model_config: str | None, *, tp: int) -> dict:
    """The manifest sft needs (spec, padded vocab) for a torch-format checkpoint megallama did not write: any
    dialect (legacy, TE, the forks), its architecture from its args or `model_config` (load_model_config, for
    the forks' args-less checkpoints). The ranks load it through the same reader (`foreign_rank_state`) at any
    TP x PP, so the vocab is padded as Megatron-LM pads it for this run's TP. No collectives."""
    from megallama.formats.megatron.torch_format import open_megatron
    from megallama.spec import padded_vocab_size

    it_dir = iteration_dir(root, read_tracker(root))
    if checkpoint_format(it_dir) != "torch":
        raise InputError(f"{root} has no megallama.json with the model spec: convert the checkpoint with "
                         "`megallama convert megatron2megatron` (or point load at an sft output)")
    with open_megatron(root, model_config=model_config) as reader:
        spec = reader.spec
    return {"format": "megatron", "spec": spec.to_dict(), "vocab_size": spec.vocab_size,
            "padded_vocab_size": padded_vocab_size(spec.vocab_size, tp), "divisible_by": 128}


def foreign_rank_state(root: Path, model_config: str | None, spec: ModelSpec, *, padded: int) -> dict:
    """This rank's `{"model": local-spec state dict}` of a checkpoint `foreign_manifest` described, re-split from
    the reader's canonical tensors (one model engine for every dialect). No collectives."""
    from megatron.core import parallel_state as ps

    from megallama.formats.megatron.torch_format import open_megatron, rank_state_dict

    with open_megatron(root, model_config=model_config) as reader:
        return {"model": rank_state_dict(reader, spec, tp_rank=ps.get_tensor_model_parallel_rank(),
                                         tp=ps.get_tensor_model_parallel_world_size(),
                                         pp_rank=ps.get_pipeline_model_parallel_rank(),
                                         pp=ps.get_pipeline_model_parallel_world_size(), padded_vocab_size=padded)}


def remove_uncommitted(root: Path) -> list[Path]:
    """Iteration folders newer than the tracker's (a save killed midway), removed; no collectives."""
    root = Path(root)
    committed = (read_tracker(root) or 0) if has_checkpoint(root) else -1  # `release` counts as iteration 0
    stale = sorted(p for p in root.glob("iter_*") if (m := _ITERATION.match(p.name)) and p.is_dir()
                   and int(m.group(1)) > committed)
    for folder in stale:
        shutil.rmtree(folder)
    return stale


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
def save_checkpoint(root: Path, step: int, *, fmt: str, model, optimizer, scheduler, spec: ModelSpec,
                    base_manifest: dict, tokenizer_dir: Path | None, seq_length: int, consumed_samples: int,
                    distributed_optimizer: bool, optim_fully_reshardable: bool, train_args: dict,
                    peft_record=None) -> list[Path]:
    """Write `iter_{step:07d}` in `fmt`; the tracker moves to it only after every rank is done.

    `model` is the bare GPTModel (no DDP / Float16Module wrapper), so keys match pth2megatron's. Returns the
    half-written iteration folders of an earlier, killed save that were removed first. With `peft_record` (a
    LoRA/DoRA run) only the adapters and their optimizer state are saved, with peft.json (megallama.peft.store).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    root = Path(root)
    rank0 = dist.get_rank() == 0
    removed = remove_uncommitted(root) if rank0 else []
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    saved_spec = spec.replace(dtype=_dtype_name(next(model.parameters()).dtype))
    tokenizer_type, tokenizer_model = detect_tokenizer(_tokenizer_files(tokenizer_dir), root.resolve())
    dp = ps.get_data_parallel_world_size()
    args = megatron_args(saved_spec, tp=tp, pp=pp, padded_vocab_size=base_manifest["padded_vocab_size"],
                         divisible_by=base_manifest.get("divisible_by", 128), iteration=step,
                         tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, seq_length=seq_length,
                         consumed_train_samples=consumed_samples, ckpt_format=fmt, use_dist_ckpt=fmt != "torch",
                         dist_ckpt_optim_fully_reshardable=optim_fully_reshardable, data_parallel_size=dp,
                         world_size=tp * pp * dp, no_save_optim=False, no_save_rng=False, **train_args)
    rng_states = _gather_rng_states()
    dist.barrier()  # stale folders are gone before anyone writes
    if fmt == "torch_dist":
        dist_checkpoint.save(iteration_dir(root, step), model=model, optimizer=optimizer, scheduler=scheduler,
                             args=args, iteration=step, rng_states=rng_states,
                             distributed_optimizer=distributed_optimizer, fully_reshardable=optim_fully_reshardable,
                             before_commit=partial(_kill_hook, step),
                             model_keys=None if peft_record is None else _is_adapter_key)
    else:
        _save_torch(root, step, model=model, optimizer=optimizer, scheduler=scheduler, args=args,
                    rng_states=rng_states, consumed_samples=consumed_samples,
                    distributed_optimizer=distributed_optimizer)
        dist.barrier()
        _kill_hook(step)
    dist.barrier()
    if rank0:
        if peft_record is not None:
            from megallama.peft.store import write_record

            write_record(iteration_dir(root, step), peft_record)
            base_manifest = {**base_manifest, "peft": peft_record.to_json()}
        _write_folder_files(root, step, saved_spec, base_manifest, tokenizer_dir, args, fmt=fmt, tp=tp, pp=pp)
        _commit(root, step)
    dist.barrier()
    return removed


def _is_adapter_key(key: str) -> bool:
    from megallama.peft.lora import is_adapter_key

    return is_adapter_key(key)


def _save_torch(root: Path, step: int, *, model, optimizer, scheduler, args, rng_states: list,
                consumed_samples: int, distributed_optimizer: bool) -> None:
    """One model_optim_rng.pt per model-parallel rank (DP rank 0), plus the distributed optimizer's shards."""
    from megatron.core import parallel_state as ps

    path = rank_path(root, step, tp_rank=ps.get_tensor_model_parallel_rank(),
                     pp_rank=ps.get_pipeline_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_world_size())
    writer = ps.get_data_parallel_rank() == 0
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
    if distributed_optimizer:  # gathers the optimizer shards of the DP group onto DP rank 0
        optimizer.save_parameter_state(str(path.parent / DISTRIB_OPTIM_FILE))
    if writer:
        torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": step,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "opt_param_scheduler": scheduler.state_dict(), "rng_state": rng_states,
                    "sft": {"step": step, "consumed_samples": consumed_samples}}, path)


def _kill_hook(step: int) -> None:
    """Test-only (MEGALLAMA_TEST_KILL_IN_SAVE=STEP): rank 0 dies by SIGKILL with this save half done."""
    import torch.distributed as dist

    if os.environ.get(KILL_IN_SAVE) == str(step) and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _commit(root: Path, step: int) -> None:
    """Point the tracker at `step`: write a temporary file, then rename it over the old one (atomic on POSIX)."""
    tmp = root / f".{TRACKER}.tmp"
    tmp.write_text(str(step))
    os.replace(tmp, root / TRACKER)


def _write_folder_files(root: Path, step: int, spec: ModelSpec, base: dict, tokenizer_dir: Path | None,
                        args, *, fmt: str, tp: int, pp: int) -> None:
    """Rank 0 only: manifest, launch flags and tokenizer, beside the iteration folders."""
    for f in _tokenizer_files(tokenizer_dir):
        if not (root / f.name).exists():
            shutil.copy2(f, root / f.name)
    manifest = {**base, "tool": "megallama", "version": __version__, "format": "megatron", "ckpt_format": fmt,
                "tp": tp, "pp": pp, "spec": spec.to_dict(), "iteration": step, "sft": {"step": step}}
    _write_atomic(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _write_atomic(root / ARGS_FILE, "\n".join(launch_flags(args, load_dir=root.resolve())) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
def check_resume(start: Start, *, tp: int, pp: int, distributed_optimizer: bool, precision: str) -> None:
    """InputError when the optimizer state `start` resumes cannot be loaded by this run (no collectives).

    torch_dist re-shards weights to any TP x PP x DP; the optimizer state only where megatron-core can
    (dist_checkpoint.optimizer_reshard_problem). The torch format is checked against its TP x PP by the CLI.
    """
    if not start.resumes or start.fmt != "torch_dist":
        return
    problem = dist_checkpoint.optimizer_reshard_problem(dist_checkpoint.read_common(start.it_dir), tp=tp, pp=pp,
                                                        distributed_optimizer=distributed_optimizer,
                                                        precision=precision)
    if problem:
        raise InputError(f"cannot resume the optimizer state of {start.it_dir}: {problem}; or add "
                         f"--resume-weights-only to continue from its weights at step {start.step} with a fresh "
                         "optimizer state (Megatron-LM's --no-load-optim --no-load-rng)")


def restore(start: Start, state: dict | None, *, model, optimizer, scheduler, distributed_optimizer: bool) -> list[str]:
    """Once the optimizer exists: torch_dist weights (torch-format ones are loaded before wrapping, `state` is
    their rank file), then whatever `start` resumes. Returns notes for the log."""
    notes = []
    if start.fmt == "torch_dist":
        notes = _restore_dist(start, model=model, optimizer=optimizer, scheduler=scheduler)
    elif start.resumes:
        restore_training_state(start, state, optimizer=optimizer, scheduler=scheduler,
                               distributed_optimizer=distributed_optimizer)
    if not start.resumes:
        optimizer.reload_model_params()  # fp32 master weights from the loaded weights (formats.md P19)
        scheduler.step(start.step)  # a weights-only resume keeps its place in the LR schedule
    return notes


def _restore_dist(start: Start, *, model, optimizer, scheduler) -> list[str]:
    from megatron.core import parallel_state as ps

    saved = dist_checkpoint.saved_grid(dist_checkpoint.read_common(start.it_dir))
    here = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    with_rng = start.resumes and saved == here  # as Megatron-LM: RNG states belong to one TP x PP layout
    loaded = dist_checkpoint.load(start.it_dir, model=model, optimizer=optimizer if start.resumes else None,
                                  rng_state=rng_state() if with_rng else None)
    load_model(model, loaded)
    notes = []
    if start.resumes:
        dist_checkpoint.load_optimizer(optimizer, loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if with_rng:
            _restore_rng(loaded["rng_state"])
        else:
            notes.append(f"RNG state not restored: it was saved at TP={saved[0]} PP={saved[1]}")
    return notes


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
    if state.get("rng_state"):
        _restore_rng(state["rng_state"])


def _restore_rng(states: list[dict]) -> None:
    """This DP rank's entry when every DP rank's state was saved, else entry 0 (Megatron-LM's rule)."""
    from megatron.core import parallel_state as ps

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
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
