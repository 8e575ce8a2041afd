"""Megatron `--ckpt-format torch_dist` (megatron-core dist_checkpointing over PyTorch DCP): writer and reader.

What megatron-core 0.16.1 writes for a GPTModel (formats.md 4.6 and its torch_dist addendum):

    latest_checkpointed_iteration.txt        "release" or N, written last
    release/ | iter_NNNNNNN/
        .metadata                            PyTorch DCP Metadata: global shapes, chunks, where each chunk lives
        __0_0.distcp, __0_1.distcp           torch.save'd chunks (megatron-core writes two files per rank)
        common.pt                            {args, checkpoint_version 3.0, iteration, ..., content_metadata}
        metadata.json                        {"sharded_backend": "torch_dist", ...}: how Megatron-LM detects the format

Keys are the local-spec keys of `local.py` with the layer number dropped and a leading layer axis added (stacked),
and the local norms renamed to their Transformer-Engine names (`sharded_state_dict_keys_map`). Each layer is one
chunk at offset (layer, 0, ...), holding exactly what rank 0 of TP=1 holds in torch format; the gated
`linear_fc1` is two chunks, gate rows then up rows (megatron-core's swiglu factory). The global tensors therefore
do not depend on TP x PP, and megatron-core loads them at any TP x PP.

Writer: one process, no torch.distributed. Each chunk is built from canonical tensors only when it is written
(torch DCP's own `_write_item`), so memory stays near one chunk plus its sources.
Reader: every canonical tensor is read as one region (a layer) of one global tensor with DCP's re-sharding
(`create_read_items_for_chunk_list`), so checkpoints saved by megatron-core at any TP x PP read the same way.
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import (
    SerializationFormat,
    _StorageInfo,
    _StorageWriterTransforms,
    _write_item,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult

from megallama.errors import InputError
from megallama.formats.base import (
    MANIFEST,
    TOKENIZER_FILES,
    TORCH_DTYPES,
    OnTensor,
    Reader,
    WriteReport,
    cast,
    copy_tokenizer,
    read_manifest,
    write_manifest,
)
from megallama.formats.megatron.args import spec_from_config_file
from megallama.formats.megatron.dcp_frames import FramedWriter, frame_of
from megallama.formats.megatron.local import (
    Kind,
    Rule,
    launch_flags,
    megatron_args,
    rank_shape,
    spec_from_args,
    stage_rules,
    to_rank,
)
from megallama.formats.megatron.moe import moe_args
from megallama.formats.megatron.row_trace import rank_raw
from megallama.formats.megatron.torch_format import (
    ARGS_FILE,
    CHECKPOINT_VERSION,
    TRACKER,
    MegatronReader,
    _notes,
    _staged_target,
    args_tokenizer,
    iteration_dir,
    load_rank_file,
    write_tracker,
)
from megallama.formats.rawcopy import (
    RawChain,
    RawRange,
    chain,
    fast_copy_enabled,
    parts_of,
    raw_tensor,
    torch_item_range,
)
from megallama.formats.safe_pickle import read_dcp_metadata
from megallama.names import expected_shapes
from megallama.spec import ModelSpec, check_parallel, normalize_dtype, padded_vocab_size

COMMON_FILE = "common.pt"
CONFIG_FILE = "metadata.json"
DCP_METADATA = ".metadata"
# metadata.json as megatron-core's save_config writes it (CheckpointingConfig)
CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
          "common_backend_version": 1}
# Megatron-LM's save_checkpoint passes this as `content_metadata` (its sharded_sd_metadata); stored in common.pt
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
WRITER_FILES = 2  # megatron-core's TorchDistSaveShardedStrategy(thread_count=2): two .distcp files per rank

# ---------------------------------------------------------------- the torch_dist naming, as data
# megatron-core's local spec saves its norms under the Transformer-Engine names (get_gpt_layer_local_spec's
# sharded_state_dict_keys_map), so local and TE checkpoints are interchangeable on disk.
KEYS_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
LAYER_PREFIX = "decoder.layers.{j}."  # stacked: the layer number is dropped, a leading axis of size L added
STACKED_PREFIX = "decoder.layers."
# Kinds whose canonical sources are stored as separate chunks along dim 0 (apply_swiglu_sharded_factory:
# the global linear_fc1 is [all gate rows; all up rows], one chunk per half).
SOURCE_CHUNKS = frozenset({Kind.GATE_UP})
# megatron-core's unstacked save (singleton_local_shards) stores those two chunks as two tensors instead:
# `<key>_w` (gate rows) and `<key>_v` (up rows), apply_swiglu_sharded_factory
SWIGLU_HALVES = ("_w", "_v")
# Keys a model's sharded state dict never holds; a training run also saves these, the reader ignores them.
IGNORED_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine", "opt_param_scheduler")


def dist_key(target: str, layer: int | None, *, stacked: bool = True) -> str:
    """The torch_dist key of a bound local-spec key: norms TE-named, layers stacked (number dropped) unless
    `stacked` is False (megatron-core's singleton_local_shards / heterogeneous blocks keep the number)."""
    prefix = f"{STACKED_PREFIX}{layer}."
    if layer is None or not target.startswith(prefix):
        return target
    rest = target.removeprefix(prefix)
    for local, te in KEYS_MAP.items():
        if rest.startswith(local):
            rest = te + rest.removeprefix(local)
    return (STACKED_PREFIX if stacked else prefix) + rest


def extra_state_key(rule: Rule, layer: int, num_layers: int) -> str:
    """The ShardedObject key of a layer module's `_extra_state` (`<module key>/shard_<layer>_<L>`)."""
    return dist_key(rule.extra_state_key, layer) + f"/shard_{layer}_{num_layers}"


def model_rules(spec: ModelSpec) -> Iterator[tuple[Rule, int | None]]:
    """The bound local-spec rules of the whole model (TP=1, PP=1) in megatron-core's state-dict order, without
    the weightless output layer of a tied model (it has no sharded tensor)."""
    return ((rule, layer) for rule, layer in stage_rules(spec, pp_rank=0, pp=1) if rule.sources)


# ---------------------------------------------------------------- writer
@dataclasses.dataclass
class _Item:
    """One DCP write item and the function that makes its data when it is written."""

    write_item: WriteItem
    make: Callable[[], torch.Tensor | io.BytesIO]
    raw: Callable[[], RawRange | RawChain | None] | None = None  # where its bytes lie as they are, if they do


def _tensor_item(fqn: str, offsets: tuple, sizes: tuple, global_shape: tuple, dtype: torch.dtype,
                 make: Callable[[], torch.Tensor], raw: Callable[[], RawRange | RawChain | None] | None = None
                 ) -> _Item:
    offsets, sizes = torch.Size(offsets), torch.Size(sizes)
    return _Item(WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                           tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                                       properties=TensorProperties(dtype=dtype),
                                                       size=torch.Size(global_shape))), make, raw)


def _bytes_item(fqn: str, value=None) -> _Item:
    def make() -> io.BytesIO:
        buf = io.BytesIO()
        torch.save([value], buf)  # megatron-core stores a ShardedObject as the list of its local data
        return buf

    return _Item(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO), make)


def write_items(get: Callable[[str], torch.Tensor], spec: ModelSpec, *, padded: int,
                raw: Callable[[str], RawRange | RawChain | None] = lambda name: None) -> list[_Item]:
    """Every write item of the checkpoint, in the order of megatron-core's sharded state dict (TP=1, PP=1).

    `get(name)` returns a canonical tensor; it is called only when an item's data is made. `raw(name)` says
    where a canonical tensor's bytes lie in `spec.dtype` (rawcopy.raw_tensor), or None.
    """
    dtype, shapes = TORCH_DTYPES[spec.dtype], expected_shapes(spec)
    items: list[_Item] = []
    for rule, layer in model_rules(spec):
        local = rank_shape(rule.kind, spec, shapes[rule.sources[0]], tp=1, padded_vocab_size=padded)
        fqn, lead, one, outer = placement(rule, layer, spec)  # the stacked layer (or expert) axis, if any
        global_shape = outer + local
        if rule.kind in SOURCE_CHUNKS:
            row = 0
            for name in rule.sources:
                rows = shapes[name][0]

                def make(n=name, s=one + (rows,) + local[1:]):
                    return cast(get(n), spec.dtype).reshape(s)

                items.append(_tensor_item(fqn, lead + (row,) + (0,) * (len(local) - 1), one + (rows,) + local[1:],
                                          global_shape, dtype, make, lambda n=name: raw(n)))
                row += rows
        else:
            def make(r=rule, s=one + local):
                tensors = [get(n) for n in r.sources]
                if r.kind is Kind.VOCAB and tensors[0].shape[0] == padded:
                    piece = tensors[0]  # nothing to pad: no second copy of the largest tensor
                else:
                    piece = to_rank(r.kind, tensors, spec, tp_rank=0, tp=1, padded_vocab_size=padded)
                del tensors
                return cast(piece, spec.dtype).reshape(s)

            def whole_raw(r=rule):
                sources = [raw(n) for n in r.sources]
                if any(x is None for x in sources):
                    return None
                return rank_raw(r.kind, sources, spec, tp_rank=0, tp=1, padded_vocab_size=padded)

            items.append(_tensor_item(fqn, lead + (0,) * len(local), one + local, global_shape, dtype, make,
                                      whole_raw))
        if layer is not None and rule.extra_state:
            items.append(_bytes_item(layer_extra_state_key(rule, layer, spec)))
    return items


def placement(rule: Rule, layer: int | None, spec: ModelSpec) -> tuple[str, tuple, tuple, tuple]:
    """(torch_dist key, leading offsets, leading chunk sizes, leading global shape) of a bound rule's tensor.

    A dense LLaMA stacks its layers (a leading layer axis). A mixture-of-experts model (Llama 4; megatron-core
    with a `moe_layer_freq` list) keeps each layer's number in the key, and its experts share one tensor per layer
    and projection with a leading expert axis (`moe.py`)."""
    if layer is None:
        return dist_key(rule.target, None), (), (), ()
    if not spec.is_moe:
        return dist_key(rule.target, layer), (layer,), (1,), (spec.num_layers,)
    from megallama.formats.megatron.moe import dist_expert_key, expert_of

    e = expert_of(rule.target)
    if e is not None:
        return dist_expert_key(rule.target, layer), (e,), (1,), (spec.num_experts,)
    return dist_key(rule.target, layer, stacked=False), (), (), ()


def layer_extra_state_key(rule: Rule, layer: int, spec: ModelSpec) -> str:
    """The ShardedObject key of a layer module's `_extra_state` (`<key>/shard_<offset>_<global shape>`)."""
    if not spec.is_moe:
        return extra_state_key(rule, layer, spec.num_layers)
    from megallama.formats.megatron.moe import dist_expert_key, expert_of

    e = expert_of(rule.target)
    if e is not None:
        return dist_expert_key(rule.extra_state_key, layer) + f"/shard_{e}_{spec.num_experts}"
    return dist_key(rule.extra_state_key, layer, stacked=False) + "/shard_0_1"


def split_into_files(files: int, items: list[WriteItem]) -> list[list[WriteItem]]:
    """How megatron-core's FileSystemWriterAsync deals write items to its files (`_split_by_size_and_type`):
    byte items round-robin, then tensors largest first, each to the file with the fewest bytes so far (ties: the
    lowest index). Restated here so that conversion never imports megatron-core (seconds of start-up)."""
    if files == 1:
        return [list(items)]
    buckets: list[list[WriteItem]] = [[] for _ in range(files)]
    byte_items = [w for w in items if w.type == WriteItemType.BYTE_IO]
    for i, w in enumerate(byte_items):
        buckets[i % files].append(w)
    tensors = [(w, math.prod(w.tensor_data.chunk.sizes) * w.tensor_data.properties.dtype.itemsize)
               for w in items if w.type != WriteItemType.BYTE_IO]
    tensors.sort(key=lambda pair: pair[1], reverse=True)  # stable, like megatron-core's
    heap = [(0, i) for i in range(files)]
    for w, size in tensors:
        total, i = heapq.heappop(heap)
        buckets[i].append(w)
        heapq.heappush(heap, (total + size, i))
    return buckets


def _make(it: _Item):
    data = it.make()
    if torch.is_tensor(data) and data.untyped_storage().nbytes() != data.numel() * data.element_size():
        data = data.clone()  # a view: torch.save would write its whole storage (megatron-core clones too)
    return data


def _made_ahead(items: list[_Item]) -> Iterator[tuple[_Item, torch.Tensor | io.BytesIO]]:
    """(item, its data) in order, the next item's data made on a thread while the caller writes this one: the
    profile (docs/performance.md) shows the writer waiting on file writes with reading and fusing idle. Memory:
    one item more (at most the embedding)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="megallama-make") as pool:
        pending = pool.submit(_make, items[0]) if items else None
        for i, it in enumerate(items):
            data = pending.result()
            pending = pool.submit(_make, items[i + 1]) if i + 1 < len(items) else None
            yield it, data
            del data


def save_dcp(out_dir: Path, items: list[_Item], *, on_tensor: OnTensor | None = None) -> None:
    """Write `items` as PyTorch DCP files the way megatron-core's torch_dist strategy does at world size 1.

    Items go into megatron-core's two buckets (`split_into_files`) and are written in state-dict order,
    each made just before it is written and dropped after; `.metadata` comes last (FileSystemWriter.finish).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # megatron-core groups its plan by key (first appearance); the file assignment depends on that order
    by_key: dict[str, list[WriteItem]] = {}
    for it in items:
        by_key.setdefault(it.write_item.index.fqn, []).append(it.write_item)
    plan = SavePlan([w for group in by_key.values() for w in group])
    _, metadata = create_default_global_save_plan([plan])
    buckets = [b for b in split_into_files(WRITER_FILES, plan.items) if b]
    file_of = {id(w): i for i, bucket in enumerate(buckets) for w in bucket}
    names = [f"__0_{i}.distcp" for i in range(len(buckets))]
    # bytes first in each file, as megatron-core writes them; then tensors in state-dict order
    order = [it for want_bytes in (True, False) for it in items
             if (it.write_item.type == WriteItemType.BYTE_IO) == want_bytes]
    write = _write_framed if fast_copy_enabled() else _write_saved
    results = write(out_dir, names, [file_of[id(it.write_item)] for it in order], order, on_tensor)
    metadata.all_local_plans = [dataclasses.replace(plan, storage_data=None)]  # megatron-core keeps the plans
    writer = FileSystemWriter(out_dir)
    writer.set_up_storage_writer(True)
    writer.finish(metadata, [results])


def _write_saved(out_dir: Path, names: list[str], files: list[int], order: list[_Item],
                 on_tensor: OnTensor | None) -> list[WriteResult]:
    """Each item torch.save'd into its file by DCP's own `_write_item` (the tensor path)."""
    transforms = _StorageWriterTransforms(None)
    results = []
    streams = [open(out_dir / n, "wb") for n in names]  # noqa: SIM115 (closed below, all together)
    try:
        for f, (it, data) in zip(files, _made_ahead(order), strict=True):
            results.append(_write_item(transforms, streams[f], data, it.write_item, names[f],
                                       serialization_format=SerializationFormat.TORCH_SAVE))
            if on_tensor is not None and torch.is_tensor(data):
                on_tensor(it.write_item.index.fqn, data.numel() * data.element_size())
            del data
    finally:
        for s in streams:
            s.close()
    return results


def _write_framed(out_dir: Path, names: list[str], files: list[int], order: list[_Item],
                  on_tensor: OnTensor | None) -> list[WriteResult]:
    """The same bytes as `_write_saved`, laid out ahead (`dcp_frames.py`): each item's torch.save framing from
    torch, its tensor bytes copied file to file where they lie as they are, else written from the made tensor."""
    fds = [os.open(out_dir / n, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) for n in names]
    ends = [0] * len(names)  # where the next item of each file starts
    results = []
    try:
        with FramedWriter() as writer:
            for f, it in zip(files, order, strict=True):
                w = it.write_item
                if w.type == WriteItemType.BYTE_IO:
                    data = it.make().getvalue()
                    writer.put_bytes(fds[f], ends[f], data)
                    length = len(data)
                else:
                    frame = frame_of(tuple(w.tensor_data.chunk.sizes), w.tensor_data.properties.dtype)
                    raw = it.raw() if it.raw is not None else None
                    if raw is not None:
                        writer.put_raw(fds[f], ends[f], frame, raw)
                    else:
                        writer.put_tensor(fds[f], ends[f], frame, _make(it))
                    length = frame.length
                    if on_tensor is not None:
                        on_tensor(w.index.fqn, frame.nbytes)
                results.append(WriteResult(index=w.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(names[f], ends[f], length)))
                ends[f] += length
    finally:
        for fd in fds:
            os.close(fd)
    return results


def write_torch_dist(reader: Reader, out_dir: Path, *, tp: int | None = None, pp: int | None = None,
                     dtype: str | None = None,
                     divisible_by: int = 128, on_tensor: OnTensor | None = None, iteration: int | None = None,
                     args_overrides: dict | None = None, final_dir: Path | None = None, ep: int = 1) -> WriteReport:
    """Write `reader`'s model as a Megatron torch_dist checkpoint into the empty `out_dir`.

    The checkpoint loads at any TP x PP; `tp`/`pp`, when given, only set the vocab padding (as a Megatron-LM
    run at that TP pads it), the saved args and the launch flags. `final_dir` is where `out_dir` is renamed to.

    Example:
        >>> with open_hf(Path("llama-2-7b-hf")) as r:
        ...     write_torch_dist(r, Path("out"), tp=2, pp=2)
    """
    check_parallel(reader.spec, tp=tp or 1, pp=pp or 1, ep=ep)
    out_dir = Path(out_dir)
    final_dir = Path(final_dir or _staged_target(out_dir)).resolve()
    spec = reader.spec.replace(dtype=normalize_dtype(dtype) or reader.spec.dtype)
    padded = padded_vocab_size(spec.vocab_size, tp or 1, divisible_by)
    report = WriteReport(output=out_dir)
    tokenizer_type, tokenizer_model = args_tokenizer(reader.tokenizer_files, final_dir, vocab_size=spec.vocab_size,
                                                     padded=padded, tp=tp or 1, divisible_by=divisible_by)
    args = megatron_args(spec, tp=tp or 1, pp=pp or 1, padded_vocab_size=padded, divisible_by=divisible_by,
                         iteration=iteration or 0, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                         **{"ckpt_format": "torch_dist", **moe_args(spec, ep=ep), **(args_overrides or {})})
    it_dir = iteration_dir(out_dir, iteration)
    save_dcp(it_dir, write_items(reader.get, spec, padded=padded, raw=lambda n: raw_tensor(reader, n, spec.dtype)),
             on_tensor=on_tensor)
    torch.save(common_state(args, iteration), it_dir / COMMON_FILE)
    (it_dir / CONFIG_FILE).write_text(json.dumps(CONFIG))
    report.files += [str((it_dir / n).relative_to(out_dir)) for n in sorted(p.name for p in it_dir.iterdir())]
    report.files += copy_tokenizer(reader.tokenizer_files, out_dir)
    write_manifest(out_dir, spec=spec, fmt="megatron", sources=reader.source_files, tp=tp or 1, pp=pp or 1,
                   ep=ep, ckpt_format="torch_dist", vocab_size=spec.vocab_size, padded_vocab_size=padded,
                   divisible_by=divisible_by, rotary_interleaved=False, transformer_impl=args.transformer_impl,
                   layout="mcore-local", iteration="release" if iteration is None else iteration)
    (out_dir / ARGS_FILE).write_text("\n".join(dist_launch_flags(args, final_dir, tp=tp, pp=pp)) + "\n")
    report.files += [MANIFEST, ARGS_FILE, TRACKER]
    report.notes += _notes(spec, padded, tokenizer_type, tp=tp or 1, divisible_by=divisible_by)
    write_tracker(out_dir, iteration)
    return report


def dist_launch_flags(args, load_dir: Path, *, tp: int | None, pp: int | None) -> list[str]:
    """local.launch_flags for torch_dist: `--ckpt-format torch_dist`, TP/PP flags only when chosen."""
    drop = {f"--tensor-model-parallel-size {args.tensor_model_parallel_size}" if tp is None else None,
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}" if pp is None else None}
    return ["--ckpt-format torch_dist" if f == "--ckpt-format torch" else f
            for f in launch_flags(args, load_dir=load_dir) if f not in drop]


def common_state(args, iteration: int | None) -> dict:
    """common.pt: the non-tensor part of Megatron-LM's save_checkpoint state dict (no optimizer, no RNG)."""
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration or 0,
            "num_floating_point_operations_so_far": 0, "content_metadata": dict(CONTENT_METADATA)}


# ---------------------------------------------------------------- reader
class _RegionPlanner(LoadPlanner):
    """A DCP load planner for explicit regions of global tensors: {fqn: (offsets, destination tensor)}."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        self.regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, (offsets, dest) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        pass

    def resolve_tensor(self, read_item):
        return narrow_tensor_by_index(self.regions[read_item.dest_index.fqn][1], read_item.dest_offsets,
                                      read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class DistCheckpoint:
    """Random access to regions of the global tensors of one torch_dist iteration folder."""

    def __init__(self, it_dir: Path):
        self.dir = Path(it_dir)
        if not (self.dir / DCP_METADATA).is_file():
            raise InputError(f"{self.dir} has no {DCP_METADATA}: not a complete torch_dist checkpoint")
        self._storage = FileSystemReader(self.dir)
        self.metadata: Metadata = read_dcp_metadata(self.dir / DCP_METADATA)  # never a plain pickle.load
        try:
            self._storage.set_up_storage_reader(self.metadata, True)
        except AssertionError as e:
            raise InputError(f"{self.dir / DCP_METADATA} is not readable DCP metadata: {e}") from None
        self._check_files()

    def _check_files(self) -> None:
        """Every chunk lies inside its .distcp file (a truncated file is caught before any tensor is read)."""
        sizes: dict[str, int] = {}
        for index, info in (self.metadata.storage_data or {}).items():
            name = info.relative_path
            if name not in sizes:
                path = self.dir / name
                sizes[name] = path.stat().st_size if path.is_file() else -1
            if sizes[name] < 0:
                raise InputError(f"{self.dir / name} is missing (listed in {DCP_METADATA})")
            if info.offset + info.length > sizes[name]:
                raise InputError(f"{self.dir / name} is truncated: {index.fqn} ends at byte "
                                 f"{info.offset + info.length}, the file has {sizes[name]}")

    @property
    def tensors(self) -> dict[str, TensorStorageMetadata]:
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def raw_region(self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> RawRange | RawChain | None:
        """Where the bytes of a region lie in the .distcp files, if it is a row-major stack of whole chunks
        (chunks that differ only along the region's first dimension longer than 1, tiling it); else None."""
        md = self.metadata.state_dict_metadata[fqn]
        along = next((d for d, n in enumerate(sizes) if n != 1), len(sizes) - 1)
        pieces = []
        for chunk in md.chunks:
            at, n = tuple(chunk.offsets), tuple(chunk.sizes)
            if not all(a < o + s and o < a + m for a, m, o, s in zip(at, n, offsets, sizes, strict=True)):
                continue  # outside the region
            if any((at[d], n[d]) != (offsets[d], sizes[d]) for d in range(len(sizes)) if d != along):
                return None
            pieces.append((at[along], n[along], chunk))
        pieces.sort(key=lambda p: p[0])
        start = offsets[along]
        parts = []
        for at, n, chunk in pieces:
            info = (self.metadata.storage_data or {}).get(MetadataIndex(fqn, chunk.offsets))
            if at != start or info is None or info.transform_descriptors:
                return None
            part = torch_item_range(self.dir / info.relative_path, info.offset, info.length)
            if part is None or part.shape != tuple(chunk.sizes) or part.dtype != str(md.properties.dtype)[6:]:
                return None
            parts.append(part)
            start += n
        if start != offsets[along] + sizes[along]:
            return None
        return chain(parts, parts[0].dtype, tuple(sizes))

    def read(self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The region `offsets`..`offsets + sizes` of global tensor `fqn`, assembled from whatever chunks hold it."""
        md = self.metadata.state_dict_metadata[fqn]
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        planner = _RegionPlanner({fqn: (offsets, dest)})
        planner.set_up_planner({}, self.metadata)
        plan = self._storage.prepare_local_plan(planner.create_local_plan())
        try:
            self._storage.read_data(plan, planner).wait()
        except (RuntimeError, EOFError, OSError, ValueError, AssertionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{self.dir}: cannot read {fqn}: {first}") from None
        return dest


class _ModelView(Mapping):
    """The TP=1 torch-format `model` dict, read lazily from torch_dist: {local-spec key: (fqn, layer or None)}.

    MegatronReader asks for local-spec keys; each becomes one region (one layer) of one global tensor.
    """

    def __init__(self, ckpt: DistCheckpoint, targets: dict[str, tuple[str, int | None]]):
        self._ckpt, self._targets = ckpt, targets
        self._raw: dict[str, RawRange | RawChain | None] = {}  # the last key's raw()

    def __getitem__(self, key: str) -> torch.Tensor:
        fqn, layer = self._targets[key]
        if isinstance(fqn, tuple):  # unstacked SwiGLU halves: [gate; up], as the fused tensor holds them
            return torch.cat([self._whole(name) for name in fqn])
        size = tuple(self._ckpt.metadata.state_dict_metadata[fqn].size)
        if layer is None:
            return self._ckpt.read(fqn, (0,) * len(size), size)
        return self._ckpt.read(fqn, (layer,) + (0,) * (len(size) - 1), (1,) + size[1:])[0]

    def raw(self, key: str) -> RawRange | RawChain | None:
        """Where `__getitem__(key)`'s bytes lie in the .distcp files (rawcopy.py), or None."""
        if key not in self._raw:  # q, k and v ask for the same fused tensor
            self._raw = {key: self._find_raw(key)}
        return self._raw[key]

    def _find_raw(self, key: str) -> RawRange | RawChain | None:
        fqn, layer = self._targets[key]
        size = tuple(self._ckpt.metadata.state_dict_metadata[fqn].size)
        if layer is None:
            return self._ckpt.raw_region(fqn, (0,) * len(size), size)
        found = self._ckpt.raw_region(fqn, (layer,) + (0,) * (len(size) - 1), (1,) + size[1:])
        return None if found is None else chain(list(parts_of(found)), found.dtype, size[1:])

    def _whole(self, fqn: str) -> torch.Tensor:
        size = tuple(self._ckpt.metadata.state_dict_metadata[fqn].size)
        return self._ckpt.read(fqn, (0,) * len(size), size)

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)


def find_iteration_dir(path: Path) -> Path | None:
    """The iteration folder of a torch_dist checkpoint root (via its tracker) or the folder itself; None if
    `path` holds no torch_dist checkpoint (how `open_reader` tells torch_dist from torch format)."""
    path = Path(path)
    if (path / DCP_METADATA).is_file() or (path / CONFIG_FILE).is_file():
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8", errors="replace").strip()  # a binary file: not torch_dist
        if text == "release" or (text.isascii() and text.isdigit()):
            it_dir = iteration_dir(path, None if text == "release" else int(text))
            if (it_dir / DCP_METADATA).is_file() or (it_dir / CONFIG_FILE).is_file():
                return it_dir
    return None


def open_torch_dist(path: Path, *, model_config: Path | None = None) -> MegatronReader:
    """Open a torch_dist checkpoint (megallama's, or megatron-core's from any TP x PP, local or TE spec).

    `path` is the checkpoint root (with latest_checkpointed_iteration.txt) or one iteration folder. Optimizer,
    RNG and `_extra_state` entries are ignored. Without megallama.json the spec comes from `model_config`
    (--model-config: a config.json / params.json or a folder with one), else from common.pt's args.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"input folder {path} does not exist")
    it_dir = find_iteration_dir(path)
    if it_dir is None:
        raise InputError(f"{path} holds no torch_dist checkpoint (no {TRACKER} pointing at a folder with "
                         f"{DCP_METADATA} or {CONFIG_FILE})")
    root = it_dir.parent
    config_path = it_dir / CONFIG_FILE
    if config_path.is_file():
        try:
            backend = json.loads(config_path.read_text()).get("sharded_backend")
        except (json.JSONDecodeError, AttributeError):
            raise InputError(f"{config_path} is not valid JSON") from None
        if backend != "torch_dist":
            raise InputError(f"{config_path} names sharded backend {backend!r}: only torch_dist is supported")
    ckpt = DistCheckpoint(it_dir)
    common = load_rank_file(it_dir / COMMON_FILE) if (it_dir / COMMON_FILE).is_file() else {}
    args = common.get("args") if isinstance(common, dict) else None
    embedding = ckpt.tensors.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise InputError(f"{it_dir} has no embedding.word_embeddings.weight: not a megatron-core GPTModel checkpoint")
    padded = embedding.size[0]
    dtype = normalize_dtype(str(embedding.properties.dtype))
    manifest = read_manifest(root) or {}
    notes: list[str] = []
    if manifest.get("format") == "megatron" and manifest.get("spec"):
        spec = ModelSpec.from_dict({**manifest["spec"], "dtype": dtype})
        spec = spec.replace(vocab_size=manifest.get("vocab_size", spec.vocab_size))
    elif model_config is not None:
        manifest = {}
        spec = spec_from_config_file(root, dtype, model_config)
        notes.append(f"architecture from --model-config {model_config}")
    else:
        manifest = {}
        spec = spec_from_args(args, padded_vocab_size=padded, dtype=dtype, notes=notes)
    if padded < spec.vocab_size:
        raise InputError(f"embedding has {padded} rows but the vocab is {spec.vocab_size}")
    view = _ModelView(ckpt, _targets(ckpt, spec, padded=padded))
    interleaved = bool(manifest.get("rotary_interleaved", getattr(args, "rotary_interleaved", False)))
    # every global tensor holds exactly what rank 0 of a TP=1, PP=1 torch-format checkpoint holds
    reader = MegatronReader(spec, tp=1, pp=1, rotary_interleaved=interleaved, load_state=lambda t, p: view)
    reader.raw_part = view.raw
    reader.tokenizer_files = [root / n for n in TOKENIZER_FILES if (root / n).is_file()]
    reader.source_files = sorted(p for p in it_dir.iterdir() if p.is_file())
    reader.notes = notes
    # torch_dist loads at any TP x PP; commands that run the model default to the split it was saved for
    reader.saved_tp = int(manifest.get("tp") or getattr(args, "tensor_model_parallel_size", 1) or 1)
    reader.saved_pp = int(manifest.get("pp") or getattr(args, "pipeline_model_parallel_size", 1) or 1)
    reader.saved_ep = int(manifest.get("ep") or getattr(args, "expert_model_parallel_size", 1) or 1)
    return reader


def _targets(ckpt: DistCheckpoint, spec: ModelSpec, *, padded: int) -> dict[str, tuple[str | tuple, int | None]]:
    """{local-spec key: (torch_dist fqn, index into its stacked layer axis or None)}. Checks every global shape
    and refuses model tensors it cannot place (another architecture), collecting all problems first."""
    shapes, tensors = expected_shapes(spec), ckpt.tensors
    problems: list[str] = []
    targets: dict[str, tuple[str | tuple, int | None]] = {}
    for rule, layer in model_rules(spec):
        local = rank_shape(rule.kind, spec, shapes[rule.sources[0]], tp=1, padded_vocab_size=padded)
        fqn, want, index = dist_key(rule.target, layer), local, None
        if layer is not None and spec.is_moe:
            fqn, lead, _, outer = placement(rule, layer, spec)
            want, index = outer + local, (lead[0] if lead else None)
        elif layer is not None:
            want, index = (spec.num_layers,) + local, layer
            unstacked = dist_key(rule.target, layer, stacked=False)
            halves = tuple(unstacked + suffix for suffix in SWIGLU_HALVES)
            if fqn not in tensors and unstacked in tensors:  # the key keeps the layer number, no layer axis
                fqn, want, index = unstacked, local, None
            elif fqn not in tensors and rule.kind in SOURCE_CHUNKS and all(h in tensors for h in halves):
                # unstacked SwiGLU: gate and up rows under two keys (`_w`, `_v`), each [F, ...] of [2F, ...]
                fqn, want, index = halves, (local[0] // 2,) + local[1:], None
        for name in (fqn if isinstance(fqn, tuple) else (fqn,)):
            md = tensors.get(name)
            if md is None:
                problems.append(f"missing {name}")
            elif tuple(md.size) != want:
                problems.append(f"{name} has shape {tuple(md.size)}, expected {want}")
        targets[rule.target] = (fqn, index)
    used = {name for fqn, _ in targets.values() for name in (fqn if isinstance(fqn, tuple) else (fqn,))}
    problems += [f"unexpected {k}" for k in sorted(tensors) if k not in used and not k.startswith(IGNORED_PREFIXES)]
    if problems:
        raise InputError(f"checkpoint does not match a LLaMA model of its config ({len(problems)} problems): "
                         + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
    return targets
