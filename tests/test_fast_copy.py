"""File-to-file copies (formats/rawcopy.py) write exactly what the tensor path writes.

Each conversion that uses the fast path is run twice, with MEGALLAMA_FAST_COPY=1 and =0, and every weight file is
compared byte for byte (torch zips: but for the random `.data/serialization_id` torch stamps on every save), the
zips' CRC-32s checked by zipfile, and the fast path shown to have been taken (negative control: rotary q/k rows
never are).
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megallama.convert import convert, open_reader
from megallama.formats import rawcopy
from megallama.formats.rawcopy import RawRange, safetensors_header, torch_zip_ranges

WEIGHTS = ("*.safetensors", "*.pth")


def zip_bytes(path: Path) -> bytes:
    """The file's bytes with the serialization_id record blanked (it is random per save)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        assert z.testzip() is None  # every record's CRC-32 is right
        for info in z.infolist():
            if info.filename.endswith(".data/serialization_id"):
                at = rawcopy.data_offset(f, info)
                data[at:at + info.file_size] = bytes(info.file_size)
    return bytes(data)


def weight_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(p for pattern in WEIGHTS for p in folder.glob(pattern))
    assert files, f"no weights in {folder}"
    return {p.name: zip_bytes(p) if p.suffix == ".pth" else p.read_bytes() for p in files}


def both_paths(monkeypatch, tmp_path: Path, src: Path, name: str, **kwargs) -> tuple[Path, Path]:
    outs = []
    for fast in ("1", "0"):
        monkeypatch.setenv("MEGALLAMA_FAST_COPY", fast)
        out = tmp_path / f"{name}-{fast}"
        convert(src, out, **kwargs)
        outs.append(out)
    monkeypatch.delenv("MEGALLAMA_FAST_COPY")
    return outs[0], outs[1]


@pytest.fixture(scope="module")
def pth_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast") / "pth"
    convert(hf_dir, out, src_format="hf", dst_format="meta")
    return out


@pytest.mark.parametrize("shards", [1, 2])
def test_hf2pth_fast_equals_slow(hf_dir, tmp_path, monkeypatch, shards):
    fast, slow = both_paths(monkeypatch, tmp_path, hf_dir, "pth", src_format="hf", dst_format="meta", shards=shards)
    assert weight_bytes(fast) == weight_bytes(slow)


def test_pth2hf_fast_equals_slow(pth_dir, tmp_path, monkeypatch):
    fast, slow = both_paths(monkeypatch, tmp_path, pth_dir, "hf", src_format="meta", dst_format="hf")
    assert weight_bytes(fast) == weight_bytes(slow)


def test_megatron2hf_streamed_safetensors_equal_save_file(hf_dir, tmp_path, monkeypatch):
    """megatron2hf has no raw ranges (tensors are un-fused), but its safetensors are written tensor by tensor."""
    meg = tmp_path / "meg"
    convert(hf_dir, meg, src_format="hf", dst_format="megatron", tp=2)
    fast, slow = both_paths(monkeypatch, tmp_path, meg, "hf", src_format="megatron", dst_format="hf")
    assert weight_bytes(fast) == weight_bytes(slow)


def test_hf2pth_dtype_change_takes_the_tensor_path(hf_dir, tmp_path, monkeypatch):
    fast, slow = both_paths(monkeypatch, tmp_path, hf_dir, "pth", src_format="hf", dst_format="meta",
                            dtype="bf16")
    assert weight_bytes(fast) == weight_bytes(slow)


def test_raw_ranges_are_the_tensor_bytes(hf_dir, pth_dir):
    """Every HF tensor and every non-rotary Meta tensor is found in its file; rotary q/k rows are not."""
    for folder, fmt in ((hf_dir, "hf"), (pth_dir, "meta")):
        with open_reader(folder, fmt) as reader:
            found = {n: reader.raw(n) for n in reader.names()}
            for name, raw in found.items():
                rotary = fmt == "meta" and ("q_proj" in name or "k_proj" in name)
                assert (raw is None) == rotary, name
                if raw is not None:
                    with open(raw.path, "rb") as f:
                        f.seek(raw.offset)
                        data = f.read(raw.nbytes)
                    want = reader.get(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    assert data == want, name


def test_row_block_of_a_raw_range():
    raw = RawRange(Path("x"), 100, 4 * 6 * 2, "bfloat16", (4, 6))
    assert raw.rows(1, 2) == RawRange(Path("x"), 100 + 24, 24, "bfloat16", (2, 6))


def test_safetensors_header_matches_save_file(tmp_path):
    tensors = {"b": torch.ones(3, dtype=torch.bfloat16), "a": torch.ones(2, 2), "c": torch.ones(1, dtype=torch.float16),
               "a2": torch.ones(5, dtype=torch.bfloat16), "e": torch.ones(0), "layers.10.w": torch.ones(2, 3),
               "layers.9.w": torch.ones(2, 3)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header, _ = safetensors_header([(n, str(t.dtype)[6:], tuple(t.shape)) for n, t in tensors.items()],
                                   {"format": "pt"})
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data[:len(header)] == header
    assert struct.unpack("<Q", data[:8])[0] == len(header) - 8


def test_foreign_pickle_gives_no_ranges(tmp_path):
    """A pth whose pickle names anything but tensors is left to the normal (safe) loader."""
    path = tmp_path / "odd.pth"
    torch.save({"w": torch.ones(2), "extra": {1, 2}}, path)
    assert torch_zip_ranges(path) == {}
    torch.save({"w": torch.ones(4)[1:], "v": torch.ones(2, 3).t()}, path)
    ranges = torch_zip_ranges(path)
    assert set(ranges) == {"w"} and ranges["w"].nbytes == 12  # an offset view: yes; a transposed one: no
