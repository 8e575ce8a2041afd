"""The SFT config: DESIGN.md's YAML as defaults, `section.key=value` overrides, validation, and the run plan.

A config is a plain nested dict (what YAML gives), so the resolved file the workers read is the same YAML a
user writes. Every leaf has a type, taken from its default or from `TYPES` where the default is null, and
values from the file and from the command line are coerced to it (PyYAML reads `2e-5` as a string).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megallama.errors import InputError

# DESIGN.md's config, plus the megatron-core switches (parallel.*, train.recompute) and precision details.
DEFAULTS: dict = {
    "load": None,  # Megatron folder from pth2megatron, or an earlier sft output (continues it)
    "load_model_config": None,  # --model-config of `load`: config.json / params.json / folder / Hub id (the forks)
    "tokenizer": None,  # default: the tokenizer stored with the checkpoint
    "resume": False,  # continue from the latest checkpoint in `output`
    "resume_weights_only": False,  # with resume: weights and step only, fresh optimizer (--no-load-optim --no-load-rng)
    "data": {
        "train": None,
        "eval": None,
        "format": "alpaca",  # alpaca | messages | pretokenized | text | megatron (megallama.data.sources)
        "seq_length": 2048,
        "train_on_prompt": False,
        "pack": False,  # several samples per seq_length row, attention kept within each (sdpa or te attention)
    },
    "parallel": {
        "tp": 4,
        "pp": 2,
        "dp": None,  # null: world size / (tp * pp)
        "sequence_parallel": False,
        "distributed_optimizer": False,
        "ep": 1,  # expert parallelism (Llama 4): the experts split over EP of the DP ranks; torch_dist checkpoints
        "moe_dispatcher": "alltoall",  # alltoall | allgather: megatron-core's MoE token dispatcher
    },
    "train": {
        "micro_batch_size": 2,
        "global_batch_size": 128,
        "steps": 8000,
        "epochs": None,  # when set, replaces `steps` with ceil(epochs * samples / global_batch_size)
        "lr": 2.0e-5,
        "min_lr": 2.0e-6,
        "warmup_steps": 400,
        "decay_style": "cosine",
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_eps": 1.0e-8,
        "clip_grad": 1.0,
        "precision": "bf16",
        "initial_loss_scale": 4294967296.0,  # fp16 only: dynamic loss scaling starts here
        "loss_scale": None,  # fp16 only: a constant loss scale instead of the dynamic one
        "recompute": "none",  # none | selective | full
        "attention": "sdpa",  # sdpa | local | te: the core attention (megallama.engine.model.ATTENTIONS)
        "seed": 1234,
        "moe_aux_loss_coeff": 0.0,  # Llama 4: router load-balancing loss (HF trains without it; Megatron 1e-2)
        "moe_z_loss_coeff": None,  # Llama 4: router z-loss (off)
        "log_interval": 1,
        "eval_interval": 1000,
        "eval_steps": 20,
        "save_interval": 2000,
    },
    "checkpoint": {
        "format": "torch_dist",  # torch_dist (Megatron-LM's default; loads at any TP x PP) | torch (per-rank files)
        "optim_fully_reshardable": False,  # distributed optimizer: store Adam state re-shardable to any TP x PP
    },
    "output": None,
    "logging": {  # besides metrics.jsonl and loss.png (megallama/sft/loggers.py)
        "tensorboard": False,  # event files in OUTPUT/tensorboard/
        "wandb_project": None,  # a W&B run in this project (needs wandb installed)
        "wandb_run_name": None,
    },
    "peft": {  # LoRA / DoRA (megallama/peft/config.py); method none: full fine-tuning
        "method": "none",  # none | lora | dora
        "rank": 16,
        "alpha": 32.0,  # scale = alpha / rank
        "dropout": 0.0,
        "targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],  # or q_proj, ..., down_proj
        "init_from": None,  # an HF PEFT adapter folder to continue training
    },
}
TYPES = {"load": str, "load_model_config": str, "tokenizer": str, "data.train": str, "data.eval": str,
         "parallel.dp": int, "train.epochs": float, "train.loss_scale": float, "output": str,
         "logging.wandb_project": str, "logging.wandb_run_name": str, "train.moe_z_loss_coeff": float,
         "train.moe_aux_loss_coeff": float, "peft.init_from": str}
CHOICES = {
    "data.format": ("alpaca", "messages", "pretokenized", "text", "megatron"),
    "train.decay_style": ("cosine", "linear", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.recompute": ("none", "selective", "full"),
    "train.attention": ("sdpa", "local", "te"),
    "checkpoint.format": ("torch_dist", "torch"),
    "parallel.moe_dispatcher": ("alltoall", "allgather"),
}
POSITIVE = ("data.seq_length", "parallel.tp", "parallel.pp", "parallel.ep", "train.micro_batch_size",
            "train.global_batch_size", "train.steps", "train.log_interval", "train.eval_interval", "train.eval_steps",
            "train.save_interval")
PATH_KEYS = ("load", "load_model_config", "tokenizer", "data.train", "data.eval", "output", "peft.init_from")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


# ---------------------------------------------------------------- flat keys
def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_leaves(value, name + "."))
        else:
            out[name] = value
    return out


KEYS = _leaves(DEFAULTS)


def get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


# ---------------------------------------------------------------- coercion
def coerce(key: str, value):
    """`value` (from YAML or a command-line string) as the type of `key`; None stays None."""
    nulls = ("null", "~", "none") if key in TYPES else ("null", "~")  # "none" is a value of train.recompute
    if value is None or (isinstance(value, str) and value.lower() in nulls):
        return None
    if isinstance(value, list) and key in ("data.train", "data.eval"):  # a blend [0.7, A, 0.3, B]
        from megallama.data.sources import join_source

        return join_source(value)
    kind = TYPES.get(key) or type(KEYS[key])
    if kind is list:  # a YAML list, or "a,b" / "[a, b]" from the command line
        items = value if isinstance(value, list) else str(value).strip().strip("[]").split(",")
        return [str(item).strip() for item in items if str(item).strip()]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in _TRUE + _FALSE:
                raise ValueError
            return text in _TRUE
        if kind in (int, float):
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan and inf parse as floats, and no setting means them
                raise ValueError
            if kind is int:
                if number != int(number):
                    raise ValueError
                return int(number)
            return number
        return str(value)
    except (TypeError, ValueError, OverflowError):
        finite = " (finite)" if kind in (int, float) else ""
        raise InputError(f"config key {key}={value!r}: expected {kind.__name__}{finite}") from None


def _unknown(key: str) -> InputError:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return InputError(f"unknown config key {key!r}{hint}")


# ---------------------------------------------------------------- load
def load_config(path: Path | None, overrides: list[str] = ()) -> dict:
    """DEFAULTS <- YAML file <- `section.key=value` overrides, every value coerced to its type.

    Raises InputError for a missing or unreadable file, unknown keys (all of them at once) and bad values.
    """
    cfg = copy.deepcopy(DEFAULTS)
    given: dict[str, object] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise InputError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise InputError(f"config file {path} is not UTF-8 text: pass a YAML file") from None
        if not isinstance(data, dict):
            raise InputError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
        given.update(_leaves(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r} is not of the form section.key=value")
        given[key.strip()] = value
    unknown = [k for k in given if k not in KEYS]
    if unknown:
        raise InputError("; ".join(str(_unknown(k)) for k in unknown))
    for key, value in given.items():
        _set(cfg, key, coerce(key, value))
    return cfg


def dump_config(cfg: dict, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))


def absolute_paths(cfg: dict) -> dict:
    """Paths resolved against the current folder, so workers do not depend on where they start."""
    from megallama.data.sources import SOURCE_KEYS, absolute_source

    cfg = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        value = get(cfg, key)
        if value is not None and key in SOURCE_KEYS:  # Hub ids and blends as well as paths
            _set(cfg, key, absolute_source(value, cfg["data"]["format"]))
        elif value is not None:
            _set(cfg, key, str(Path(value).expanduser().resolve()))
    return cfg


# ---------------------------------------------------------------- validation
def validate(cfg: dict) -> list[str]:
    """Check the config alone (no checkpoint, no data); raise one InputError listing every problem.

    Returns warnings (e.g. train and eval being the same file).
    """
    problems, warnings = [], []
    for key, choices in CHOICES.items():
        if get(cfg, key) not in choices:
            problems.append(f"{key} is {get(cfg, key)!r}: expected one of {', '.join(choices)}")
    for key in POSITIVE:
        if get(cfg, key) is None or get(cfg, key) < 1:
            problems.append(f"{key} must be >= 1 (got {get(cfg, key)})")
    for key in ("load", "data.train", "output"):
        if not get(cfg, key):
            problems.append(f"{key} is not set: add it to the config or pass {key}=...")
    t = cfg["train"]
    if t["epochs"] is not None and t["epochs"] <= 0:
        problems.append(f"train.epochs must be > 0 (got {t['epochs']})")
    if t["lr"] <= 0 or t["min_lr"] < 0 or t["min_lr"] > t["lr"]:
        problems.append(f"learning rates must satisfy 0 <= min_lr <= lr and lr > 0 (got lr={t['lr']}, "
                        f"min_lr={t['min_lr']})")
    if t["warmup_steps"] < 0 or (t["epochs"] is None and t["steps"] and t["warmup_steps"] >= t["steps"]):
        problems.append(f"train.warmup_steps {t['warmup_steps']} must be >= 0 and below train.steps {t['steps']}")
    if not 0 <= t["adam_beta1"] < 1 or not 0 <= t["adam_beta2"] < 1:
        problems.append("train.adam_beta1 and train.adam_beta2 must lie in [0, 1)")
    if t["weight_decay"] < 0 or t["clip_grad"] < 0:
        problems.append("train.weight_decay and train.clip_grad must be >= 0 (clip_grad 0 turns clipping off)")
    tp, seq_length = cfg["parallel"]["tp"], cfg["data"]["seq_length"]
    if (cfg["parallel"]["sequence_parallel"] and isinstance(tp, int) and tp > 1 and isinstance(seq_length, int)
            and seq_length % tp):
        problems.append(f"parallel.sequence_parallel splits the sequence over TP: data.seq_length {seq_length} "
                        f"is not divisible by TP {tp}; choose a multiple of {tp} or set sequence_parallel to false")
    if cfg["data"]["pack"] and t["attention"] == "local":
        problems.append("data.pack needs train.attention sdpa or te: megatron-core's local DotProductAttention "
                        "refuses packed sequences; set train.attention=sdpa")
    if t["attention"] == "te":
        from megallama.engine.model import check_attention

        try:
            check_attention("te")
        except InputError as e:
            problems.append(str(e))
    if cfg["parallel"]["dp"] is not None and cfg["parallel"]["dp"] < 1:
        problems.append(f"parallel.dp must be >= 1 (got {cfg['parallel']['dp']})")
    for key in ("load", "tokenizer"):
        value = get(cfg, key)
        if value and not Path(value).exists():
            problems.append(f"{key} {value} does not exist")
    from megallama.data.sources import source_problems

    for key in ("data.train", "data.eval"):
        if get(cfg, key):
            problems += [f"{key}: {p}" for p in source_problems(get(cfg, key), cfg["data"]["format"])]
    from megallama.sft.loggers import logging_problems

    problems += logging_problems(cfg)
    from megallama.peft.config import peft_problems

    problems += peft_problems(cfg["peft"])
    if cfg["peft"]["method"] != "none" and cfg["checkpoint"]["format"] != "torch_dist":
        problems.append("peft: adapter checkpoints are torch_dist only; set checkpoint.format=torch_dist")
    if problems:
        raise InputError("; ".join(problems))
    train, evalf = cfg["data"]["train"], cfg["data"]["eval"]
    if evalf and Path(train).resolve() == Path(evalf).resolve():
        warnings.append(f"data.train and data.eval are the same file ({train}): the eval loss is not held out")
    return warnings


# ---------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Everything resolved before launch: world layout, batch split, and the checkpoint's model layout."""

    tp: int
    pp: int
    dp: int
    nnodes: int
    nproc_per_node: int
    micro_batch_size: int
    global_batch_size: int
    accumulation: int
    steps: int
    num_layers: int
    padded_vocab_size: int
    sequence_parallel: bool
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp


def local_devices() -> int | None:
    """GPUs on this node, or None on CPU (where ranks are processes and any count works)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def torchrun_world(extra: list[str]) -> tuple[int | None, int | None]:
    """(--nproc-per-node, --nnodes) when the user passed them after `--`."""
    found: dict[str, int | None] = {"nproc": None, "nnodes": None}
    for i, arg in enumerate(extra):
        for flag, name in (("--nproc-per-node", "nproc"), ("--nproc_per_node", "nproc"), ("--nnodes", "nnodes")):
            value = None
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            elif arg == flag and i + 1 < len(extra):
                value = extra[i + 1]
            if value is not None:
                try:
                    found[name] = int(value)
                except ValueError:
                    raise InputError(f"torchrun {flag} {value!r}: expected an integer") from None
    return found["nproc"], found["nnodes"]


def resolve_plan(cfg: dict, *, num_layers: int, padded_vocab_size: int, num_samples: int | None = None,
                 extra: list[str] = (), devices: int | None = None) -> Plan:
    """World size, DP, accumulation and steps; InputError when they do not fit together.

    global batch = micro batch x DP x accumulation; world size = TP x PP x DP = nnodes x processes per node.
    """
    p, t = cfg["parallel"], cfg["train"]
    tp, pp = p["tp"], p["pp"]
    nproc, nnodes = torchrun_world(list(extra))
    nnodes = nnodes or int(os.environ.get("NNODES", "1"))
    dp = p["dp"]
    if dp is None:  # fill what the machines hold; on CPU one model replica
        per_node = nproc or devices
        dp = max(1, (per_node * nnodes) // (tp * pp)) if per_node else 1
    world = tp * pp * dp
    if nproc is None:
        if world % nnodes:
            raise InputError(f"world size TP x PP x DP = {tp}x{pp}x{dp} = {world} does not split over "
                             f"{nnodes} nodes")
        nproc = world // nnodes
    if nproc * nnodes != world:
        raise InputError(f"world size {nproc * nnodes} ({nnodes} node(s) x {nproc} processes) is not "
                         f"TP x PP x DP = {tp}x{pp}x{dp} = {world}: set --dp or the torchrun process count to match")
    if devices is not None and nproc > devices:
        raise InputError(f"{nproc} processes per node need {nproc} GPUs but this node has {devices}: "
                         "lower --dp/--tp/--pp or run on more nodes (NNODES, NODE_RANK, MASTER_ADDR)")
    ep = p.get("ep", 1)
    if dp % ep:
        raise InputError(f"parallel.ep {ep} must divide the data-parallel size {dp} (the experts are split over "
                         f"EP of the DP ranks): run TP x PP x DP with DP a multiple of {ep}")
    if ep > 1 and cfg["checkpoint"]["format"] != "torch_dist":
        raise InputError(f"parallel.ep {ep} saves checkpoints as torch_dist only (checkpoint.format torch has no "
                         "expert-rank files in sft yet): set checkpoint.format torch_dist")
    micro, global_batch = t["micro_batch_size"], t["global_batch_size"]
    if global_batch % (micro * dp):
        raise InputError(f"train.global_batch_size {global_batch} is not divisible by micro_batch_size x DP = "
                         f"{micro}x{dp} = {micro * dp}: choose a global batch that is a multiple of {micro * dp}")
    steps = t["steps"]
    if t["epochs"] is not None and num_samples is not None:
        steps = max(1, math.ceil(t["epochs"] * num_samples / global_batch))
    if t["warmup_steps"] >= steps:
        raise InputError(f"train.warmup_steps {t['warmup_steps']} must be below the number of steps {steps}")
    notes = []
    sequence_parallel = p["sequence_parallel"]
    if sequence_parallel and tp == 1:
        sequence_parallel = False
        notes.append("sequence parallel needs TP > 1: turned off")
    return Plan(tp=tp, pp=pp, dp=dp, nnodes=nnodes, nproc_per_node=nproc, micro_batch_size=micro,
                global_batch_size=global_batch, accumulation=global_batch // (micro * dp), steps=steps,
                num_layers=num_layers, padded_vocab_size=padded_vocab_size, sequence_parallel=sequence_parallel,
                notes=notes)


def resolved(cfg: dict, plan: Plan) -> dict:
    """The config the workers read: absolute paths, DP and steps filled in."""
    cfg = absolute_paths(cfg)
    cfg["parallel"]["dp"] = plan.dp
    cfg["parallel"]["sequence_parallel"] = plan.sequence_parallel
    cfg["train"]["steps"] = plan.steps
    return cfg
