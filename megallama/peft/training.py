"""What `sft` does differently for a LoRA / DoRA run (called from megallama/sft/train.py and cli/sft.py).

Model: the base weights from the record's base checkpoint (torch per-rank files or torch_dist), then adapters
(megallama.peft.lora), base frozen. Checkpoints: the adapters and their optimizer state only (torch_dist, so
they load at any TP x PP), with peft.json. Resume: base again from the base checkpoint, adapters, optimizer,
schedule and RNG from the run's own checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from megallama.errors import InputError
from megallama.peft.config import PeftConfig, peft_config, trainable_parameters
from megallama.peft.store import PeftRecord, base_fingerprint, check_base, is_peft_run, read_record


# ---------------------------------------------------------------- before launch (CLI, no collectives)
def base_folder(cfg: dict) -> Path:
    """The base checkpoint of a LoRA run: `load`, or the record's base when `load` is the run itself."""
    load, output = Path(cfg["load"]).resolve(), Path(cfg["output"]).resolve()
    if load == output:
        return Path(read_record(output).base_path)
    return load


def check_record(cfg: dict, record: PeftRecord) -> None:
    """A resumed LoRA run keeps its adapter's shape: method, rank, alpha, dropout and targets as recorded."""
    peft = peft_config(cfg["peft"])
    mine = {"method": peft.method, "rank": peft.rank, "alpha": peft.alpha, "dropout": peft.dropout,
            "targets": tuple(peft.targets)}
    theirs = {k: getattr(record, k) for k in mine}
    wrong = [f"peft.{k}={theirs[k]!r} (config has {mine[k]!r})" for k in mine if mine[k] != theirs[k]]
    if wrong:
        raise InputError(f"cannot resume {cfg['output']}: its adapter was trained with {', '.join(wrong)}; "
                         "use the recorded values")


def prepare_run(cfg: dict) -> tuple[Path, PeftRecord]:
    """(base folder, record) of a LoRA run about to start or resume; InputError for a wrong base, a LoRA run
    given as base, or a resumed run whose adapter settings changed."""
    peft = peft_config(cfg["peft"])
    output = Path(cfg["output"]).resolve()
    if cfg["resume"]:
        if not is_peft_run(output):
            raise InputError(f"--resume with peft.method={peft.method}: {output} is a full fine-tuning run; "
                             "resume it with peft.method=none")
        record = read_record(output)
        check_record(cfg, record)
        base = base_folder(cfg)
        check_base(record, base)
        return base, record
    base = Path(cfg["load"]).resolve()
    if is_peft_run(base):
        raise InputError(f"load {base} is a LoRA/DoRA run, not a base model: set load to its base "
                         f"({read_record(base).base_path}) and pass --resume with output={base} to continue it")
    if peft.init_from:  # refused here, before launch, when it does not fit
        from megallama.peft.store import open_any

        with open_any(base) as reader:
            init_from_adapter(Path(peft.init_from), reader.spec, peft)
    record = PeftRecord(method=peft.method, rank=peft.rank, alpha=peft.alpha, dropout=peft.dropout,
                        targets=tuple(peft.targets), base_path=str(base), base_fingerprint=base_fingerprint(base))
    return base, record


def plan_rows(cfg: dict, spec, *, dp: int) -> list[tuple[str, str]]:
    """Dry-run table rows: what is trained, and the optimizer state it needs (Adam: 2 fp32 moments, plus an fp32
    master copy in bf16/fp16; the distributed optimizer splits it over DP)."""
    from megallama.names import expected_shapes

    total = sum(_numel(s) for s in expected_shapes(spec).values())
    peft = peft_config(cfg.get("peft"))
    trainable = trainable_parameters(spec, peft) if peft.enabled else total
    per_param = 8 + (4 if cfg["train"]["precision"] != "fp32" else 0)
    shards = dp if cfg["parallel"]["distributed_optimizer"] else 1
    state = trainable * per_param
    rows = [("trainable", f"{trainable:,} of {total + (trainable if peft.enabled else 0):,} parameters "
                          f"({trainable / (total + (trainable if peft.enabled else 0)):.2%})"),
            ("optimizer state", f"{_gib(state)} in all, {_gib(state / shards)} per model replica rank "
                                f"({per_param} bytes per trainable parameter)")]
    if peft.enabled:
        rows.insert(0, ("peft", f"{peft.method} rank {peft.rank} alpha {peft.alpha:g} (scale {peft.scale:g}) "
                                f"dropout {peft.dropout:g} on {', '.join(peft.targets)}; base frozen"))
    return rows


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------- in the workers (collective)
def build_adapted(gpt, cfg: dict, peft: PeftConfig, spec) -> PeftRecord:
    """Base weights into this rank's bare GPTModel, then adapters on it (base frozen); returns the record."""
    from megallama.peft.lora import apply_adapters, load_full_adapters
    from megallama.sft import checkpoint as ckpt
    from megallama.sft import dist_checkpoint

    output = Path(cfg["output"])
    record = read_record(output)
    base = Path(record.base_path) if Path(cfg["load"]).resolve() == output.resolve() else Path(cfg["load"])
    start = ckpt.find_start(base, output, resume=False)
    if start.fmt == "torch":
        ckpt.load_model(gpt, ckpt.load_rank_state(start))
    else:
        ckpt.load_model(gpt, dist_checkpoint.load(start.it_dir, model=gpt))
    apply_adapters(gpt, peft, seed=cfg["train"]["seed"])
    if peft.init_from and not cfg["resume"]:  # a resumed run's adapters come from its own checkpoint
        load_full_adapters(gpt, init_from_adapter(Path(peft.init_from), spec, peft))
    return record


def init_from_adapter(folder: Path, spec, peft: PeftConfig) -> dict:
    """The full fused adapter tensors of the HF PEFT folder `folder` (peft.init_from) for this run's adapter
    shape: padded to peft.rank, B rescaled so that alpha / rank gives the adapter's own deltas; InputError when
    its method or targets differ from the peft: block."""
    from megallama.peft.hf_adapter import read_peft_adapter

    adapters = read_peft_adapter(folder, spec, rank=peft.rank)
    record = adapters.record
    if record.method != peft.method or tuple(record.targets) != tuple(peft.targets):
        raise InputError(f"peft.init_from {folder} is a {record.method} adapter on {', '.join(record.targets)}; "
                         f"set peft.method={record.method} and peft.targets={','.join(record.targets)}")
    ratio = record.scale / peft.scale
    return {k: v * ratio if k.endswith("linear_out.weight") else v for k, v in adapters.tensors.items()}


def restore(start, *, model, optimizer, scheduler) -> list[str]:
    """Fresh run: master weights from the model, schedule at 0. Resume: the adapters (and optimizer, schedule,
    RNG) from the run's own torch_dist checkpoint, at any TP x PP."""
    from megatron.core import parallel_state as ps

    from megallama.peft.lora import is_adapter_key
    from megallama.sft import checkpoint as ckpt
    from megallama.sft import dist_checkpoint

    if not start.continues:
        optimizer.reload_model_params()
        scheduler.step(0)
        return []
    saved = dist_checkpoint.saved_grid(dist_checkpoint.read_common(start.it_dir))
    here = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    with_rng = start.resumes and saved == here
    loaded = dist_checkpoint.load(start.it_dir, model=model, optimizer=optimizer if start.resumes else None,
                                  rng_state=ckpt.rng_state() if with_rng else None, model_keys=is_adapter_key)
    load_adapter_state(model, loaded["model"])
    notes = []
    if start.resumes:
        dist_checkpoint.load_optimizer(optimizer, loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if with_rng:
            ckpt._restore_rng(loaded["rng_state"])
        else:
            notes.append(f"RNG state not restored: it was saved at TP={saved[0]} PP={saved[1]}")
    else:
        optimizer.reload_model_params()
        scheduler.step(start.step)
    return notes


def load_adapter_state(model, state: dict) -> None:
    """Strict for the adapters: every adapter tensor of this rank comes from `state`, nothing else does."""
    from megallama.peft.lora import is_adapter_key

    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if is_adapter_key(k)]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise InputError(f"adapter checkpoint does not fit this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
