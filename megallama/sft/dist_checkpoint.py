"""SFT checkpoints in torch_dist, Megatron-LM's default format, written and read by megatron-core's dist_checkpointing.

    iter_0000200/
      __R_0.distcp, __R_1.distcp   PyTorch DCP data of rank R: weights, optimizer state, RNG (a ShardedObject)
      .metadata                    PyTorch DCP index of every shard, written when all ranks are done
      common.pt                    args, checkpoint_version 3.0, iteration, opt_param_scheduler, the optimizer's
                                   param groups, num_floating_point_operations_so_far, content_metadata
      metadata.json                {"sharded_backend": "torch_dist", ...}, written last; marks the format

This is what Megatron-LM's `save_checkpoint` writes with `--ckpt-format torch_dist` (formats.md 4.6 and the
torch_dist addendum): the same state dict built from `GPTModel.sharded_state_dict()` and the optimizer's
`sharded_state_dict()`, saved with the default torch_dist strategy. Every weight is stored as its global tensor
(layers stacked, QKV and [gate; up] whole), so a checkpoint loads at any TP x PP x DP.

Optimizer state re-shards as megatron-core allows: the regular optimizer stores it per parameter, like the
weights (any TP x PP x DP); the distributed optimizer stores `dp_reshardable` (Megatron-LM's default: DP may
change, TP x PP may not) or, with `checkpoint.optim_fully_reshardable`, `fully_reshardable` (anything may
change; Megatron-LM's --dist-ckpt-optim-fully-reshardable). `optimizer_reshard_problem` says when it cannot.
Every function here is collective unless it says otherwise.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from megallama.errors import InputError
from megallama.formats.megatron.torch_format import CHECKPOINT_VERSION, load_rank_file

COMMON_FILE = "common.pt"
CONFIG_FILE = "metadata.json"  # dist_checkpointing's CONFIG_FNAME: its presence is how Megatron-LM detects torch_dist
DCP_INDEX = ".metadata"
RESHARDABLE = "fully_reshardable"  # DistributedOptimizer.checkpoint_fully_reshardable_formats


# ---------------------------------------------------------------- what a checkpoint says (no collectives)
def is_dist_checkpoint(it_dir: Path) -> bool:
    return (Path(it_dir) / CONFIG_FILE).is_file()


def missing_files(it_dir: Path) -> list[str]:
    """Files a complete torch_dist iteration folder must hold (a save killed midway lacks `.metadata` and more)."""
    it_dir = Path(it_dir)
    need = [CONFIG_FILE, DCP_INDEX, COMMON_FILE]
    return [name for name in need if not (it_dir / name).is_file()] + \
        ([] if any(it_dir.glob("*.distcp")) else ["*.distcp"])


def read_common(it_dir: Path) -> dict:
    """`common.pt` (args, iteration, scheduler, content metadata), read safely; no collectives."""
    return load_rank_file(Path(it_dir) / COMMON_FILE)


def saved_grid(common: dict) -> tuple[int, int]:
    """(TP, PP) the checkpoint was saved at, from its args (1 x 1 when absent, as Megatron-LM assumes)."""
    args = common.get("args")
    return getattr(args, "tensor_model_parallel_size", 1), getattr(args, "pipeline_model_parallel_size", 1)


def content_metadata(*, distributed_optimizer: bool, fully_reshardable: bool) -> dict:
    """What Megatron-LM's `_build_sharded_state_dict_metadata` records (without the process group)."""
    meta = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed_optimizer:
        meta["distrib_optim_sharding_type"] = RESHARDABLE if fully_reshardable else "dp_reshardable"
    return meta


def optimizer_reshard_problem(common: dict, *, tp: int, pp: int, distributed_optimizer: bool,
                              precision: str) -> str | None:
    """Why the optimizer state in `common`'s checkpoint cannot be loaded by this run, or None (no collectives)."""
    args = common.get("args")
    saved_tp, saved_pp = saved_grid(common)
    sharding = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    if sharding is not None and not distributed_optimizer:
        return "it was saved by the distributed optimizer; set parallel.distributed_optimizer=true"
    if sharding is None and distributed_optimizer:
        return "it was saved without the distributed optimizer; set parallel.distributed_optimizer=false"
    if sharding is not None and sharding != RESHARDABLE and (saved_tp, saved_pp) != (tp, pp):
        return (f"the distributed optimizer saved it as {sharding} at TP={saved_tp} PP={saved_pp}, which megatron-core "
                f"re-shards across DP only; resume at TP={saved_tp} PP={saved_pp}, or save with "
                "checkpoint.optim_fully_reshardable=true")
    saved = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
    if (saved == "fp32") != (precision == "fp32"):
        return f"it holds {saved} training state and this run trains in {precision}; set train.precision={saved}"
    return None


# ---------------------------------------------------------------- save
def save(it_dir: Path, *, model, optimizer, scheduler, args, iteration: int, rng_states: list,
         distributed_optimizer: bool, fully_reshardable: bool, before_commit=None, model_keys=None) -> None:
    """Write `it_dir` as Megatron-LM's save_checkpoint does; `before_commit` runs on every rank once every rank's
    data files are written and before `.metadata` and `metadata.json` are (the crash test's hook).
    `model_keys(key) -> bool` keeps only some model entries (LoRA: the adapters)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    meta = content_metadata(distributed_optimizer=distributed_optimizer, fully_reshardable=fully_reshardable)
    model_sd = _keep(model.sharded_state_dict(metadata=_with_group(meta)), model_keys)
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": model_sd,
             "optimizer": optimizer.sharded_state_dict(model_sd, metadata=_with_group(meta)),
             "opt_param_scheduler": scheduler.state_dict(), "rng_state": _rng_object(rng_states),
             "num_floating_point_operations_so_far": 0}
    if dist.get_rank() == 0:
        Path(it_dir).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    # The async form of the same save, run at once, so that the hook can sit between writing and committing.
    request = dist_checkpointing.save(state, str(it_dir), async_sharded_save=True, content_metadata=meta)
    if before_commit is not None:
        request.finalize_fns.insert(0, before_commit)
    request.execute_sync()


# ---------------------------------------------------------------- load
def load(it_dir: Path, *, model, optimizer=None, rng_state: dict | None = None, model_keys=None) -> dict:
    """The checkpoint's weights for this rank's `model` (any TP x PP x DP), plus the optimizer state when
    `optimizer` is given and the RNG states when `rng_state` (this rank's, as a template) is; and the common
    part (args, iteration, opt_param_scheduler). Raises InputError when the checkpoint does not fit the model."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.safe_globals import SAFE_GLOBALS

    meta = _with_group(dict(read_common(it_dir).get("content_metadata") or {}))
    request = {"model": _keep(model.sharded_state_dict(metadata=meta), model_keys)}
    if optimizer is not None:
        _allocate_torch_adam_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(request["model"], is_loading=True, metadata=meta)
    if rng_state is not None:
        request["rng_state"] = _rng_object([rng_state])
    try:
        # megatron-core unpickles common.pt and the RNG objects with torch.load(weights_only=True); its allow-list
        # is what Megatron-LM registers at start-up (args Namespace, numpy RNG arrays, megatron enums).
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return dist_checkpointing.load(request, str(it_dir))
    except CheckpointingException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"torch_dist checkpoint {it_dir} does not fit this model: {first[:300]}") from None


def load_optimizer(optimizer, state: dict) -> None:
    """`optimizer.load_state_dict` of what `load` returned, then one correct 'step' tensor per parameter.

    Without apex / TE, Adam is torch's, which keeps a 'step' tensor per parameter, and megatron-core's
    distributed optimizer mishandles it: it restores the step from its param groups, then copies each
    parameter's state from the load request over it, with the placeholder step the request was built with
    (dp_reshardable) or none at all (fully_reshardable: KeyError 'step'); and it hands every parameter one
    shared tensor, which torch's Adam would advance once per parameter per step. So while it loads, a missing
    step is copied onto itself, and afterwards each parameter gets its own copy of its group's step. In fp32
    the main-parameter shards are views of parameters that require grad: copies into them need no_grad.
    """
    distributed = [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer]) if hasattr(opt, "gbuf_ranges")]
    for opt in distributed:
        opt._set_main_param_and_optimizer_states = partial(_set_states_keeping_step, opt,
                                                           opt._set_main_param_and_optimizer_states)
    try:
        with torch.no_grad():
            optimizer.load_state_dict(state)
    finally:
        for opt in distributed:
            del opt._set_main_param_and_optimizer_states  # back to the class's method
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                step = inner.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor):
                    inner.state[param]["step"] = torch.full_like(step, group["step"]) if "step" in group \
                        else step.clone()


def _set_states_keeping_step(opt, original, model_param, tensors: dict) -> None:
    if "step" not in tensors:
        live = opt._get_main_param_and_optimizer_states(model_param)
        if "step" in live:
            tensors = {**tensors, "step": live["step"]}
    original(model_param, tensors)


def _allocate_torch_adam_state(optimizer) -> None:
    """Give a fresh distributed optimizer its torch-Adam state, so that megatron-core can build its load request.

    `DistributedOptimizer.sharded_state_dict(is_loading=True)` starts from `state_dict()`, which without apex /
    TE reads torch Adam's per-parameter 'step' and fails (AssertionError) while the state is still empty. Its
    own `load_state_dict`, given just the param groups, allocates that state (placeholders the load overwrites).
    """
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "step": 0} for g in opt.optimizer.param_groups]
            opt.load_state_dict({"optimizer": {"param_groups": groups}})


def _torch_optimizers(optimizer) -> list:
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _keep(sharded: dict, model_keys) -> dict:
    return sharded if model_keys is None else {k: v for k, v in sharded.items() if model_keys(k)}


def _with_group(meta: dict) -> dict:
    from megatron.core import parallel_state as ps

    return {**meta, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def _rng_object(states: list):
    """RNG states as Megatron-LM's get_rng_state stores them: one object per (PP, TP) rank, written by DP rank 0."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", states,
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
