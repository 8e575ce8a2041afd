"""Adapter-only run folders: the `peft.json` record, the full adapter view read back from a checkpoint, and the
fingerprint that ties an adapter to its base.

    RUN/                                   an sft output with peft.method lora | dora
      peft.json                            PeftRecord: method, rank, alpha, dropout, targets, base path + fingerprint
      megallama.json                       the base's manifest + "peft" (the same record) + "sft"
      latest_checkpointed_iteration.txt
      iter_0000200/                        torch_dist, adapters and their optimizer state only (no base tensors)
        peft.json                          the record again, so one iteration folder stands alone

The full view (`AdapterSet.tensors`), the exchange format with megallama.peft.hf_adapter / merge:
    decoder.layers.{L}.self_attention.linear_qkv.adapter.linear_in.weight    [rank, hidden]        A
    decoder.layers.{L}.self_attention.linear_qkv.adapter.linear_out.weight   [qkv rows, rank]      B
    decoder.layers.{L}.self_attention.linear_qkv.adapter.magnitude           [qkv rows]            DoRA only
    likewise self_attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2; L is the global layer (0-based); rows of B
    and the magnitude are in the order of megallama's Megatron base weight rows (qkv per KV group [q.., k, v] in
    HF half-split rotary order; fc1 [gate; up]); fp32.
No function here uses collectives.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megallama import __version__
from megallama.errors import InputError

RECORD = "peft.json"
ADAPTER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(self_attention|mlp)\.(linear_\w+)\.adapter\."
                         r"(linear_in\.weight|linear_out\.weight|magnitude)$")
FINGERPRINT_SAMPLES = 64  # values per tensor that enter the fingerprint


@dataclass(frozen=True)
class PeftRecord:
    """What peft.json says: the adapter's hyper-parameters and the base it belongs to."""

    method: str  # lora | dora
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # Megatron names: linear_qkv, linear_proj, linear_fc1, linear_fc2
    base_path: str
    base_fingerprint: str
    megallama_version: str = __version__

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return {"method": self.method, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets), "base": {"path": self.base_path, "fingerprint": self.base_fingerprint},
                "megallama_version": self.megallama_version}

    @classmethod
    def from_json(cls, data: dict, where: str = RECORD) -> PeftRecord:
        try:
            return cls(method=data["method"], rank=int(data["rank"]), alpha=float(data["alpha"]),
                       dropout=float(data["dropout"]), targets=tuple(data["targets"]),
                       base_path=str(data["base"]["path"]), base_fingerprint=str(data["base"]["fingerprint"]),
                       megallama_version=str(data.get("megallama_version", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where} is not a megallama adapter record: {type(e).__name__} {e}") from None


@dataclass
class AdapterSet:
    """One checkpoint's adapters: the record and the full (TP-gathered, all layers) tensors, fp32."""

    record: PeftRecord
    tensors: dict[str, torch.Tensor]
    iteration: int | None = None
    spec: object = None  # the base's ModelSpec (from the run's megallama.json), when known
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- record files
def write_record(folder: Path, record: PeftRecord) -> None:
    path = Path(folder) / RECORD
    tmp = path.with_name(f".{RECORD}.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    tmp.replace(path)


def read_record(folder: Path) -> PeftRecord:
    path = Path(folder) / RECORD
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder} is not a LoRA/DoRA run: {RECORD} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return PeftRecord.from_json(data, str(path))


def is_peft_run(path: Path) -> bool:
    """True for an sft output (or one of its iteration folders) trained with peft.method lora or dora."""
    return (run_root(path) / RECORD).is_file()


def run_root(path: Path) -> Path:
    """The run folder of `path` (a run folder or one of its iteration folders)."""
    path = Path(path)
    return path.parent if re.fullmatch(r"iter_\d+", path.name) else path


# ---------------------------------------------------------------- the full adapter view
def read_adapters(path: Path) -> AdapterSet:
    """The adapters of a LoRA/DoRA run (its latest checkpoint) or of one of its iteration folders."""
    from megallama.formats.base import read_manifest
    from megallama.formats.megatron.torch_dist import DistCheckpoint, find_iteration_dir
    from megallama.spec import ModelSpec

    path = Path(path)
    if not is_peft_run(path):
        raise InputError(f"{path} is not a LoRA/DoRA run: no {RECORD} (train one with sft peft.method=lora)")
    root = run_root(path)
    it_dir = path if path != root else find_iteration_dir(root)
    if it_dir is None:
        raise InputError(f"LoRA run {root} holds no finished torch_dist checkpoint yet")
    record = read_record(it_dir if (it_dir / RECORD).is_file() else root)
    ckpt = DistCheckpoint(it_dir)
    tensors: dict[str, torch.Tensor] = {}
    for fqn, md in sorted(ckpt.tensors.items()):
        if not (fqn.startswith("decoder.layers.") and ".adapter." in fqn):
            continue
        stacked = ckpt.read(fqn, (0,) * len(md.size), tuple(md.size)).float()  # [num_layers, ...]
        rest = fqn[len("decoder.layers."):]
        for layer in range(stacked.shape[0]):
            tensors[f"decoder.layers.{layer}.{rest}"] = stacked[layer].clone()
    if not tensors:
        raise InputError(f"{it_dir} holds no adapter tensors")
    manifest = read_manifest(root) or {}
    spec = ModelSpec.from_dict(manifest["spec"]) if manifest.get("spec") else None
    match = re.search(r"iter_(\d+)$", it_dir.name)
    return AdapterSet(record=record, tensors=tensors, iteration=int(match.group(1)) if match else None, spec=spec)


# ---------------------------------------------------------------- the base's fingerprint
def open_any(path: Path):
    """A canonical Reader over an HF, Meta or Megatron folder, told apart by its files."""
    from megallama.convert import open_reader

    path = Path(path)
    if (path / "config.json").is_file() and not (path / "latest_checkpointed_iteration.txt").is_file():
        return open_reader(path, "hf")
    if (path / "params.json").is_file() or any(path.glob("consolidated.*.pth")):
        return open_reader(path, "meta")
    return open_reader(path, "megatron")


def fingerprint_tensors(named) -> str:
    """sha256 over (name, shape, FINGERPRINT_SAMPLES evenly spaced values as fp32) of each (name, tensor),
    sorted by name. The same weights give the same fingerprint in any format, dtype aside (values compare as
    fp32), at any TP x PP; any change to a sampled value, a shape or a name changes it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        flat = tensor.reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(FINGERPRINT_SAMPLES, flat.numel())).round().long()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(flat[index].to(torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def base_fingerprint(path: Path) -> str:
    """The fingerprint of the model in folder `path` (HF, Meta or Megatron, any TP x PP), over its canonical
    tensors (HF names and layout): a converted copy of a base has the base's fingerprint."""
    with open_any(Path(path)) as reader:
        return fingerprint_tensors((name, reader.get(name)) for name in reader.names())


def check_base(record: PeftRecord, path: Path, *, fingerprint: str | None = None) -> None:
    """InputError unless the model in `path` is the base `record` was trained on (by fingerprint)."""
    found = fingerprint or base_fingerprint(path)
    if found != record.base_fingerprint:
        raise InputError(f"{path} is not the base this adapter was trained on: its fingerprint {found[:19]}... "
                         f"differs from the recorded {record.base_fingerprint[:19]}... (base {record.base_path}); "
                         "pass the original base model")


def checked_base(run: Path, base: Path | None = None) -> tuple[Path, PeftRecord]:
    """(the base folder of LoRA run `run`, its record): `base`, else the recorded path; InputError when it is
    missing or has another fingerprint (for tools that load a run: generate, verify)."""
    from megallama.peft.merge import resolve_base

    root = run_root(Path(run))
    record = read_record(root)
    path = resolve_base(root, record.base_path, base)
    check_base(record, path)
    return path, record
