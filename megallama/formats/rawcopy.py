"""Bytes that need no transform go file to file: where a tensor lies in its file, and copying it from there.

Most tensors of hf2pth / pth2hf keep their dtype and layout (all but the rotary q/k rows): their bytes in the
output are their bytes in the input. Instead of mapping the input, building a tensor, cloning it and writing it
(three passes over memory plus page faults), a `RawRange` names the bytes in the source file and
`copy_range` moves them with `os.copy_file_range` (in the kernel, no user-space copy); where the output needs
a CRC-32 (torch's zip) it is computed on the source pages through a read-only mapping, no copy either (falling
back to `pread` into one reused buffer, `zlib.crc32` and `pwrite` where the kernel refuses copy_file_range).
All of these release the GIL, so worker threads overlap. The output is byte for byte what the tensor path
writes; the tests compare the two (tests/test_fast_copy.py). `MEGALLAMA_FAST_COPY=0` turns the fast path off.

Where tensors lie:
- safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
  data section; a tensor is `data_offsets` past the header;
- torch.save zip (Meta's consolidated.NN.pth): each storage is one STORED (uncompressed) zip record; the pickle
  says which storage, offset and strides each tensor has. The pickle is read by an unpickler that resolves
  nothing but torch's tensor and storage rebuilders (anything else: no fast path, the normal loader decides).
"""

from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

BUFFER_BYTES = 1 << 23  # one pread / crc32 / pwrite step
IOV_MAX = 1024  # buffers per preadv call (Linux's UIO_MAXIOV)
# safetensors dtype names; their order is the order of safetensors' Dtype enum (it sorts tensors by it, largest
# first, then by name). Only the float dtypes megallama writes.
ST_ORDER = ("F16", "BF16", "F32")
ST_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def fast_copy_enabled() -> bool:
    return os.environ.get("MEGALLAMA_FAST_COPY", "1") != "0"


def raw_tensor(reader, name: str, dtype: str) -> RawRange | None:
    """Where the canonical tensor `name` lies in `reader`'s files, if its bytes there are its canonical bytes in
    `dtype` (readers that can tell have a `raw(name)` method); None: read it as a tensor."""
    raw = getattr(reader, "raw", None)
    if raw is None or not fast_copy_enabled():
        return None
    found = raw(name)
    return found if found is not None and found.dtype == dtype else None


@dataclass(frozen=True)
class RawRange:
    """A tensor's bytes: `nbytes` at `offset` of `path`, C-contiguous, of `dtype` ("bfloat16") and `shape`."""

    path: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    def rows(self, rank: int, n: int) -> RawRange:
        """Rank's contiguous 1/n along dim 0 (a row block of a C-contiguous tensor is one byte range)."""
        assert self.shape and self.shape[0] % n == 0 and self.nbytes % n == 0
        part = self.nbytes // n
        return RawRange(self.path, self.offset + rank * part, part, self.dtype,
                        (self.shape[0] // n, *self.shape[1:]))


@dataclass(frozen=True)
class RawChain:
    """A tensor whose bytes are several byte ranges one after another, e.g. a fused QKV made of q, k and v row
    blocks (formats/megatron/row_trace.py finds them), of `dtype` and `shape`."""

    parts: tuple[RawRange, ...]
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def parts_of(raw: RawRange | RawChain) -> tuple[RawRange, ...]:
    return raw.parts if isinstance(raw, RawChain) else (raw,)


def byte_slice(raw: RawRange | RawChain, begin: int, end: int) -> list[RawRange]:
    """The byte ranges holding bytes `begin`..`end` of `raw` (split where its parts meet)."""
    out, at = [], 0
    for p in parts_of(raw):
        lo, hi = max(begin, at), min(end, at + p.nbytes)
        if lo < hi:
            out.append(RawRange(p.path, p.offset + lo - at, hi - lo, p.dtype, (hi - lo,)))
        at += p.nbytes
    return out


def chain(parts: list[RawRange], dtype: str, shape: tuple[int, ...]) -> RawRange | RawChain:
    """`parts` as one RawRange where they are adjacent in one file, else a RawChain."""
    merged: list[RawRange] = []
    for p in parts:
        last = merged[-1] if merged else None
        if last is not None and last.path == p.path and last.offset + last.nbytes == p.offset:
            merged[-1] = RawRange(p.path, last.offset, last.nbytes + p.nbytes, dtype, ())
        else:
            merged.append(p)
    if len(merged) == 1:
        return RawRange(merged[0].path, merged[0].offset, merged[0].nbytes, dtype, tuple(shape))
    return RawChain(tuple(merged), dtype, tuple(shape))


# ---------------------------------------------------------------- where tensors lie
def safetensors_ranges(path: Path) -> dict[str, RawRange]:
    """{name: RawRange} of a safetensors file, from its header alone ({} if the header is not as expected)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError):
        return {}
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = {v: k for k, v in ST_NAMES.items()}.get(entry.get("dtype"))
        begin, end = entry["data_offsets"]
        if dtype is not None:
            out[name] = RawRange(path, 8 + size + begin, end - begin, dtype, tuple(entry["shape"]))
    return out


class _Storage:
    def __init__(self, key: str, dtype: str):
        self.key, self.dtype = key, dtype


class _RangeUnpickler(pickle.Unpickler):
    """A torch.save pickle with each tensor replaced by (storage, offset, size, stride); refuses other globals."""

    DTYPES = {"BFloat16Storage": "bfloat16", "HalfStorage": "float16", "FloatStorage": "float32"}

    def persistent_load(self, pid):  # ("storage", storage type, key, location, numel)
        return _Storage(str(pid[2]), pid[1])

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuilt
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in self.DTYPES:
            return self.DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor")


def _rebuilt(storage, storage_offset, size, stride, *rest):
    return storage, int(storage_offset), tuple(size), tuple(stride)


def torch_zip_ranges(path: Path) -> dict[str, RawRange]:
    """{name: RawRange} of a torch.save'd flat {name: tensor} dict; tensors that are not compact, or a file
    that is not such a dict, give no entry (the normal loader reads them)."""
    path = Path(path)
    with open(path, "rb") as f:
        found = _zip_tensors(f)
        if found is None or not isinstance(found[0], dict):
            return {}
        obj, infos, prefix = found
        out = {}
        for name, value in obj.items():
            raw = _tensor_range(f, path, 0, value, infos, prefix)
            if raw is not None:
                out[name] = raw
        return out


def torch_item_range(path: Path, offset: int, length: int) -> RawRange | None:
    """Where the bytes of the one tensor torch.save'd at `offset`..`offset + length` of `path` lie (a DCP
    `.distcp` item, TORCH_SAVE format); None if it is not a compact tensor there."""
    path = Path(path)
    with open(path, "rb") as f:
        window = _Window(f, offset, length)
        found = _zip_tensors(window)
        return None if found is None else _tensor_range(window, path, offset, found[0], found[1], found[2])


def _zip_tensors(f) -> tuple[object, dict[str, zipfile.ZipInfo], str] | None:
    """(the pickled object with tensors as (storage, offset, size, stride), the zip's records, its prefix)."""
    try:
        with zipfile.ZipFile(f) as z:
            infos = {i.filename: i for i in z.infolist()}
            pkl = next(n for n in infos if n.endswith("/data.pkl"))
            obj = _RangeUnpickler(z.open(pkl)).load()
    except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, TypeError, ValueError,
            AttributeError, KeyError, IndexError):
        return None
    return obj, infos, pkl.removesuffix("data.pkl")


def _tensor_range(f, path: Path, base: int, value, infos: dict[str, zipfile.ZipInfo], prefix: str
                  ) -> RawRange | None:
    """The RawRange of one unpickled tensor `value` of the zip read through `f`, which starts at `base` of `path`."""
    if not (isinstance(value, tuple) and len(value) == 4 and isinstance(value[0], _Storage)):
        return None
    storage, storage_offset, shape, stride = value
    info = infos.get(f"{prefix}data/{storage.key}")
    if info is None or info.compress_type != zipfile.ZIP_STORED or not _compact(shape, stride):
        return None
    itemsize = ITEMSIZE[storage.dtype]
    nbytes = itemsize * _numel(shape)
    start = storage_offset * itemsize
    if start + nbytes > info.file_size:
        return None
    return RawRange(path, base + data_offset(f, info) + start, nbytes, storage.dtype, shape)


class _Window(io.RawIOBase):
    """Bytes `offset`..`offset + length` of an open file, as a file of their own (one zip inside a .distcp)."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def data_offset(f, info: zipfile.ZipInfo) -> int:
    """File offset of a zip record's data (past its local header, whose extra field may differ from the
    central directory's)."""
    f.seek(info.header_offset + 26)
    name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _compact(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    want, expect = 1, []
    for s in reversed(shape):
        expect.insert(0, want)
        want *= s
    return all(st == e for s, st, e in zip(shape, stride, expect, strict=True) if s != 1)


# ---------------------------------------------------------------- copying
class SourceFiles:
    """Read-only descriptors of source files, opened once each."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int, *,
               crc: bool = False, crc_start: int = 0) -> int | None:
    """Copy `nbytes` between two files at the given offsets; with `crc`, return their CRC-32 (one pass), continuing
    from `crc_start` (the CRC of the bytes before them)."""
    if _kernel_copy(src_fd, src_offset, dst_fd, dst_offset, nbytes):
        return _mapped_crc(src_fd, src_offset, nbytes, crc_start) if crc else None
    buf = bytearray(min(BUFFER_BYTES, max(nbytes, 1)))
    view = memoryview(buf)
    value, done = crc_start, 0
    while done < nbytes:
        n = os.preadv(src_fd, [view[: min(len(buf), nbytes - done)]], src_offset + done)
        if n == 0:
            raise OSError(f"unexpected end of file after {done} of {nbytes} bytes")
        if crc:
            value = zlib.crc32(view[:n], value)
        written = 0
        while written < n:
            written += os.pwrite(dst_fd, view[written:n], dst_offset + done + written)
        done += n
    return value if crc else None


def copy_raw(sources: SourceFiles, raw: RawRange | RawChain, dst_fd: int, dst_offset: int, *,
             crc: bool = False) -> int | None:
    """Copy every part of `raw` to `dst_offset`.. of `dst_fd`, one after another; with `crc`, their CRC-32."""
    value = 0
    for p in parts_of(raw):
        value = copy_range(sources.fd(p.path), p.offset, dst_fd, dst_offset, p.nbytes, crc=crc, crc_start=value)
        dst_offset += p.nbytes
    return value if crc else None


def _mapped_crc(fd: int, offset: int, nbytes: int, value: int = 0) -> int:
    """CRC-32 of a file range read through a read-only mapping: no copy into a user buffer (the pages were just
    read by the copy, so they are in the page cache). Measured on the 2.2 GB file: copy_file_range + this costs
    the CPU time of a plain copy; pread + crc32 + pwrite costs 2.4x that."""
    if nbytes == 0:
        return value
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, offset + nbytes - start, prot=mmap.PROT_READ, offset=start) as mapped:
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mapped)
        try:
            for at in range(offset - start, offset - start + nbytes, BUFFER_BYTES):
                value = zlib.crc32(view[at:min(at + BUFFER_BYTES, offset - start + nbytes)], value)
            return value
        finally:
            view.release()


def _kernel_copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> bool:
    """os.copy_file_range until done; False when the kernel refuses before the first byte (then the caller copies
    through user space), an error after it is raised."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError:
            if done == 0:
                return False
            raise
        if n == 0:
            raise OSError(f"unexpected end of file after {done} of {nbytes} bytes")
        done += n
    return True


def read_column_blocks(raw: RawRange, n: int) -> list:
    """The `n` dim-1 blocks of the 2-D row-major tensor at `raw`, each a C-contiguous tensor of its own, from one
    pass over the file range: `preadv` scatters each row's pieces straight into the blocks (a dim-1 slice is no
    byte range, so these bytes must pass through memory, once)."""
    import torch

    rows, cols = raw.shape
    part = raw.nbytes // rows // n
    blocks = [torch.empty(rows, cols // n, dtype=getattr(torch, raw.dtype)) for _ in range(n)]
    views = [memoryview(b.view(-1).view(torch.uint8).numpy()) for b in blocks]
    pieces = [views[k][r * part:(r + 1) * part] for r in range(rows) for k in range(n)]
    fd = os.open(raw.path, os.O_RDONLY)
    try:
        at = raw.offset
        for i in range(0, len(pieces), IOV_MAX):
            batch = pieces[i:i + IOV_MAX]
            got = os.preadv(fd, batch, at)
            if got != len(batch) * part:  # a regular file reads short only at its end
                raise OSError(f"{raw.path}: unexpected end of file at byte {at + got}")
            at += got
    finally:
        os.close(fd)
    return blocks


def write_tensor_bytes(fd: int, offset: int, tensor, *, crc: bool = False) -> int | None:
    """pwrite a tensor's bytes at `offset`; with `crc`, return their CRC-32."""
    data = memoryview(tensor.contiguous().view(-1).view(torch_uint8()).numpy())
    written = 0
    while written < len(data):  # pwrite may write less than asked (at most 2 GiB per call on Linux)
        written += os.pwrite(fd, data[written:], offset + written)
    return zlib.crc32(data) if crc else None


def torch_uint8():
    import torch

    return torch.uint8


# ---------------------------------------------------------------- safetensors without a dict of tensors
def safetensors_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
                       ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes safetensors' `save_file` writes for `entries` [(name, dtype, shape)], and each tensor's
    (begin, end) in the data section: tensors sorted by dtype (largest first, safetensors' enum order) then
    name, compact JSON, padded with spaces to a multiple of 8."""
    order = sorted(entries, key=lambda e: (-ST_ORDER.index(ST_NAMES[e[1]]), e[0]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    spans, at = {}, 0
    for name, dtype, shape in order:
        n = ITEMSIZE[dtype] * _numel(shape)
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        spans[name] = (at, at + n)
        at += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, spans


def save_safetensors_streamed(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], fetch, *,
                              metadata: dict[str, str] | None = None, on_tensor=None) -> None:
    """Write the safetensors file `save_file` would write for `entries`, one tensor at a time: `fetch(name)`
    gives a tensor (written from memory) or a RawRange / RawChain (copied file to file). Memory: one tensor, not
    the file."""
    header, spans = safetensors_header(entries, metadata)
    sources = SourceFiles()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, header, 0)
        total = len(header) + max((end for _, end in spans.values()), default=0)
        os.ftruncate(fd, total)
        for name, dtype, shape in entries:
            begin, end = spans[name]
            value = fetch(name)
            if isinstance(value, (RawRange, RawChain)):
                assert value.nbytes == end - begin and value.dtype == dtype, (name, value, dtype, shape)
                copy_raw(sources, value, fd, len(header) + begin)
            else:
                assert tuple(value.shape) == tuple(shape) and str(value.dtype) == f"torch.{dtype}", (name, shape)
                write_tensor_bytes(fd, len(header) + begin, value)
            if on_tensor is not None:
                on_tensor(name, end - begin)
            del value
    finally:
        os.close(fd)
        sources.close()
