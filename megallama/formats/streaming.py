"""torch.save without holding the tensors: lay the file out first, write each tensor into its slot from a small
thread pool, then set the zip's CRCs.

A rank or shard file can be larger than the memory one wants to spend (a 70B model at TP=8 has 17 GB ranks).
torch.save needs every tensor in memory at once, so instead:

1. `torch.save` the object with placeholder tensors (untouched `torch.empty`: never resident) under torch's
   `skip_data()`, which lays out every record and reserves its bytes without writing them (a sparse file;
   a prototype API since torch 2.5; the tests pin the result against a plain torch.save);
2. read the slots back from the layout's own pickle: which data record (and so which file offset) holds each
   placeholder;
3. `pwrite` each real tensor's bytes into its slot as it is produced, together with the record's CRC-32
   (torch.load never checks CRCs, zip tools do). Writes and CRCs run on worker threads (both release the
   GIL), so reading and transforming the next tensor overlaps writing this one; at most `window_bytes` of
   tensors wait for a worker, which bounds the memory on top of the tensor being built;
4. write the CRCs into the zip's data descriptors and central directory.

The file is then byte for byte what torch.save of the whole object gives, its `.data/serialization_id` included
(not random: a hash of the record names and CRC-32s, recomputed with the CRCs, `serialization_id`).
"""

from __future__ import annotations

import errno
import os
import pickle
import resource
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megallama.formats.base import OnTensor
from megallama.formats.rawcopy import RawChain, RawRange, SourceFiles, copy_raw

WORKERS = 2  # threads writing slots; the main thread reads and transforms meanwhile
WINDOW_BYTES = 1 << 26  # tensor bytes handed over but not yet written, at most (one bigger tensor may pass alone)


def save_streamed(path: Path, skeleton, tensors: Iterable[tuple[str, torch.Tensor | None]], *,
                  flat: Callable = lambda obj: obj, on_tensor: OnTensor | None = None) -> None:
    """torch.save `skeleton`, whose tensors are placeholders at `flat(skeleton)[key]`, with the bytes of `tensors`.

    Each `(key, tensor)` must match its placeholder's shape and dtype; None values are skipped; a RawRange
    instead of a tensor is copied file to file (rawcopy.py). Example:
        >>> skeleton = {"w": torch.empty(4096, 4096)}
        >>> save_streamed(Path("w.pt"), skeleton, ((k, make(k)) for k in skeleton))
    """
    with StreamedFiles(on_tensor=on_tensor) as files:
        out = files.add(path, skeleton, flat=flat)
        del skeleton
        for key, t in tensors:
            if isinstance(t, (RawRange, RawChain)):
                files.put_raw(out, key, t)
            elif t is not None:
                files.put(out, key, t)


@dataclass
class Slot:
    """Where one placeholder's bytes go: its zip record, the file offset of the record's data, its size."""

    record: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


@dataclass
class _Layout:
    path: Path
    fd: int
    slots: dict[str, Slot]
    crcs: dict[str, int] = field(default_factory=dict)  # record -> CRC-32 of the bytes written into it


class StreamedFiles:
    """Several streamed torch.save files filled side by side (all TP ranks of a stage from one read of each tensor).

        with StreamedFiles() as files:
            a, b = files.add(path_a, skeleton_a), files.add(path_b, skeleton_b)
            for key, (ta, tb) in pieces:
                files.put(a, key, ta)
                files.put(b, key, tb)

    Leaving the block waits for every write and sets the CRCs; an error in a worker is raised there (or by the
    next `put`). `on_tensor(key, nbytes)` hears each tensor as it is handed over.
    """

    def __init__(self, *, workers: int | None = None, window_bytes: int | None = None,
                 on_tensor: OnTensor | None = None):
        self._pool = ThreadPoolExecutor(workers or WORKERS, thread_name_prefix="megallama-write")
        self._window = WINDOW_BYTES if window_bytes is None else window_bytes
        self._on_tensor = on_tensor
        self._layouts: list[_Layout] = []
        self._futures: list[Future] = []
        self._pending = 0  # bytes handed over and not yet written
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._sources = SourceFiles()  # input files of put_raw, opened once

    def add(self, path: Path, skeleton, *, flat: Callable = lambda obj: obj) -> _Layout:
        """Lay out `skeleton` at `path` (placeholders not written) and return the handle `put` fills."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.serialization.skip_data():
            save_or_disk_error(skeleton, path, needed=storage_bytes(skeleton))
        layout = _Layout(path, os.open(path, os.O_RDWR), read_slots(path, flat))
        self._layouts.append(layout)
        return layout

    def put(self, layout: _Layout, key: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` for its slot; blocks while the window is full. The caller must not change it afterwards."""
        slot = layout.slots[key]
        assert tuple(tensor.shape) == slot.shape and tensor.dtype == slot.dtype, (key, slot, tensor.shape)
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()  # the raw bytes, no copy
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or self._pending == 0
                                or self._pending + slot.nbytes <= self._window)
            if self._error is not None:
                raise self._error
            self._pending += slot.nbytes
        self._futures.append(self._pool.submit(self._write, layout, slot, data))
        if self._on_tensor is not None:
            self._on_tensor(key, slot.nbytes)

    def put_raw(self, layout: _Layout, key: str, raw: RawRange | RawChain) -> None:
        """Queue a file-to-file copy of `raw` (the tensor's bytes in input files) into `key`'s slot; the CRC-32
        is computed on the source pages as they pass."""
        slot = layout.slots[key]
        assert raw.shape == slot.shape and raw.nbytes == slot.nbytes and raw.dtype == str(slot.dtype)[6:], (
            key, slot, raw)
        if self._error is not None:
            raise self._error
        for part in (raw.parts if isinstance(raw, RawChain) else (raw,)):
            self._sources.fd(part.path)  # opened here: SourceFiles is not shared between threads otherwise
        self._futures.append(self._pool.submit(self._copy, layout, slot, raw))
        if self._on_tensor is not None:
            self._on_tensor(key, slot.nbytes)

    def _copy(self, layout: _Layout, slot: Slot, raw: RawRange | RawChain) -> None:
        try:
            layout.crcs[slot.record] = copy_raw(self._sources, raw, layout.fd, slot.offset, crc=True)
        except BaseException as e:
            with self._cond:
                self._error = self._error or e
            raise

    def _write(self, layout: _Layout, slot: Slot, data) -> None:
        try:
            view = memoryview(data)
            written = 0
            while written < len(view):  # pwrite may write less than asked (at most 2 GiB per call on Linux)
                written += os.pwrite(layout.fd, view[written:], slot.offset + written)
            layout.crcs[slot.record] = zlib.crc32(view)
        except BaseException as e:
            with self._cond:
                self._error = self._error or e
            raise
        finally:
            del data
            with self._cond:
                self._pending -= slot.nbytes
                self._cond.notify_all()

    def __enter__(self) -> StreamedFiles:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
            if exc_type is None:
                for f in self._futures:
                    f.result()  # a worker's error, raised here
                for layout in self._layouts:
                    missing = set(layout.slots) - {k for k, s in layout.slots.items() if s.record in layout.crcs}
                    assert not missing, f"{layout.path}: no tensor for {sorted(missing)[:3]}"
                    os.close(layout.fd)
                    layout.fd = -1
                    write_crcs(layout.path, layout.crcs)
        finally:
            self._sources.close()
            for layout in self._layouts:
                if layout.fd >= 0:
                    os.close(layout.fd)
                    layout.fd = -1


# ---------------------------------------------------------------- a failed torch.save, told apart
# torch's zip writer reports a failed write without its errno: "PytorchStreamWriter failed writing file ..."
# or, when miniz notices first, "... unexpected pos ...".
_ZIP_WRITE_FAILED = ("PytorchStreamWriter failed writing", "unexpected pos")


def save_or_disk_error(obj, path: Path, *, needed: int) -> None:
    """torch.save(obj, path); a failed write that the file-size limit or the free space explains is raised as
    that OSError (EFBIG / ENOSPC: a one-line disk error for the user), anything else as torch raised it.
    `needed` is a lower bound of the file's size (its tensor bytes)."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        cause = disk_error(Path(path), needed) if any(m in str(e) for m in _ZIP_WRITE_FAILED) else None
        if cause is None:
            raise
        raise cause from e


def disk_error(path: Path, needed: int) -> OSError | None:
    """EFBIG when `needed` bytes exceed this process's file-size limit (ulimit -f), ENOSPC when they exceed the
    free space of `path`'s file system; None when neither explains a failed write."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and needed > limit:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return None
    if fs.f_bavail * fs.f_frsize < needed:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def storage_bytes(obj) -> int:
    """Bytes of the distinct tensor storages in a nested dict / list / tuple (what torch.save writes as data)."""
    sizes: dict[int, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            storage = item.untyped_storage()
            sizes[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return sum(sizes.values())


# ---------------------------------------------------------------- reading the layout back
class _SlotUnpickler(pickle.Unpickler):
    """Reads a torch.save pickle with every tensor replaced by (storage key, shape, dtype).

    Only used on a file this process has just written, so resolving its globals is safe.
    """

    def persistent_load(self, pid):  # ("storage", storage type, key, location, numel)
        return pid[2], pid[1].dtype

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _placeholder
        if module == "torch" and name.endswith("Storage"):  # as torch.load does: no TypedStorage warning
            return torch.serialization.StorageType(name)
        return super().find_class(module, name)


def _placeholder(storage, storage_offset, size, stride, *rest):
    key, dtype = storage
    compact = [1]
    for n in reversed(size[1:]):
        compact.insert(0, compact[0] * n)
    assert storage_offset == 0 and (not size or list(stride) == compact), "placeholders are compact tensors"
    return key, tuple(size), dtype


def read_slots(path: Path, flat: Callable = lambda obj: obj) -> dict[str, Slot]:
    """{key of flat(object): Slot} for a skip_data torch.save file."""
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        pkl = next(n for n in infos if n.endswith("/data.pkl"))
        prefix = pkl.removesuffix("data.pkl")
        obj = _SlotUnpickler(z.open(pkl)).load()
    slots = {}
    with open(path, "rb") as f:
        for key, value in flat(obj).items():
            if value is None:
                continue
            storage, shape, dtype = value
            record = f"{prefix}data/{storage}"
            slots[key] = Slot(record, _data_offset(f, infos[record]), shape, dtype)
    return slots


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    f.seek(info.header_offset + 26)
    name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def serialization_id(written: bytes, crcs: list[int]) -> bytes:
    """torch's `.data/serialization_id` for records of these CRC-32s (in write order, the id's own excluded):
    not random, but 20 digits hashing the record names (kept from `written`, the id torch wrote for the same
    names) and 20 folding the CRC-32s with c10::hash_combine (`PyTorchStreamWriter::writeSerializationId`)."""
    mask, combined = (1 << 64) - 1, 0
    for value in crcs:
        combined = (combined ^ ((value + 0x9E3779B9 + (combined << 6) + (combined >> 2)) & mask)) & mask
    return written[:20] + f"{combined:020d}".encode()


def write_crcs(path: Path, crcs: dict[str, int]) -> None:
    """Write `crcs` ({record: CRC-32}) into the data descriptors and central directory of the zip at `path`,
    and the serialization id they give (with its own CRC-32)."""
    with zipfile.ZipFile(path) as z:
        infos, central = z.infolist(), z.start_dir
    ident = next((i for i in infos if i.filename.endswith(".data/serialization_id")), None)
    with open(path, "r+b") as f:
        if ident is not None and ident.file_size == 40:
            at = _data_offset(f, ident)
            f.seek(at)
            digits = serialization_id(f.read(40), [crcs.get(i.filename, i.CRC) for i in infos if i is not ident])
            f.seek(at)
            f.write(digits)
            crcs = {**crcs, ident.filename: zlib.crc32(digits)}
        for info in infos:  # central directory entries come in the same order as infolist()
            f.seek(central)
            entry = f.read(46)
            sizes = struct.unpack("<HHH", entry[28:34])  # name, extra, comment lengths
            crc = crcs.get(info.filename)
            if crc is not None and crc != info.CRC:
                f.seek(central + 16)
                f.write(struct.pack("<I", crc))
                if info.flag_bits & 0x8:  # a data descriptor follows the data: [signature] crc sizes
                    end = _data_offset(f, info) + info.compress_size
                    f.seek(end)
                    has_signature = f.read(4) == b"PK\x07\x08"
                    f.seek(end + (4 if has_signature else 0))
                    f.write(struct.pack("<I", crc))
            central += 46 + sum(sizes)
