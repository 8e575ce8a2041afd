"""Reading the pickles of a checkpoint without running code from it.

A pickle can call any importable function while it loads. Tensor files are read with
`torch.load(weights_only=True)` (torch's own allow-list), but PyTorch DCP's `.metadata` (torch_dist checkpoints)
is read by `FileSystemReader.read_metadata` with a plain `pickle.load`, and DCP's `DefaultLoadPlanner.load_bytes`
(megatron-core's ShardedObjects: RNG state, `_extra_state`) with `torch.load(weights_only=False)`. A crafted
checkpoint could run its payload in every command that opens it, and in every rank.

So:
- `read_dcp_metadata` unpickles a `.metadata` with `SafeUnpickler`: only the DCP metadata classes, torch sizes,
  dtypes and layouts, and a few inert builtins may be named (`DCP_GLOBALS`); anything else is refused with one line
  before it is imported, let alone called.
- `guard_dcp_loading` (called once in every rank, by `engine.runtime.init_distributed`) makes megatron-core's
  reads go the same way: `FileSystemReader.read_metadata` reads through `read_dcp_metadata`, and `load_bytes`
  through `torch.load(weights_only=True)`. This is the one place megallama patches PyTorch.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from megallama.errors import InputError

_DCP = "torch.distributed.checkpoint"
# (module, name) pairs a DCP .metadata may name: what torch 2.x and megatron-core 0.16 write (listed with
# pickletools from a megallama save and a megatron-core save), plus the planner items of older torch versions.
DCP_GLOBALS = frozenset({
    *((f"{_DCP}.metadata", n) for n in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
                                        "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta",
                                        "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan",
                                       "ReadItem", "LoadItemType")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),  # torch <= 2.1
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # returns a torch.layout by name, nothing else
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
})


class UnsafePickle(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list."""


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals in `allowed` (plus torch dtypes and layouts, which are values,
    not callables) and refuses persistent ids: nothing outside the list is imported or called."""

    def __init__(self, file, allowed: frozenset[tuple[str, str]] = DCP_GLOBALS):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise UnsafePickle(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        raise UnsafePickle("persistent ids are not allowed")


def safe_loads(data: bytes, allowed: frozenset[tuple[str, str]] = DCP_GLOBALS):
    return SafeUnpickler(io.BytesIO(data), allowed).load()


def read_dcp_metadata(path: Path):
    """The `Metadata` of a DCP `.metadata` file (or of the folder holding it), unpickled with `SafeUnpickler`.

    Raises InputError with one line for a global outside the allow-list, a truncated file, or anything that is
    not DCP Metadata."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    if path.is_dir():
        path = path / ".metadata"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        metadata = safe_loads(data)
    except UnsafePickle as e:
        raise InputError(f"refusing to unpickle {path}: {e} (loading it could run code)") from None
    except Exception as e:  # a truncated or foreign pickle: whatever the unpickler raised, one line
        raise InputError(f"{path} is not readable DCP metadata: {type(e).__name__}") from None
    if not isinstance(metadata, Metadata):
        raise InputError(f"{path} is not DCP metadata: it holds a {type(metadata).__name__}")
    return metadata


# ---------------------------------------------------------------- inside the ranks: megatron-core's reads
def _read_metadata(self, *args, **kwargs):
    """FileSystemReader.read_metadata with the unpickle restricted (same result otherwise)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as f:
        data = f.read()
    try:
        metadata = safe_loads(data)
    except UnsafePickle as e:
        raise InputError(f"refusing to unpickle {path}: {e} (loading it could run code)") from None
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes(self, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes with `torch.load(weights_only=True)` instead of `weights_only=False`."""
    from torch.distributed.checkpoint._traverse import set_element

    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def guard_dcp_loading() -> None:
    """Route every DCP metadata read and ShardedObject load of this process through the restricted unpicklers."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    FileSystemReader.read_metadata = _read_metadata
    DefaultLoadPlanner.load_bytes = _load_bytes
