"""HF PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`) out of and into megallama.

    FOLDER/
      adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, use_dora, base_model_name_or_path
      adapter_model.safetensors    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight   [r, in]
                                   base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight   [out, r]
                                   base_model.model.model.layers.N.self_attn.q_proj.lora_magnitude_vector [out]  DoRA
      megallama.json               where it came from (the run's peft.json record)

`PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(BASE), FOLDER)` loads what `write_peft_adapter`
writes. The fused <-> per-projection mapping itself is `megallama.peft.mapping`; docs/peft-io.md draws it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from megallama import __version__
from megallama.errors import InputError
from megallama.formats.base import MANIFEST, Timer, WriteReport, cast, folder_bytes, require_folder, staged_output
from megallama.formats.hf import MappedFile, first_line, read_json
from megallama.peft.mapping import (
    PROJECTION_TARGET,
    TARGETS,
    ProjAdapter,
    fused_rank,
    fused_to_projections,
    hf_module,
    projection_shape,
    projections_to_fused,
)
from megallama.spec import ModelSpec, normalize_dtype

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."  # PeftModel -> LlamaForCausalLM
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.(\w+))\."
                  r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
HF_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTIONS = {p for t in TARGETS.values() for p in t.projections}  # self_attn.q_proj, ..., mlp.down_proj
NOT_MAPPABLE = ("embed_tokens", "lm_head")  # vocab-sized, not linears megallama adapts
# Options that change what the adapter computes and that megallama does not reproduce: refused when set.
UNSUPPORTED_OPTIONS = ("modules_to_save", "trainable_token_indices", "lora_bias", "layer_replication",
                       "target_parameters", "alora_invocation_tokens", "use_bdlora", "arrow_config", "use_qalora")


# ---------------------------------------------------------------- export
def write_peft_adapter(tensors: dict[str, torch.Tensor], spec: ModelSpec, out_dir: Path, *, method: str, rank: int,
                       alpha: float, dropout: float = 0.0, base_name: str | None = None,
                       record: dict | None = None, rotary_interleaved: bool = False) -> WriteReport:
    """Write the full-view fused adapter state `tensors` as an HF PEFT adapter folder into the empty `out_dir`."""
    out_dir = Path(out_dir)
    projs = fused_to_projections(tensors, spec, scale=alpha / rank, rotary_interleaved=rotary_interleaved)
    if not projs:
        raise InputError("the run holds no adapter tensors to export")
    weights: dict[str, torch.Tensor] = {}
    for module, pa in projs.items():
        weights[f"{KEY_PREFIX}{module}.lora_A.weight"] = pa.a.contiguous()
        weights[f"{KEY_PREFIX}{module}.lora_B.weight"] = pa.b.contiguous()
        if method == "dora":
            if pa.magnitude is None:
                raise InputError(f"DoRA run without a magnitude for {module}: the checkpoint is incomplete")
            weights[f"{KEY_PREFIX}{module}.lora_magnitude_vector"] = pa.magnitude.contiguous()
    present = {m.rsplit(".", 1)[1] for m in projs}
    layers = sorted({int(m.split(".")[2]) for m in projs})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "use_dora": method == "dora", "use_rslora": False,
        "target_modules": [p for p in HF_ORDER if p in present], "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None if layers == list(range(spec.num_layers)) else layers,
        "layers_pattern": None, "revision": None,
    }
    save_file(weights, str(out_dir / WEIGHT_FILES[0]), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    manifest = {"format": "hf-peft-adapter", "tool": "megallama", "version": __version__, "spec": spec.to_dict(),
                "peft": record or {}}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    report = WriteReport(output=out_dir, files=[CONFIG_FILE, WEIGHT_FILES[0], MANIFEST])
    report.notes.append(f"{len(projs)} projections, r={rank}, lora_alpha={alpha:g}"
                        f"{', DoRA magnitudes included' if method == 'dora' else ''}")
    return report


def export_run(run: Path, dst: Path, *, base: Path | None = None, base_name: str | None = None,
               dtype: str | None = None, force: bool = False) -> WriteReport:
    """`convert megatron2hf --peft`: a LoRA/DoRA run's adapters as an HF PEFT adapter folder at `dst` (staged).

    `base` (a folder) is checked against the run's recorded fingerprint; `base_name` (default: `base`, else the
    recorded base path) becomes `base_model_name_or_path`.
    """
    from megallama.peft.store import check_base, is_peft_run, open_any, read_adapters, run_root

    run, dst = Path(run), Path(dst)
    require_folder(run)
    if not is_peft_run(run):
        raise InputError(f"--peft: {run} is not a LoRA/DoRA run (no peft.json): it holds full weights, so there is "
                         "no adapter to export; drop --peft to convert it")
    if dst.resolve() == run.resolve() or run.resolve() in dst.resolve().parents:
        raise InputError(f"output {dst} is inside the run {run}: choose an output folder outside it")
    dtype = normalize_dtype(dtype)
    adapters = read_adapters(run)
    record = adapters.record
    if base is not None:
        check_base(record, base)
    spec = adapters.spec
    if spec is None:
        from megallama.peft.merge import resolve_base
        with open_any(resolve_base(run_root(run), record.base_path, base)) as reader:
            spec = reader.spec
    tensors = {k: cast(v, dtype) for k, v in adapters.tensors.items()}
    with Timer() as timer, staged_output(dst, force=force) as tmp:
        report = write_peft_adapter(tensors, spec, tmp, method=record.method, rank=record.rank, alpha=record.alpha,
                                    dropout=record.dropout, base_name=base_name or record.base_path,
                                    record=record.to_json())
    report.output, report.seconds = dst, timer.seconds
    report.bytes_written = folder_bytes(dst)
    return report


# ---------------------------------------------------------------- import
@dataclass
class PeftFolder:
    """An HF PEFT LoRA/DoRA adapter read and checked against a base: per-projection adapters, fp32."""

    path: Path
    config: dict
    adapters: dict[str, ProjAdapter]  # HF module path (model.layers.3.self_attn.q_proj) -> adapter
    weight_file: Path

    @property
    def method(self) -> str:
        return "dora" if any(pa.magnitude is not None for pa in self.adapters.values()) else "lora"


def is_peft_adapter(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_peft_folder(path: Path, spec: ModelSpec) -> PeftFolder:
    """Read and check an HF PEFT adapter folder against the base `spec`; InputError for anything not mappable."""
    path = require_folder(path, "adapter folder")
    if not is_peft_adapter(path):
        raise InputError(f"{path} is not an HF PEFT adapter folder: no {CONFIG_FILE} (expected the folder "
                         "PeftModel.save_pretrained writes)")
    config = read_json(path / CONFIG_FILE, "")
    _check_config(config, path)
    weight_file = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if weight_file is None:
        raise InputError(f"{path} has {CONFIG_FILE} but no {' or '.join(WEIGHT_FILES)}")
    raw = _read_weights(weight_file)
    adapters = _adapters(raw, config, spec, weight_file)
    return PeftFolder(path, config, adapters, weight_file)


def read_peft_adapter(path: Path, spec: ModelSpec, *, rank: int | None = None):
    """An HF PEFT adapter as one fused Megatron adapter per linear: an `AdapterSet` for `peft.init_from`.

    q/k/v become one linear_qkv adapter of rank rq+rk+rv with block-diagonal B, gate/up one linear_fc1 adapter;
    every adapter is zero-padded to one uniform rank (`rank`, default the largest group's) with
    alpha = scale * rank, so each fused delta is exactly the sum of its projections' deltas (fp32 round-off in
    the scale aside; B is rescaled only where a projection's own scale differs, alpha_pattern / rank_pattern).
    """
    from megallama.peft.config import TARGETS as MODEL_ORDER
    from megallama.peft.store import AdapterSet, PeftRecord

    folder = read_peft_folder(path, spec)
    need = fused_rank(folder.adapters, spec)
    if rank is not None and rank < need:
        raise InputError(f"{path}: the fused adapter needs rank >= {need} (its q/k/v or gate/up ranks summed), "
                         f"got {rank}")
    rank = rank or need
    tensors, scale = projections_to_fused(folder.adapters, spec, rank=rank)
    targets = tuple(t for t in MODEL_ORDER  # peft.json order
                    if any(k.endswith(f".{TARGETS[t].module}.adapter.linear_in.weight") for k in tensors))
    record = PeftRecord(method=folder.method, rank=rank, alpha=scale * rank,
                        dropout=float(folder.config.get("lora_dropout") or 0.0), targets=targets,
                        base_path=str(folder.config.get("base_model_name_or_path") or ""), base_fingerprint="")
    return AdapterSet(record=record, tensors=tensors, spec=spec)


def _check_config(config: dict, path: Path) -> None:
    where = path / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise InputError(f"{where}: peft_type {config.get('peft_type')!r} is not supported: only LORA (and DoRA, "
                         "which is LORA with use_dora)")
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option) not in (None, False, [], {}):
            raise InputError(f"{where}: {option}={config[option]!r} is not supported: megallama maps LoRA/DoRA on "
                             "q/k/v/o/gate/up/down projections only")
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(targets, list) and leaf in NOT_MAPPABLE:
            raise InputError(f"{where}: target module {name!r} cannot be mapped: adapters on embed_tokens / lm_head "
                             "are not supported (only q/k/v/o/gate/up/down_proj)")
        if isinstance(targets, list) and leaf not in PROJECTION_TARGET:
            raise InputError(f"{where}: unknown target module {name!r}: expected some of {', '.join(HF_ORDER)}")


def _read_weights(weight_file: Path) -> dict[str, torch.Tensor]:
    mapped = MappedFile(weight_file)  # safetensors mmap, or torch.load(weights_only=True, mmap=True)
    try:
        return {name: mapped.get(name) for name in mapped.shapes}
    finally:
        mapped.close()


def _adapters(raw: dict[str, torch.Tensor], config: dict, spec: ModelSpec, source: Path) -> dict[str, ProjAdapter]:
    """Group `lora_A` / `lora_B` / magnitude by module, check shapes against the base, compute each scale."""
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        m = _KEY.match(key)
        if m is None:
            leaf = next((n for n in NOT_MAPPABLE if f".{n}." in key), None)
            if leaf:
                raise InputError(f"{source}: {key} adapts {leaf}, which cannot be mapped (only q/k/v/o/gate/up/"
                                 "down_proj)")
            raise InputError(f"{source}: unexpected tensor {key} (expected LoRA weights of q/k/v/o/gate/up/down_proj "
                             "under base_model.model.model.layers.N)")
        layer, module, leaf, what = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in PROJECTIONS:
            raise InputError(f"{source}: unknown target module {module} in {key}: expected some of "
                             f"{', '.join(HF_ORDER)}")
        if layer >= spec.num_layers:
            raise InputError(f"{source}: {key} is for layer {layer} but the base has {spec.num_layers} layers")
        parts.setdefault((layer, module), {})[what.split(".")[0]] = tensor.to(torch.float32)
    use_dora = bool(config.get("use_dora"))
    adapters = {}
    for (layer, module), p in sorted(parts.items()):
        adapters[hf_module(layer, module)] = _adapter(layer, module, p, config, spec, source, use_dora)
    return adapters


def _adapter(layer: int, module: str, p: dict, config: dict, spec: ModelSpec, source: Path,
             use_dora: bool) -> ProjAdapter:
    name = hf_module(layer, module)
    if "lora_A" not in p or "lora_B" not in p:
        raise InputError(f"{source}: {name} has {' and '.join(sorted(p))} but needs lora_A and lora_B")
    a, b, mag = p["lora_A"], p["lora_B"], p.get("lora_magnitude_vector")
    leaf = module.rsplit(".", 1)[1]
    out_f, in_f = projection_shape(PROJECTION_TARGET[leaf], spec, module)
    r = a.shape[0] if a.dim() == 2 else -1
    if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r) \
            or (mag is not None and tuple(mag.shape) != (out_f,)):
        got = f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}" + (f", magnitude {tuple(mag.shape)}" if mag is
                                                                      not None else "")
        raise InputError(f"{source}: {name} does not fit the base: {got}, expected lora_A (r, {in_f}) and "
                         f"lora_B ({out_f}, r) for a {out_f}x{in_f} weight (adapter for another model?)")
    if use_dora != (mag is not None):
        raise InputError(f"{source}: use_dora is {str(use_dora).lower()} but {name} "
                         f"{'has no' if use_dora else 'has a'} lora_magnitude_vector")
    want_r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r"))
    if want_r is not None and int(want_r) != r:
        raise InputError(f"{source}: {name} has rank {r} but adapter_config.json says r={want_r}")
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r  # PEFT's LoraLayer.update_layer
    return ProjAdapter(a, b, scale, mag)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that matches
    the end of the module path."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise InputError(f"pattern {key!r} in adapter_config.json is not a regular expression: "
                             f"{first_line(e)}") from None
    return default
