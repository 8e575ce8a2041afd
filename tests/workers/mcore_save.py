"""A torch_dist checkpoint written by megatron-core itself, the way Megatron-LM's training saves one.

Each rank builds the project's GPTModel at the case's TP x PP, loads its torch-format rank file (the known source
weights), wraps it in megatron-core's DDP, takes one Adam step with zero gradients (so the optimizer has state),
and calls `dist_checkpointing.save` on Megatron-LM's top-level dict: args, checkpoint_version, iteration, the
model's sharded state dict, the optimizer's, and the RNG state as a ShardedObject, into `iter_NNNNNNN/` with the
tracker written last. No megallama.json: a reader must work from common.pt's args and the tensor shapes.

Case options: "model_only" saves only args, checkpoint_version, iteration and the model (what a converter writes,
Megatron-LM's --no-save-optim --no-save-rng); "fully_parallel" wraps the save strategy in megatron-core's
FullyParallelSaveStrategyWrapper over the DP group (Megatron-LM's --ckpt-fully-parallel-save, its default);
"singleton_local_shards" keeps each layer under its own number instead of stacking the layers.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_case(case: dict) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megallama.engine.model import build_gpt_model
    from megallama.engine.runtime import init_distributed
    from megallama.formats.megatron.local import megatron_args
    from megallama.formats.megatron.torch_format import MODEL_FILE, checkpoint_dir, load_rank_file
    from megallama.spec import ModelSpec

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    tp, pp = case["tp"], case["pp"]
    init_distributed(tp=tp, pp=pp, seed=1234)
    spec = ModelSpec.from_dict(case["spec"])
    gpt = build_gpt_model(spec, padded_vocab_size=case["padded"], dtype="float32")
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    gpt.load_state_dict(load_rank_file(checkpoint_dir(Path(case["source"]), None, tp_rank, pp_rank, pp)
                                       / MODEL_FILE)["model"], strict=True)
    model = DistributedDataParallel(config=gpt.config, module=gpt,
                                    ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.0, weight_decay=0.0,
                                                       params_dtype=torch.float32), [model])
    model.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()  # lr 0, zero grads: the weights stay the source's, the optimizer gets exp_avg/exp_avg_sq

    iteration = case["iteration"]
    args = megatron_args(spec, tp=tp, pp=pp, padded_vocab_size=case["padded"], divisible_by=128,
                         iteration=iteration, ckpt_format="torch_dist")
    content = {"singleton_local_shards": bool(case.get("singleton_local_shards")), "chained_optim_avoid_prefix": True}
    # Megatron-LM's save_checkpoint unwraps DDP / Float16Module first
    model_sd = gpt.sharded_state_dict(metadata=dict(content))
    state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model_sd}
    if not case.get("model_only"):
        rng = ShardedObject("rng_state", [{"random_rng_state": torch.get_rng_state()}], (pp, tp), (pp_rank, tp_rank),
                            replica_id=ps.get_data_parallel_rank())
        state |= {"optimizer": optimizer.sharded_state_dict(model_sd, metadata=dict(content)), "rng_state": rng,
                  "num_floating_point_operations_so_far": 0}
    strategy = None
    if case.get("fully_parallel"):
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                                    ps.get_data_parallel_group(with_context_parallel=True))
    root = Path(case["ckpt"])
    it_dir = root / f"iter_{iteration:07d}"
    if dist.get_rank() == 0:
        it_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(it_dir), strategy, content_metadata=content)
    if dist.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.barrier()
