"""DCP `.distcp` files written as torch writes them, with each tensor's bytes moved file to file where they can be.

A `.distcp` file of DCP's TORCH_SAVE format is its write items one after another, each a complete `torch.save`
zip of one tensor (or the bytes of a ShardedObject). torch.save's framing of a tensor (zip records, their
names and 64-byte alignment, the pickle, the serialization id) depends on the tensor's shape and dtype only,
so it is made by torch itself: `torch.save(placeholder)` under `skip_data()` into a recorder that keeps the
bytes written and skips the data record (`frame_of`). Then each item is

    [ head: local headers, data.pkl, ... | data: the tensor's bytes | tail: version, serialization_id, central
      directory ]

at a known offset: the head and tail are written with `pwrite`, the data copied from the source file
(`rawcopy.copy_raw`, one or several byte ranges; the CRC-32 on the source pages) or written from one
contiguous tensor, and the data record's CRC-32 is set in the head and tail before they are written. The items
are byte for byte what `torch.save(tensor, stream)` writes (tests/test_fast_copy.py compares the files with the
tensor path's, `MEGALLAMA_FAST_COPY=0`), but for the random serialization id torch stamps on every save.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from megallama.formats.rawcopy import RawChain, RawRange, SourceFiles, copy_raw
from megallama.formats.streaming import serialization_id

WORKERS = 2  # threads copying and writing; the main thread reads and fuses meanwhile


class _Recorder:
    """The stream torch.save writes into: keeps what is written, skips what skip_data seeks over."""

    def __init__(self):
        self.writes: list[tuple[int, bytes]] = []
        self.pos = 0
        self.holes: list[tuple[int, int]] = []  # (offset, bytes) skipped

    def write(self, data) -> int:
        data = bytes(data)
        self.writes.append((self.pos, data))
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        assert whence == io.SEEK_CUR, "torch's zip writer only skips forward"
        self.holes.append((self.pos, offset))
        self.pos += offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class Frame:
    """One item's torch.save bytes around its tensor data: `head` (bytes 0..data_offset), `nbytes` of data, `tail`.

    torch's serialization id (`.data/serialization_id`) is not random: 20 digits hashing the record names, then
    20 digits folding the CRC-32s of the records in write order (`PyTorchStreamWriter::writeSerializationId`),
    the data record's included. So setting the data's CRC-32 also sets the id and the id record's own CRC-32.
    Offsets below are into head + tail."""

    head: bytes
    nbytes: int
    tail: bytes
    crc_at: tuple[int, ...]  # the data record's CRC-32 fields
    crcs_around: tuple[tuple[int, ...], tuple[int, ...]]  # CRC-32s of the records written before / after it
    id_at: int  # the serialization id's 40 digits
    id_crc_at: tuple[int, ...]  # the id record's CRC-32 fields

    @property
    def length(self) -> int:
        return len(self.head) + self.nbytes + len(self.tail)

    def with_crc(self, crc: int) -> tuple[bytes, bytes]:
        """(head, tail) with the data record's CRC-32, the serialization id and the id's CRC-32 set."""
        both = bytearray(self.head + self.tail)
        for at in self.crc_at:
            both[at:at + 4] = struct.pack("<I", crc)
        digits = serialization_id(bytes(both[self.id_at:self.id_at + 40]),
                                  [*self.crcs_around[0], crc, *self.crcs_around[1]])
        both[self.id_at:self.id_at + 40] = digits
        for at in self.id_crc_at:
            both[at:at + 4] = struct.pack("<I", zlib.crc32(digits))
        return bytes(both[:len(self.head)]), bytes(both[len(self.head):])


def frame_of(shape: tuple[int, ...], dtype: torch.dtype) -> Frame:
    """The framing `torch.save(tensor, stream)` gives a compact tensor of `shape` and `dtype`."""
    rec = _Recorder()
    with torch.serialization.skip_data():
        torch.save(torch.empty(shape, dtype=dtype), rec)  # untouched: never resident
    nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
    assert nbytes and rec.holes == [(rec.holes[0][0], nbytes)], rec.holes  # skipped: the one data record
    data_offset = rec.holes[0][0]
    head = b"".join(d for at, d in rec.writes if at < data_offset)
    tail = b"".join(d for at, d in rec.writes if at >= data_offset)
    assert len(head) == data_offset and len(head) + nbytes + len(tail) == rec.pos
    with zipfile.ZipFile(_Sparse(head, nbytes, tail)) as z:
        infos, central = z.infolist(), z.start_dir
    data = next(i for i in infos if i.filename.rsplit("/", 2)[-2:-1] == ["data"])
    ident = next(i for i in infos if i.filename.endswith(".data/serialization_id"))
    assert data.compress_type == zipfile.ZIP_STORED and data.file_size == nbytes and ident.file_size == 40
    assert all(i.flag_bits & 0x8 for i in infos), "torch writes a data descriptor after every record"
    assert infos[-1] is ident, "the id is written last"
    fields = _crc_fields(head, nbytes, tail, infos, central)
    before = tuple(i.CRC for i in infos[:infos.index(data)])
    after = tuple(i.CRC for i in infos[infos.index(data) + 1:-1])
    id_at = _data_start(_Sparse(head, nbytes, tail), ident) - nbytes  # after the data: into head + tail
    return Frame(head, nbytes, tail, fields[data.filename], (before, after), id_at, fields[ident.filename])


def _data_start(whole: _Sparse, info: zipfile.ZipInfo) -> int:
    """File offset of a record's data: past its local header, whose extra field (alignment padding) varies."""
    whole.seek(info.header_offset + 26)
    return info.header_offset + 30 + sum(struct.unpack("<HH", whole.read(4)))


def _crc_fields(head: bytes, nbytes: int, tail: bytes, infos: list[zipfile.ZipInfo], central: int
                ) -> dict[str, tuple[int, ...]]:
    """{record: offsets (in head + tail) of its CRC-32 fields}: its data descriptor's (torch's writer leaves the
    local header's 0) and its central directory entry's."""
    whole = _Sparse(head, nbytes, tail)
    fields: dict[str, list[int]] = {}
    for info in infos:
        end = _data_start(whole, info) + info.compress_size
        whole.seek(end)
        descriptor = end + (4 if whole.read(4) == b"PK\x07\x08" else 0)
        fields[info.filename] = [descriptor - (nbytes if descriptor >= len(head) + nbytes else 0)]
    at = central - nbytes
    for info in infos:  # central directory entries come in infolist() order
        sizes = struct.unpack("<HHH", tail[at - len(head) + 28:at - len(head) + 34])
        fields[info.filename].append(at + 16)
        at += 46 + sum(sizes)
    return {k: tuple(v) for k, v in fields.items()}


class _Sparse(io.RawIOBase):
    """head + `nbytes` zeros + tail, readable without the zeros in memory (zipfile reads the frame through it)."""

    def __init__(self, head: bytes, nbytes: int, tail: bytes):
        self.head, self.nbytes, self.tail, self.pos = head, nbytes, tail, 0
        self.size = len(head) + nbytes + len(tail)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        begin, end, hole = self.pos, self.pos + n, len(self.head) + self.nbytes
        data = (self.head[begin:end] + bytes(max(0, min(end, hole) - max(begin, len(self.head))))
                + self.tail[max(0, begin - hole):max(0, end - hole)])
        buf[:n] = data
        self.pos = end
        return n


class FramedWriter:
    """Items placed at known offsets of open files, written by a small thread pool.

        with FramedWriter() as w:
            w.put_bytes(fd, offset, data)              # a ShardedObject's torch.save bytes
            w.put_tensor(fd, offset, frame, tensor)    # a made tensor
            w.put_raw(fd, offset, frame, raw)          # bytes that lie in a source file

    Leaving the block waits for every write; a worker's error is raised there (or by the next put). Copies run
    on the threads; a made tensor is written by the caller, so memory holds one made tensor at a time.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="megallama-dcp")
        self._futures: list[Future] = []
        self._error: BaseException | None = None
        self._sources = SourceFiles()

    def put_bytes(self, fd: int, offset: int, data: bytes) -> None:
        self._submit(_pwrite_all, fd, offset, data)

    def put_tensor(self, fd: int, offset: int, frame: Frame, tensor: torch.Tensor) -> None:
        """Written here, before the next tensor is made: one made tensor at a time (they are the exceptions:
        vocab padding, rotary rows, a dtype change), while the copy threads go on."""
        assert tensor.numel() * tensor.element_size() == frame.nbytes
        if self._error is not None:
            raise self._error
        self._write_tensor(fd, offset, frame, tensor.contiguous().view(-1).view(torch.uint8).numpy())

    def put_raw(self, fd: int, offset: int, frame: Frame, raw: RawRange | RawChain) -> None:
        assert raw.nbytes == frame.nbytes, (raw, frame.nbytes)
        for part in (raw.parts if isinstance(raw, RawChain) else (raw,)):
            self._sources.fd(part.path)  # opened on this thread
        self._submit(self._copy, fd, offset, frame, raw)

    def _write_tensor(self, fd: int, offset: int, frame: Frame, data) -> None:
        view = memoryview(data)
        _pwrite_all(fd, offset + len(frame.head), view)
        _write_frame(fd, offset, frame, zlib.crc32(view))

    def _copy(self, fd: int, offset: int, frame: Frame, raw: RawRange | RawChain) -> None:
        crc = copy_raw(self._sources, raw, fd, offset + len(frame.head), crc=True)
        _write_frame(fd, offset, frame, crc)

    def _submit(self, fn, *args) -> None:
        if self._error is not None:
            raise self._error
        self._futures.append(self._pool.submit(self._run, fn, *args))

    def _run(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:
            self._error = self._error or e
            raise

    def __enter__(self) -> FramedWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
            if exc_type is None:
                for f in self._futures:
                    f.result()
        finally:
            self._sources.close()


def _write_frame(fd: int, offset: int, frame: Frame, crc: int) -> None:
    head, tail = frame.with_crc(crc)
    _pwrite_all(fd, offset, head)
    _pwrite_all(fd, offset + len(head) + frame.nbytes, tail)


def _pwrite_all(fd: int, offset: int, data) -> None:
    view = memoryview(data)
    written = 0
    while written < len(view):  # pwrite may write less than asked (at most 2 GiB per call on Linux)
        written += os.pwrite(fd, view[written:], offset + written)
