"""HuggingFace LlamaForCausalLM folders: config.json + safetensors (single or indexed) or pytorch_model*.bin.

HF is the canonical form (names and rotary order), so the reader is an identity on tensors and the writer only
chooses file boundaries. Example:

    with open_hf(Path("llama-2-7b-hf")) as src:
        q = src.get("model.layers.0.self_attn.q_proj.weight")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
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
    check_shape,
    copy_tokenizer,
    write_manifest,
)
from megallama.formats.rawcopy import (
    RawRange,
    fast_copy_enabled,
    raw_tensor,
    safetensors_ranges,
    save_safetensors_streamed,
    torch_zip_ranges,
)
from megallama.names import EMBED, LM_HEAD, canonical_names, expected_shapes
from megallama.spec import ModelSpec

MAX_SHARD_BYTES = 2 * 10**9  # one safetensors file; also bounds the writer's peak memory
REMAP_BYTES = 1 << 28  # unmap a reader's input files after this many bytes were read (see MappedFile)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old HF checkpoints carry recomputable rotary buffers (P14)
ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- shared helpers (meta.py uses them too)
def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"no {path.name} in {path.parent}: {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data


def check_shapes(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Compare every stored shape with what the config implies; raise once, naming all mismatches."""
    want = expected_shapes(spec)
    bad = [f"{n} {shapes[n]} (expected {shape})" for n, shape in want.items() if n in shapes and shapes[n] != shape]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise InputError(f"tensor shapes in {source} contradict its config: {'; '.join(bad[:3])}{more}")


def load_sentencepiece(path: Path):
    """A SentencePieceProcessor, or None when `path` is not SentencePiece (Llama 3's tiktoken rank file)."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception:
        return None


def load_torch_file(path: Path) -> dict:
    """torch.load through mmap (nothing is read until used); corrupt or truncated files become InputError."""
    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # pre-1.6 (non-zip) files cannot be mapped; anything else is damage
            raise InputError(f"cannot read {path}: {first_line(e)} (truncated or corrupt file?)") from None
        data = _load_unmapped(path)
    except Exception as e:
        raise InputError(f"cannot read {path}: {first_line(e)} (truncated or corrupt file?)") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputError(f"{path} is not a flat name -> tensor dictionary")
    return data


def _load_unmapped(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot read {path}: {first_line(e)} (truncated or corrupt file?)") from None


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:
        raise InputError(f"cannot read {path}: {first_line(e)} (truncated or corrupt file?)") from None


def owned(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous tensor with its own storage (never a view into a file-wide buffer)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


class MappedFile:
    """A safetensors or torch weight file read through mmap, handing out one tensor copy at a time.

    Pages read through a mapping count in this process's RSS until it is unmapped; `release_if_due` unmaps a
    reader's files every REMAP_BYTES, so peak memory stays near one output shard instead of growing to the input.
    """

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self.served = 0  # bytes copied out of the current mapping
        self._ranges: dict[str, RawRange] | None = None  # where each tensor lies (raw), read on first use
        handle = self._mapped()
        if self.is_safetensors:
            try:
                slices = {k: handle.get_slice(k) for k in handle.keys()}
            except Exception as e:
                raise InputError(f"cannot read {path}: {first_line(e)} (truncated or corrupt file?)") from None
            self.shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            self.dtypes = {k: ST_DTYPES.get(s.get_dtype(), s.get_dtype()) for k, s in slices.items()}
        else:
            self.shapes = {k: tuple(t.shape) for k, t in handle.items()}
            self.dtypes = {k: str(t.dtype).removeprefix("torch.") for k, t in handle.items()}

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"

    def _mapped(self):
        if self._handle is None:
            self._handle = _open_safetensors(self.path) if self.is_safetensors else load_torch_file(self.path)
        return self._handle

    def get(self, name: str, part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The tensor `name`, or with `part=(dim, rank, n)` only rank's contiguous 1/n along `dim`."""
        handle = self._mapped()
        try:
            if self.is_safetensors and part is None:
                t = handle.get_tensor(name)
            elif self.is_safetensors:
                t = handle.get_slice(name)[_part_index(self.shapes[name], *part)]  # reads only that part
            else:
                t = handle[name][_part_index(self.shapes[name], *part)] if part else handle[name]
        except Exception as e:
            raise InputError(f"cannot read {name} from {self.path}: {first_line(e)}") from None
        t = t.clone(memory_format=torch.contiguous_format)  # a copy of its own, so the mapping can go
        # A column slice still touches (nearly) every page of the tensor: count what was mapped in, not kept.
        whole = part is not None and part[0] != 0
        self.served += t.numel() * t.element_size() * (part[2] if whole else 1)
        return t

    def raw(self, name: str) -> RawRange | None:
        """Where tensor `name` lies in this file, for a file-to-file copy (rawcopy.py); None if unknown."""
        if self._ranges is None:
            self._ranges = safetensors_ranges(self.path) if self.is_safetensors else torch_zip_ranges(self.path)
        found = self._ranges.get(name)
        return found if found is not None and found.shape == self.shapes.get(name) else None

    def close(self) -> None:
        """Unmap, releasing the pages read so far; the next `get` maps the file again."""
        self._handle = None
        self.served = 0


def _part_index(shape: tuple[int, ...], dim: int, rank: int, n: int) -> tuple[slice, ...]:
    size = shape[dim] // n
    return (slice(None),) * dim + (slice(rank * size, (rank + 1) * size),)


def release_if_due(files: list[MappedFile]) -> None:
    if sum(f.served for f in files) >= REMAP_BYTES:
        for f in files:
            f.close()


# ---------------------------------------------------------------- reader
def open_hf(path: Path) -> HFReader:
    """Open an HF LlamaForCausalLM folder lazily (safetensors mmap or torch.load(mmap=True))."""
    path = Path(path)
    cfg = read_json(path / "config.json", "expected an HF LlamaForCausalLM folder (config.json + weights)")
    spec = ModelSpec.from_hf_config(cfg)
    if spec.architecture.startswith("Llama4"):
        from megallama.formats.hf_llama4 import Llama4HFReader

        return Llama4HFReader(path, spec, weight_files(path))
    return HFReader(path, spec, weight_files(path))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: those an index names, else *.safetensors, else pytorch_model*.bin."""
    for index in INDEXES:
        if (folder / index).is_file():
            weight_map = read_json(folder / index, "").get("weight_map")
            if not isinstance(weight_map, dict):
                raise InputError(f"{folder / index} has no weight_map")
            files = sorted({folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(f"{index} lists {', '.join(missing)}, missing from {folder}")
            return files
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise InputError(f"no weights in {folder}: expected *.safetensors or pytorch_model*.bin beside config.json")
    return files


class HFReader(ContextReader):
    """Canonical tensors straight from an HF folder, one at a time."""

    def __init__(self, folder: Path, spec: ModelSpec, files: list[Path]):
        self.folder = folder
        self.source_files = files
        self.tokenizer_files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
        self._files: list[MappedFile] = []
        self._where: dict[str, MappedFile] = {}  # tensor name -> its file
        try:
            for f in files:
                self._index(MappedFile(f))
            dtypes = {n: f.dtypes[n] for n, f in self._where.items()}
            check_float_dtypes(dtypes, str(folder))
            self.spec = spec.replace(dtype=dtypes.get(EMBED, spec.dtype))  # the tensors' dtype, not the label
            check_shapes(self.spec, {n: f.shapes[n] for n, f in self._where.items()}, str(folder))
            self._drop_tied_head()
        except BaseException:
            self.close()
            raise

    def _index(self, mapped: MappedFile) -> None:
        self._files.append(mapped)
        for name in mapped.shapes:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name in self._where:
                raise InputError(f"tensor {name} is stored twice: in {self._where[name].path.name} "
                                 f"and {mapped.path.name}")
            self._where[name] = mapped

    def _drop_tied_head(self) -> None:
        # Some tied checkpoints still store lm_head (an alias of the embedding): keep one copy, as safetensors does.
        if not self.spec.tie_embeddings or LM_HEAD not in self._where:
            return
        if not torch.equal(self.get(LM_HEAD), self.get(EMBED)):
            raise InputError(f"config.json sets tie_word_embeddings but {LM_HEAD} differs from {EMBED}: "
                             "set tie_word_embeddings to false or remove lm_head.weight")
        del self._where[LM_HEAD]

    def names(self) -> list[str]:
        order = {n: i for i, n in enumerate(canonical_names(self.spec))}
        return sorted(self._where, key=lambda n: (order.get(n, len(order)), n))

    def get(self, name: str) -> torch.Tensor:
        t = self._where[name].get(name)
        release_if_due(self._files)
        check_shape(name, t, self.spec)
        return t

    def raw(self, name: str) -> RawRange | None:
        """Where canonical `name` lies in its file (HF is canonical: every tensor can be copied as is)."""
        return self._where[name].raw(name)

    def get_part(self, name: str, dim: int, rank: int, n: int) -> torch.Tensor:
        """Rank's contiguous 1/n of `name` along `dim`, read without the rest (shapes were checked on open)."""
        t = self._where[name].get(name, (dim, rank, n))
        release_if_due(self._files)
        return t

    def close(self) -> None:
        for f in self._files:
            f.close()



# ---------------------------------------------------------------- writer
def write_hf(reader, out_dir: Path, *, dtype: str | None = None, on_tensor: OnTensor | None = None,
             max_shard_bytes: int | None = None) -> WriteReport:
    """Write `reader` as safetensors + config.json (+ tokenizer, manifest) that from_pretrained loads offline.

    Files are filled in canonical order and written one at a time, so peak memory is about one output file.
    """
    if reader.spec.architecture.startswith("Llama4"):
        from megallama.formats.hf_llama4 import write_hf_llama4

        return write_hf_llama4(reader, out_dir, dtype=dtype, on_tensor=on_tensor, max_shard_bytes=max_shard_bytes)
    out_dir = Path(out_dir)
    spec = reader.spec.replace(dtype=dtype or reader.spec.dtype)
    groups = plan_files(spec, max_shard_bytes or MAX_SHARD_BYTES)
    files = shard_file_names(len(groups))
    report = WriteReport(output=out_dir, files=list(files))
    weight_map, total = {}, 0
    shapes = expected_shapes(spec)
    for fname, group in zip(files, groups, strict=True):
        _write_file(reader, out_dir / fname, [(n, spec.dtype, shapes[n]) for n in group], dtype, on_tensor)
        weight_map |= dict.fromkeys(group, fname)
        total += sum(TORCH_DTYPES[spec.dtype].itemsize * int(torch.Size(shapes[n]).numel()) for n in group)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEXES[0]).write_text(json.dumps(index, indent=2) + "\n")
        report.files.append(INDEXES[0])
    (out_dir / "config.json").write_text(json.dumps(spec.to_hf_config(), indent=2) + "\n")
    report.files += ["config.json", *_write_tokenizer(reader.tokenizer_files, out_dir, report)]
    write_manifest(out_dir, spec=spec, fmt="hf", sources=reader.source_files)
    report.files.append("megallama.json")
    if spec.tie_embeddings:
        report.notes.append("tied embeddings: lm_head.weight omitted (tie_word_embeddings=true)")
    return report


def _write_file(reader, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], dtype: str | None,
                on_tensor: OnTensor | None) -> None:
    """One safetensors file, byte for byte what save_file writes. Fast path: one tensor at a time, tensors whose
    bytes lie as they are in the input copied file to file (rawcopy.py); else save_file of the whole file."""
    if fast_copy_enabled():
        out_dtype = entries[0][1]

        def fetch(name: str):
            return raw_tensor(reader, name, out_dtype) or cast(reader.get(name), dtype)

        save_safetensors_streamed(path, entries, fetch, metadata={"format": "pt"}, on_tensor=on_tensor)
        return
    tensors = {}
    for name, _, _ in entries:
        tensors[name] = t = cast(reader.get(name), dtype)
        if on_tensor:
            on_tensor(name, t.numel() * t.element_size())
    save_file(tensors, str(path), metadata={"format": "pt"})


def plan_files(spec: ModelSpec, max_shard_bytes: int) -> list[list[str]]:
    """Canonical names grouped into consecutive files of at most `max_shard_bytes` (a bigger tensor goes alone)."""
    itemsize = TORCH_DTYPES[spec.dtype].itemsize
    shapes = expected_shapes(spec)
    return group_by_bytes({name: itemsize * int(torch.Size(shapes[name]).numel()) for name in canonical_names(spec)},
                          max_shard_bytes)


def group_by_bytes(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names (in order) cut into consecutive groups of at most `max_shard_bytes` (a bigger one goes alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _write_tokenizer(files: list[Path], out_dir: Path, report: WriteReport) -> list[str]:
    copied = copy_tokenizer(files, out_dir)
    if "tokenizer.model" not in copied or {"tokenizer.json", "tokenizer_config.json"} & set(copied):
        return copied
    # A bare Meta tokenizer.model: tell AutoTokenizer it is a LLaMA SentencePiece model that adds BOS.
    tok_cfg = sentencepiece_tokenizer_config(out_dir / "tokenizer.model")
    if tok_cfg is None:
        report.notes.append("tokenizer.model is not SentencePiece (Llama 3 tiktoken?): copied as is; "
                            "AutoTokenizer needs a tokenizer.json")
        return copied
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return [*copied, "tokenizer_config.json"]


def sentencepiece_tokenizer_config(path: Path) -> dict | None:
    sp = load_sentencepiece(path)
    if sp is None:
        return None

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
            "legacy": True}
