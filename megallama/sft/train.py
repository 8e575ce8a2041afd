"""The SFT recipe, one copy per rank. Read it top to bottom; megatron-core is the engine, this is the loop.

Launched by `megallama sft` through torchrun (which also writes the resolved config):
    python -m torch.distributed.run --nproc-per-node=N -m megallama.sft.train --config OUTPUT/config.yaml

Phases: 1 distributed setup, 2 the model from the checkpoint, 3 optimizer and LR schedule, 4 data, 5 the loop
(train step, eval, checkpoint), 6 the end. The loss is a sum over trained tokens divided by the number of trained
tokens of the whole global batch (megatron-core's `calculate_per_token_loss`), so how a global batch is split
into micro-batches, accumulation steps and DP ranks does not change the maths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch

import megallama.engine.runtime  # noqa: F401  (filters megatron-core start-up noise before it is imported)
from megallama.errors import InputError, MegallamaError
from megallama.sft.config import load_config
from megallama.sft.data import IGNORE_INDEX
from megallama.spec import normalize_dtype

DATA_CACHE = "tokenized.pt"  # written by the CLI before launch, so ranks do not each tokenize the data


# ================================================================ data (also used by the CLI before launch)
def tokenizer_path(cfg: dict) -> Path:
    return Path(cfg["tokenizer"] or cfg["load"])


def tokenize_splits(cfg: dict, *, vocab_size: int) -> dict:
    """{"train": TokenizedDataset, "eval": TokenizedDataset | None}; InputError on bad data or token ids."""
    from megallama.data.sources import load_source
    from megallama.sft.data import load_tokenizer

    d = cfg["data"]
    path = tokenizer_path(cfg)
    # Pre-tokenized rows need no tokenizer; the model's own, when present, still supplies the padding id.
    has_tokenizer = path.is_file() or any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))
    tokenizer = load_tokenizer(path) if d["format"] not in ("pretokenized", "megatron") or has_tokenizer else None
    kw = dict(fmt=d["format"], tokenizer=tokenizer, seq_length=d["seq_length"],
              train_on_prompt=d["train_on_prompt"], vocab_size=vocab_size)
    # JSON/JSONL files, Parquet, Hub dataset ids, text, indexed-dataset prefixes and blends (megallama.data)
    return {"train": load_source(d["train"], **kw),
            "eval": load_source(d["eval"], **kw) if d["eval"] else None}


def _data_key(cfg: dict) -> dict:
    return {"data": cfg["data"], "tokenizer": str(tokenizer_path(cfg))}


def save_splits(cfg: dict, splits: dict, path: Path) -> None:
    pack = {name: None if ds is None else {"input_ids": ds.input_ids, "labels": ds.labels,
                                           "stats": dataclasses.asdict(ds.stats)}
            for name, ds in splits.items()}
    torch.save({"key": _data_key(cfg), **pack}, path)


def load_splits(cfg: dict, *, vocab_size: int) -> dict:
    """The CLI's tokenized data when it matches this config, else tokenize here."""
    from megallama.sft.data import DataStats, TokenizedDataset

    path = Path(cfg["output"]) / DATA_CACHE
    if path.is_file():
        pack = torch.load(path, weights_only=True)
        if pack["key"] == _data_key(cfg):
            return {name: None if pack[name] is None else
                    TokenizedDataset(pack[name]["input_ids"], pack[name]["labels"], DataStats(**pack[name]["stats"]))
                    for name in ("train", "eval")}
    return tokenize_splits(cfg, vocab_size=vocab_size)


def micro_batch(dataset, indices: list[int]) -> dict:
    """Tensors for one micro-batch; index -1 is a filler row whose tokens carry no loss (partial eval batches)."""
    from megallama.engine.runtime import device

    tokens, labels = dataset.batch([max(i, 0) for i in indices])
    labels[torch.tensor([i < 0 for i in indices])] = IGNORE_INDEX
    loss_mask = (labels != IGNORE_INDEX).float()
    seq = tokens.shape[1]
    position_ids = torch.arange(seq).unsqueeze(0).expand(len(indices), seq)
    # Labels must be valid vocabulary ids for the vocab-parallel cross entropy; the mask drops them anyway.
    batch = {"tokens": tokens, "labels": labels.clamp(min=0), "loss_mask": loss_mask, "position_ids": position_ids}
    return {k: v.to(device()) for k, v in batch.items()}


def packed_batch(dataset, lengths: list[int], rows: list[list[int]], seq_length: int) -> dict:
    """One packed micro-batch (megallama.sft.packing): [1, rows x seq_length] tensors and megatron-core's
    PackedSeqParams in the thd format, which the core attention and the rotary embedding follow."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megallama.engine.runtime import device
    from megallama.sft.packing import packed_micro_batch

    batch = packed_micro_batch(dataset.input_ids, dataset.labels, lengths, rows, seq_length)
    cu_seqlens, max_seqlen = batch.pop("cu_seqlens").to(device()), batch.pop("max_seqlen")
    batch = {k: v.to(device()) for k, v in batch.items()}
    batch["packed"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                      max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    return batch


def eval_batches(num_samples: int, *, global_batch_size: int, eval_steps: int) -> list[list[int]]:
    """The same leading samples at every eval, each once; the last batch is filled with -1 (no loss)."""
    n = min(num_samples, eval_steps * global_batch_size)
    indices = list(range(n)) + [-1] * (-n % global_batch_size)
    return [indices[k: k + global_batch_size] for k in range(0, len(indices), global_batch_size)]


# ================================================================ one step through megatron-core's schedule
def loss_func(batch: dict, seq_length: int, output_tensor: torch.Tensor):
    """(loss to backpropagate, trained tokens, report); `finalize_grads` divides by the global token count.

    `output_tensor` is the model's per-token cross entropy [b, s] over the true vocabulary (LlamaGPTModel).
    The backward loss is the token-loss sum / seq_length, not the plain sum: with fp16 loss scaling a sum over a
    whole micro-batch overflows the scaled gradients; `finalize_grads` multiplies seq_length back in.
    """
    loss_mask = batch["loss_mask"]
    loss_sum = (output_tensor * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum / seq_length, num_tokens, {"loss": report}


def finalize_grads(seq_length: int, model, num_tokens, **kwargs):
    """megatron-core's finaliser (DP all-reduce, embedding sync, grads / tokens of the global batch), with the
    1 / seq_length of `loss_func` undone by dividing by tokens / seq_length."""
    from megatron.core.distributed import finalize_model_grads

    tokens = None if num_tokens is None else num_tokens.double() / seq_length
    finalize_model_grads(model, tokens, **kwargs)


def forward_step(seq_length: int, data_iterator, model):
    batch = next(data_iterator)
    # last stage: per-token losses [b, s]; packed: b = 1 and s = rows x seq_length
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   packed_seq_params=batch.get("packed"))
    return output, partial(loss_func, batch, seq_length)


def run_schedule(model, batches: list[dict], *, seq_length: int, forward_only: bool):
    """Forward (and backward) over this rank's micro-batches; returns (loss sum, tokens) of the global batch."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows, length = batches[0]["tokens"].shape  # what the pipeline sends between stages: [length, rows, hidden]
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, seq_length), data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=length, micro_batch_size=rows, forward_only=forward_only)
    total = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        total += sum(r["loss"].double().cpu() for r in reports)
    # Only the last stage has losses: share them along the pipeline, then add up the DP replicas.
    total = total.to(megallama.engine.runtime.device())
    dist.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total[0]), int(total[1])


def rank_batches(dataset, lengths: list[int], indices: list[int], cfg: dict):
    """(this DP rank's micro-batches of a global batch, the step's StepLayout); every TP and PP rank of the
    replica gets the same. With data.pack the samples share rows (megallama.sft.packing)."""
    from megatron.core import parallel_state as ps

    from megallama.sft.packing import step_layout

    d, micro = cfg["data"], cfg["train"]["micro_batch_size"]
    layout = step_layout(indices, lengths, seq_length=d["seq_length"], micro_batch_size=micro, pack=d["pack"],
                         dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size())
    if d["pack"]:
        return [packed_batch(dataset, lengths, rows, d["seq_length"]) for rows in layout.micro_batches], layout
    return [micro_batch(dataset, part) for part in layout.micro_batches], layout


def train_step(model, optimizer, batches: list[dict], *, cfg: dict):
    """One optimizer step on one global batch: (loss sum, trained tokens, update applied, grad norm)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    loss_sum, tokens = run_schedule(model, batches, seq_length=cfg["data"]["seq_length"], forward_only=False)
    ok, grad_norm, _ = optimizer.step()  # unscale, clip, Adam; fp16: skipped when the grads overflowed
    return loss_sum, tokens, ok, grad_norm


def evaluate(model, dataset, lengths: list[int], cfg: dict) -> tuple[float, int]:
    t = cfg["train"]
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for indices in eval_batches(len(dataset), global_batch_size=t["global_batch_size"], eval_steps=t["eval_steps"]):
            s, n = run_schedule(model, rank_batches(dataset, lengths, indices, cfg)[0],
                                seq_length=cfg["data"]["seq_length"], forward_only=True)
            loss_sum, tokens = loss_sum + s, tokens + n
    return loss_sum / max(tokens, 1), tokens


# ================================================================ the recipe
def train(cfg: dict) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megallama.engine.model import build_gpt_model
    from megallama.engine.runtime import init_distributed
    from megallama.formats.base import read_manifest
    from megallama.peft import training as peft_training
    from megallama.peft.config import peft_config
    from megallama.sft import checkpoint as ckpt
    from megallama.sft.data import global_batches
    from megallama.sft.packing import sample_lengths
    from megallama.sft.report import Reporter
    from megallama.spec import ModelSpec

    d, p, t = cfg["data"], cfg["parallel"], cfg["train"]
    output = Path(cfg["output"])

    # ---------------------------------------------------------------- 1. distributed setup
    init_distributed(tp=p["tp"], pp=p["pp"], seed=t["seed"], ep=p.get("ep", 1))
    world = dist.get_world_size()
    if world != p["tp"] * p["pp"] * p["dp"]:
        raise InputError(f"world size {world} is not TP x PP x DP = {p['tp']}x{p['pp']}x{p['dp']}")
    rank0 = dist.get_rank() == 0

    # ---------------------------------------------------------------- 2. the model, from the checkpoint's manifest
    start = ckpt.find_start(Path(cfg["load"]), output, resume=cfg["resume"], weights_only=cfg["resume_weights_only"])
    peft = peft_config(cfg.get("peft"))
    if peft.enabled and not cfg["resume"]:  # a new LoRA run starts at step 0 from whatever base `load` holds
        start = dataclasses.replace(start, continues=False, resumes=False)
    ckpt.check_resume(start, tp=p["tp"], pp=p["pp"], distributed_optimizer=p["distributed_optimizer"],
                      precision=t["precision"])
    manifest = read_manifest(start.root)
    foreign = not (manifest or {}).get("spec")  # another tool's torch-format checkpoint (a dialect, the forks)
    if foreign:
        manifest = ckpt.foreign_manifest(start.root, cfg.get("load_model_config"), tp=p["tp"])
    spec = ModelSpec.from_dict(manifest["spec"])
    gpt = build_gpt_model(spec, padded_vocab_size=manifest["padded_vocab_size"], dtype=normalize_dtype(t["precision"]),
                          attention=t["attention"], sequence_parallel=p["sequence_parallel"],
                          recompute=t["recompute"], calculate_per_token_loss=True,
                          moe={"dispatcher": p.get("moe_dispatcher", "alltoall"),
                               "aux_loss_coeff": t.get("moe_aux_loss_coeff", 0.0),
                               "z_loss_coeff": t.get("moe_z_loss_coeff")})
    peft_record = peft_training.build_adapted(gpt, cfg, peft, spec) if peft.enabled else None  # base frozen, adapters
    state = ckpt.load_rank_state(start) if start.fmt == "torch" and not peft.enabled and not foreign else None
    if foreign:
        state = ckpt.foreign_rank_state(start.root, cfg.get("load_model_config"), spec,
                                        padded=manifest["padded_vocab_size"])
    if state is not None:
        ckpt.load_model(gpt, state)  # before wrapping: DDP moves the parameters into its buffers
    model = wrap_model(gpt, distributed_optimizer=p["distributed_optimizer"])

    # ---------------------------------------------------------------- 3. optimizer and LR schedule
    optimizer, scheduler = build_optimizer(model, cfg)  # LoRA: only the adapters require grad
    # torch_dist weights (any TP x PP x DP), then the optimizer, schedule and RNG when resuming
    if peft.enabled:
        notes = peft_training.restore(start, model=gpt, optimizer=optimizer, scheduler=scheduler)
    else:
        notes = ckpt.restore(start, state, model=gpt, optimizer=optimizer, scheduler=scheduler,
                             distributed_optimizer=p["distributed_optimizer"])
    del state
    config = model.config  # how megatron-core's schedule reaches DDP, loss scaling and the grad finaliser
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = partial(finalize_grads, d["seq_length"])
    config.no_sync_func = model.no_sync

    # ---------------------------------------------------------------- 4. data
    splits = load_splits(cfg, vocab_size=spec.vocab_size)
    train_set, eval_set = splits["train"], splits["eval"]
    train_lengths = sample_lengths(train_set.labels)
    eval_lengths = None if eval_set is None else sample_lengths(eval_set.labels)
    batches = global_batches(len(train_set), global_batch_size=t["global_batch_size"], seed=t["seed"],
                             start_step=start.step)
    reporter = Reporter(output, steps=t["steps"], start_step=start.step, enabled=rank0, cfg=cfg)
    if rank0:
        how = "resuming" if start.resumes else "resuming (weights only)" if start.continues else "starting"
        reporter.line(f"sft: world {world} = TP {p['tp']} x PP {p['pp']} x DP {p['dp']}, {how} at step "
                      f"{start.step} of {t['steps']} from {start.root} ({start.fmt}); {len(train_set)} train samples")
        for note in notes:
            reporter.line(f"note: {note}")

    # ---------------------------------------------------------------- 5. the loop
    save_kw = dict(fmt=cfg["checkpoint"]["format"], model=gpt, optimizer=optimizer, scheduler=scheduler, spec=spec,
                   base_manifest=manifest, tokenizer_dir=tokenizer_path(cfg), seq_length=d["seq_length"],
                   distributed_optimizer=p["distributed_optimizer"],
                   optim_fully_reshardable=cfg["checkpoint"]["optim_fully_reshardable"], train_args=_train_args(cfg),
                   peft_record=peft_record)
    step, last_eval, last_save = start.step, None, None
    with reporter:
        for step in range(start.step + 1, t["steps"] + 1):
            scheduler.step(1)  # the LR of step s is the schedule at s (warmup starts above zero)
            tic = time.perf_counter()
            step_batches, layout = rank_batches(train_set, train_lengths, next(batches), cfg)
            loss_sum, tokens, ok, grad_norm = train_step(model, optimizer, step_batches, cfg=cfg)
            seconds = time.perf_counter() - tic
            # tokens_per_s: token slots (rows x seq_length, padding included); trained: tokens with a loss
            record = {"step": step, "loss": loss_sum / max(tokens, 1), "lr": optimizer.param_groups[0]["lr"],
                      "tokens_per_s": layout.slots / seconds, "trained_tokens_per_s": tokens / seconds,
                      "pad_fraction": layout.pad_fraction,
                      "grad_norm": None if grad_norm is None else float(grad_norm), "loss_tokens": tokens,
                      "step_time_s": seconds}
            if t["precision"] == "fp16":
                record.update(loss_scale=float(optimizer.get_loss_scale()), skipped=not ok)
            reporter.train(record, log=step % t["log_interval"] == 0 or step == t["steps"])

            if eval_set is not None and step % t["eval_interval"] == 0:
                reporter.eval(step, *evaluate(model, eval_set, eval_lengths, cfg))
                last_eval = step
            if step % t["save_interval"] == 0:
                save(output, step, reporter, consumed_samples=step * t["global_batch_size"], **save_kw)
                last_save = step

        # ------------------------------------------------------------ 6. the end: final eval, checkpoint, plot
        if eval_set is not None and last_eval != step and step > start.step:
            reporter.eval(step, *evaluate(model, eval_set, eval_lengths, cfg))
        if last_save != step and step > start.step:
            save(output, step, reporter, consumed_samples=step * t["global_batch_size"], **save_kw)
    reporter.finish(output)
    if ps.model_parallel_is_initialized():
        dist.barrier()


# ================================================================ building blocks of the recipe
def save(output: Path, step: int, reporter, **kw) -> None:
    from megallama.sft import checkpoint as ckpt

    for folder in ckpt.save_checkpoint(output, step, **kw):
        reporter.line(f"removed {folder.name}: a checkpoint save that never finished (the tracker did not name it)")
    reporter.saved(step)


def wrap_model(gpt, *, distributed_optimizer: bool):
    """Float16Module for bf16/fp16 (casts inputs and the loss), then megatron-core's DDP with fp32 grad buffers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = gpt.config
    module = Float16Module(config, gpt) if (config.fp16 or config.bf16) else gpt
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed_optimizer)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)


def build_optimizer(model, cfg: dict):
    """megatron-core's Adam (fp32 master weights and loss scaling in mixed precision) and its LR scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megallama.engine.model import TORCH_DTYPES

    t = cfg["train"]
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t["lr"], min_lr=t["min_lr"], weight_decay=t["weight_decay"],
        adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"], adam_eps=t["adam_eps"], clip_grad=t["clip_grad"],
        fp16=t["precision"] == "fp16", bf16=t["precision"] == "bf16",
        params_dtype=TORCH_DTYPES[normalize_dtype(t["precision"])], initial_loss_scale=t["initial_loss_scale"],
        loss_scale=t["loss_scale"], use_distributed_optimizer=cfg["parallel"]["distributed_optimizer"])
    optimizer = get_megatron_optimizer(opt_config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t["lr"], min_lr=t["min_lr"], lr_warmup_steps=t["warmup_steps"],
        lr_decay_steps=t["steps"], lr_decay_style=t["decay_style"], start_wd=t["weight_decay"],
        end_wd=t["weight_decay"], wd_incr_steps=t["steps"], wd_incr_style="constant")
    return optimizer, scheduler


def _train_args(cfg: dict) -> dict:
    """Training fields recorded in the checkpoint's Megatron `args`, as Megatron-LM would."""
    t = cfg["train"]
    return {"micro_batch_size": t["micro_batch_size"], "global_batch_size": t["global_batch_size"],
            "lr": t["lr"], "min_lr": t["min_lr"], "lr_decay_style": t["decay_style"],
            "lr_warmup_iters": t["warmup_steps"], "train_iters": t["steps"], "weight_decay": t["weight_decay"],
            "adam_beta1": t["adam_beta1"], "adam_beta2": t["adam_beta2"], "clip_grad": t["clip_grad"],
            "seed": t["seed"], "use_distributed_optimizer": cfg["parallel"]["distributed_optimizer"],
            "sequence_parallel": cfg["parallel"]["sequence_parallel"]}


# ================================================================ entry point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One rank of `megallama sft` (start it with torchrun).")
    parser.add_argument("--config", required=True, type=Path, help="resolved config.yaml written by megallama sft")
    args = parser.parse_args(argv)
    from megallama.engine.runtime import destroy_distributed

    for noise in ("The .grad attribute of a Tensor that is not a leaf", ".*is deprecated. Please use",
                  "Please use DTensor instead and we are deprecating ShardedTensor",
                  "`load_state_dict` is deprecated and will be removed"):
        warnings.filterwarnings("ignore", message=noise)  # raised inside megatron-core / torch, harmless here
    try:
        train(load_config(args.config))
    except MegallamaError as e:
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        # torchrun reports any failing rank as exit 1; this file lets the CLI keep "bad input" as exit 2.
        (args.config.parent / f"error-rank{rank}.json").write_text(
            json.dumps({"message": str(e), "exit_code": e.exit_code}))
        return e.exit_code
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
