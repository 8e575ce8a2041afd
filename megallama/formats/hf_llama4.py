"""HuggingFace Llama 4 folders: `Llama4ForCausalLM` (text) and `Llama4ForConditionalGeneration` (its text part).

HF Llama 4 differs from the canonical (LlamaForCausalLM-named) tensors in four ways, each undone here:

- prefix: the multimodal model stores the text model under `language_model.` (`language_model.model.layers.*`,
  `language_model.lm_head.weight`); its `vision_model.*` and `multi_modal_projector.*` are not converted (the
  reader reports how many tensors it dropped);
- rotary order: Llama 4 rotates adjacent pairs (complex multiplication), so its q/k rows are in Meta's interleaved
  order; canonical (and megatron-core with `rotary_interleaved=False`) is HF Llama's half-split order:
  `meta_to_hf_rotary` on read, `hf_to_meta_rotary` on write (q.k and the L2 norm are unchanged by the permutation);
- dense layers are `feed_forward.{gate,up,down}_proj` (canonical `mlp.*`);
- experts are fused and input-major:
      experts.gate_up_proj [E, h, 2F]  ->  experts.{e}.gate_proj.weight = [e, :, :F].T  [F, h]
                                            experts.{e}.up_proj.weight   = [e, :, F:].T  [F, h]
      experts.down_proj    [E, F, h]   ->  experts.{e}.down_proj.weight = [e].T         [h, F]
  The reader reads one expert's slice of the mapped file at a time; the writer fuses one layer's experts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from megallama.errors import InputError
from megallama.formats.base import (
    TOKENIZER_FILES,
    TORCH_DTYPES,
    ContextReader,
    OnTensor,
    WriteReport,
    cast,
    check_float_dtypes,
    copy_tokenizer,
    write_manifest,
)
from megallama.formats.hf import (
    IGNORED_SUFFIXES,
    INDEXES,
    MAX_SHARD_BYTES,
    MappedFile,
    release_if_due,
    shard_file_names,
)
from megallama.llama4 import VISION_KEYS
from megallama.names import EMBED, EXPERT, LM_HEAD, MOE_PREFIX, canonical_names, expected_shapes
from megallama.spec import ModelSpec
from megallama.transforms import hf_to_meta_rotary, meta_to_hf_rotary

TEXT_PREFIX = "language_model."  # Llama4ForConditionalGeneration's text model
FUSED_GATE_UP = MOE_PREFIX + "experts.gate_up_proj"
FUSED_DOWN = MOE_PREFIX + "experts.down_proj"


def file_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF Llama4ForCausalLM tensor names and shapes, in canonical order (experts fused per layer)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected_shapes(spec).items():
        if ".feed_forward.experts." in name:
            i = int(name.split(".")[2])
            fe = spec.moe_ffn_hidden_size
            out.setdefault(FUSED_GATE_UP.format(i=i), (spec.num_experts, spec.hidden_size, 2 * fe))
            out.setdefault(FUSED_DOWN.format(i=i), (spec.num_experts, fe, spec.hidden_size))
        else:
            out[name.replace(".mlp.", ".feed_forward.")] = shape
    order = {n: k for k, n in enumerate(_file_order(spec))}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def _file_order(spec: ModelSpec) -> list[str]:
    names = []
    for name in canonical_names(spec):
        if ".feed_forward.experts." in name:
            i = int(name.split(".")[2])
            for fused in (FUSED_GATE_UP.format(i=i), FUSED_DOWN.format(i=i)):
                if fused not in names:
                    names.append(fused)
        else:
            names.append(name.replace(".mlp.", ".feed_forward."))
    return names


# ---------------------------------------------------------------- reader
class Llama4HFReader(ContextReader):
    """Canonical tensors from an HF Llama 4 folder, one at a time (one expert slice per read)."""

    def __init__(self, folder: Path, spec: ModelSpec, files: list[Path]):
        self.folder, self.source_files = folder, files
        self.tokenizer_files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
        self.notes: list[str] = []
        self._files: list[MappedFile] = []
        self._where: dict[str, tuple[MappedFile, str]] = {}  # HF text name (no prefix) -> (file, stored key)
        self._expert: tuple[tuple[str, int], torch.Tensor] | None = None  # the last expert slice read
        try:
            self._open(spec)
        except BaseException:
            self.close()
            raise

    def _open(self, spec: ModelSpec) -> None:
        dropped, keys = 0, {}
        for f in self.source_files:
            mapped = MappedFile(f)
            self._files.append(mapped)
            for key in mapped.shapes:
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                if key.startswith(VISION_KEYS):
                    dropped += 1
                    continue
                name = key.removeprefix(TEXT_PREFIX)
                if name in self._where:
                    raise InputError(f"tensor {key} is stored twice: in {self._where[name][0].path.name} and "
                                     f"{mapped.path.name}")
                self._where[name] = (mapped, key)
                keys[name] = mapped
        if not self._where:
            raise InputError(f"{self.folder} holds no language-model tensors (only {dropped} vision tensors): "
                             "a vision-only checkpoint has no text model to convert")
        if dropped:
            self.notes.append(f"vision tower dropped: {dropped} vision_model/multi_modal_projector tensors not "
                              "converted (text model only)")
        dtypes = {n: f.dtypes[k] for n, (f, k) in self._where.items()}
        check_float_dtypes(dtypes, str(self.folder))
        self.spec = spec.replace(dtype=dtypes.get(EMBED, spec.dtype))
        if self.spec.tie_embeddings and LM_HEAD in self._where:
            del self._where[LM_HEAD]
        want = file_shapes(self.spec)
        if self.spec.tie_embeddings:
            want.pop(LM_HEAD, None)
        have = {n: f.shapes[k] for n, (f, k) in self._where.items()}
        problems = [f"missing {n}" for n in want if n not in have][:3]
        problems += [f"unexpected {n}" for n in have if n not in want][:3]
        problems += [f"{n} {have[n]} (expected {s})" for n, s in want.items() if n in have and have[n] != s][:3]
        if problems:
            raise InputError(f"tensors in {self.folder} contradict its Llama 4 config: {'; '.join(problems)}")

    def names(self) -> list[str]:
        return canonical_names(self.spec)

    def _read(self, name: str, part: tuple[int, int, int] | None = None) -> torch.Tensor:
        mapped, key = self._where[name]
        t = mapped.get(key, part)
        release_if_due(self._files)
        return t

    def get(self, name: str) -> torch.Tensor:
        s = self.spec
        if ".feed_forward.experts." in name:
            parts = name.split(".")  # model.layers.{i}.feed_forward.experts.{e}.{proj}.weight
            i, e, proj = int(parts[2]), int(parts[5]), parts[6]
            fused = (FUSED_DOWN if proj == "down_proj" else FUSED_GATE_UP).format(i=i)
            if self._expert is None or self._expert[0] != (fused, e):
                self._expert = ((fused, e), self._read(fused, (0, e, s.num_experts))[0])
            w = self._expert[1]  # [h, 2F] or [F, h]
            fe = s.moe_ffn_hidden_size
            piece = {"gate_proj": w[:, :fe], "up_proj": w[:, fe:], "down_proj": w}[proj]
            return piece.t().contiguous()  # nn.Linear layout [out, in]
        if ".mlp." in name:
            return self._read(name.replace(".mlp.", ".feed_forward."))
        t = self._read(name)
        if name.endswith("self_attn.q_proj.weight"):
            return meta_to_hf_rotary(t, s.num_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return meta_to_hf_rotary(t, s.num_kv_heads)
        return t

    def close(self) -> None:
        self._expert = None
        for f in self._files:
            f.close()


# ---------------------------------------------------------------- writer
def hf_tensors(reader, spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF Llama4ForCausalLM name, tensor) in file order, from canonical tensors; experts fused one layer at a time."""
    shapes = file_shapes(spec)
    if spec.tie_embeddings:
        shapes.pop(LM_HEAD, None)
    for name, shape in shapes.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            i, down = int(name.split(".")[2]), name.endswith("down_proj")
            fused = torch.empty(shape, dtype=TORCH_DTYPES[spec.dtype])  # [E, h, 2F] or [E, F, h]
            fe = spec.moe_ffn_hidden_size
            for e in range(spec.num_experts):
                if down:
                    fused[e] = reader.get(EXPERT.format(i=i, e=e, proj="down_proj")).t()
                else:
                    fused[e, :, :fe] = reader.get(EXPERT.format(i=i, e=e, proj="gate_proj")).t()
                    fused[e, :, fe:] = reader.get(EXPERT.format(i=i, e=e, proj="up_proj")).t()
            yield name, fused
        elif ".feed_forward." in name and not name.split(".feed_forward.")[1].startswith(("router", "shared_expert")):
            yield name, reader.get(name.replace(".feed_forward.", ".mlp."))
        elif name.endswith("self_attn.q_proj.weight"):
            yield name, hf_to_meta_rotary(reader.get(name), spec.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            yield name, hf_to_meta_rotary(reader.get(name), spec.num_kv_heads)
        else:
            yield name, reader.get(name)


def write_hf_llama4(reader, out_dir: Path, *, dtype: str | None = None, on_tensor: OnTensor | None = None,
                    max_shard_bytes: int | None = None) -> WriteReport:
    """Write `reader` (a Llama 4 spec) as a text-only HF Llama4ForCausalLM folder (safetensors + config.json).

    Peak memory is about one output file plus one layer's fused experts.
    """
    out_dir = Path(out_dir)
    spec = reader.spec.replace(dtype=dtype or reader.spec.dtype, architecture="Llama4ForCausalLM")
    limit, itemsize = max_shard_bytes or MAX_SHARD_BYTES, TORCH_DTYPES[spec.dtype].itemsize
    groups: list[list[str]] = [[]]
    size = 0
    shapes = file_shapes(spec)
    if spec.tie_embeddings:
        shapes.pop(LM_HEAD, None)
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    files = shard_file_names(len(groups))
    file_of = {n: files[k] for k, g in enumerate(groups) for n in g}
    report = WriteReport(output=out_dir, files=list(files))
    weight_map, tensors, total = {}, {}, 0
    for name, t in hf_tensors(reader, spec):
        t = cast(t, spec.dtype).contiguous()
        tensors[name], weight_map[name] = t, file_of[name]
        total += t.numel() * t.element_size()
        if on_tensor:
            on_tensor(name, t.numel() * t.element_size())
        if name == groups[files.index(file_of[name])][-1]:  # the file is complete
            save_file(tensors, str(out_dir / file_of[name]), metadata={"format": "pt"})
            tensors = {}
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEXES[0]).write_text(json.dumps(index, indent=2) + "\n")
        report.files.append(INDEXES[0])
    (out_dir / "config.json").write_text(json.dumps(spec.to_hf_config(), indent=2) + "\n")
    report.files += ["config.json", *copy_tokenizer(reader.tokenizer_files, out_dir)]
    write_manifest(out_dir, spec=spec, fmt="hf", sources=reader.source_files)
    report.files.append("megallama.json")
    return report
