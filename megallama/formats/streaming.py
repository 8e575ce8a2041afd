"""torch.save without holding the tensors: save a skeleton, fill its tensors in place, fix the zip's CRCs.

A rank or shard file can be larger than the memory one wants to spend (a 70B model at TP=8 has 17 GB ranks).
torch.save needs every tensor in memory at once, so instead:

1. `torch.save` the object with placeholder tensors (untouched `torch.empty`: never resident) under torch's
   `skip_data()`, which lays out every record and reserves its bytes without writing them
   (a prototype API since torch 2.5; the tests pin the result against a plain torch.save);
2. map the file shared and copy each real tensor into its slot as it is produced, re-mapping every
   REMAP_BYTES because written pages count in this process's RSS until they are unmapped;
3. write the real CRC-32 of each record (skip_data leaves 0; torch.load never checks, zip tools do).

The file is then byte for byte what torch.save of the whole object gives, but for the random
`.data/serialization_id` torch stamps on every save.
"""

from __future__ import annotations

import mmap
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from megallama.formats.base import OnTensor

REMAP_BYTES = 1 << 26


def save_streamed(path: Path, skeleton, tensors: Iterable[tuple[str, torch.Tensor | None]], *,
                  flat: Callable = lambda obj: obj, on_tensor: OnTensor | None = None) -> None:
    """torch.save `skeleton`, whose tensors are placeholders at `flat(skeleton)[key]`, with the bytes of `tensors`.

    Each `(key, tensor)` must match its placeholder's shape and dtype; None values are skipped. Only the tensor
    being copied is in memory. Example:
        >>> skeleton = {"w": torch.empty(4096, 4096)}
        >>> save_streamed(Path("w.pt"), skeleton, ((k, make(k)) for k in skeleton))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.serialization.skip_data():
        torch.save(skeleton, path)
    del skeleton
    fill_in_place(path, tensors, flat=flat, on_tensor=on_tensor)
    fix_zip_crcs(path)


def fill_in_place(path: Path, tensors: Iterable[tuple[str, torch.Tensor | None]], *,
                  flat: Callable = lambda obj: obj, on_tensor: OnTensor | None = None) -> None:
    """Copy each tensor into the slot a `skip_data` torch.save reserved for it in `path` (mapped shared)."""
    mapped, pending = None, 0
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        for key, t in tensors:
            if t is None:
                continue
            if mapped is None:
                # weights_only=False is safe here: this process wrote the file a moment ago.
                mapped = flat(torch.load(path, map_location="cpu", mmap=True, weights_only=False))
            slot = mapped[key]
            assert slot.shape == t.shape and slot.dtype == t.dtype, (key, slot.shape, t.shape)
            slot.copy_(t)
            nbytes = t.numel() * t.element_size()
            pending += nbytes
            if on_tensor is not None:
                on_tensor(key, nbytes)
            if pending >= REMAP_BYTES:
                mapped, slot, pending = None, None, 0


def fix_zip_crcs(path: Path) -> None:
    """Write the real CRC-32 of every record into the central directory and data descriptors of a zip file."""
    with zipfile.ZipFile(path) as z:
        infos, central = z.infolist(), z.start_dir
    with open(path, "r+b") as f:
        for info in infos:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            data_at = info.header_offset + 30 + name_len + extra_len
            crc = _crc32(f, data_at, info.compress_size)
            f.seek(central)
            entry = f.read(46)  # central directory entries come in the same order as infolist()
            sizes = struct.unpack("<HHH", entry[28:34])  # name, extra, comment lengths
            if crc != info.CRC:
                f.seek(central + 16)
                f.write(struct.pack("<I", crc))
                if info.flag_bits & 0x8:  # a data descriptor follows the data: [signature] crc sizes
                    f.seek(data_at + info.compress_size)
                    has_signature = f.read(4) == b"PK\x07\x08"
                    f.seek(data_at + info.compress_size + (4 if has_signature else 0))
                    f.write(struct.pack("<I", crc))
            central += 46 + sum(sizes)


def _crc32(f, start: int, size: int, chunk: int = 1 << 24) -> int:
    f.seek(start)
    crc = 0
    while size > 0:
        block = f.read(min(chunk, size))
        crc, size = zlib.crc32(block, crc), size - len(block)
    return crc
