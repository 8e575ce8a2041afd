"""File-to-file copies (formats/rawcopy.py) write exactly what the tensor path writes.

Each conversion that uses the fast path is run twice, with MEGALLAMA_FAST_COPY=1 and =0, and every weight file is
compared byte for byte (torch zips: their `.data/serialization_id` too, a hash of the records' CRC-32s), the
zips' CRC-32s checked by zipfile, and the fast path shown to have been taken (negative control: rotary q/k rows
never are).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megallama.convert import convert, open_reader
from megallama.formats import rawcopy
from megallama.formats.megatron.torch_dist import DistCheckpoint, find_iteration_dir
from megallama.formats.rawcopy import RawRange, safetensors_header, torch_zip_ranges

WEIGHTS = ("*.safetensors", "*.pth")


def zip_bytes(path: Path) -> bytes:
    """The file's bytes, once zipfile has checked every record's CRC-32. torch's serialization_id is not random
    (it hashes the record names and CRC-32s), so it is compared too."""
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    return path.read_bytes()


def weight_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(p for pattern in WEIGHTS for p in folder.glob(pattern))
    assert files, f"no weights in {folder}"
    return {p.name: zip_bytes(p) if p.suffix == ".pth" else p.read_bytes() for p in files}


def both_paths(monkeypatch, tmp_path: Path, src: Path, name: str, **kwargs) -> tuple[Path, Path]:
    outs = []
    for fast in ("1", "0"):  # both written to the same path (Megatron's args record it), then moved
        monkeypatch.setenv("MEGALLAMA_FAST_COPY", fast)
        convert(src, tmp_path / name, **kwargs)
        outs.append((tmp_path / name).rename(tmp_path / f"{name}-{fast}"))
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


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_megatron2hf_fast_equals_slow(hf_dir, tmp_path, monkeypatch, ckpt_format):
    """From torch_dist every tensor is copied file to file (q, k, v as row blocks of the fused QKV, gate and up
    as their own chunks); from torch format (TP 2: nothing lies as it is) the safetensors are written tensor by
    tensor. Both equal save_file's."""
    meg = tmp_path / "meg"
    convert(hf_dir, meg, src_format="hf", dst_format="megatron", tp=2, ckpt_format=ckpt_format)
    copied = count_copies(monkeypatch)
    fast, slow = both_paths(monkeypatch, tmp_path, meg, "hf", src_format="megatron", dst_format="hf")
    assert weight_bytes(fast) == weight_bytes(slow)
    assert (copied[0] > 0) == (ckpt_format == "torch_dist")


def count_copies(monkeypatch) -> list[int]:
    """Counts rawcopy.copy_range calls (file-to-file copies) from now on: [count]."""
    calls = [0]
    real = rawcopy.copy_range

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(rawcopy, "copy_range", counting)
    return calls


def distcp_bytes(folder: Path) -> dict[str, bytes]:
    """Each .distcp file's bytes (every item a torch.save zip whose CRC-32s zipfile checks; torch's serialization
    id is not random but hashes the records' names and CRC-32s, so it must be equal too), and the .metadata's
    storage: {file: bytes, ".metadata": repr of storage}."""
    it_dir = find_iteration_dir(folder)
    md = DistCheckpoint(it_dir).metadata
    files = {p.name: bytearray(p.read_bytes()) for p in it_dir.glob("*.distcp")}
    for info in md.storage_data.values():
        data = files[info.relative_path]
        with zipfile.ZipFile(io.BytesIO(bytes(data[info.offset:info.offset + info.length]))) as z:
            assert z.testzip() is None  # every record's CRC-32 is right
    out = {name: bytes(data) for name, data in files.items()}
    storage = sorted((i.fqn, tuple(i.offset or ()), s.relative_path, s.offset, s.length)
                     for i, s in md.storage_data.items())
    return out | {".metadata": repr((md.state_dict_metadata, storage)).encode()}


@pytest.mark.parametrize("divisible_by", [32, 128])  # 128: the vocab is padded (zero rows lie in no file)
def test_hf2megatron_torch_dist_fast_equals_slow(hf_dir, tmp_path, monkeypatch, divisible_by):
    copied = count_copies(monkeypatch)
    fast, slow = both_paths(monkeypatch, tmp_path, hf_dir, "dist", src_format="hf", dst_format="megatron", tp=2,
                            divisible_by=divisible_by)
    assert copied[0] > 0
    assert distcp_bytes(fast) == distcp_bytes(slow)


@pytest.mark.parametrize("divisible_by", [32, 128])
def test_hf2megatron_torch_format_fast_equals_slow(hf_dir, tmp_path, monkeypatch, divisible_by):
    copied = count_copies(monkeypatch)
    fast, slow = both_paths(monkeypatch, tmp_path, hf_dir, "meg", src_format="hf", dst_format="megatron", tp=2,
                            ckpt_format="torch", divisible_by=divisible_by)
    assert copied[0] > 0
    rank_files = sorted(p.relative_to(fast) for p in fast.rglob("model_optim_rng.pt"))
    assert len(rank_files) == 2
    for rel in rank_files:
        assert zip_bytes(fast / rel) == zip_bytes(slow / rel), rel


def test_pth2megatron_fast_equals_slow(pth_dir, tmp_path, monkeypatch):
    """Meta's rotary q/k rows are a real permutation: the QKV goes through memory, the rest file to file."""
    for ckpt_format in ("torch", "torch_dist"):
        fast, slow = both_paths(monkeypatch, tmp_path, pth_dir, ckpt_format, src_format="meta",
                                dst_format="megatron", tp=2, ckpt_format=ckpt_format)
        if ckpt_format == "torch":
            for rel in sorted(p.relative_to(fast) for p in fast.rglob("model_optim_rng.pt")):
                assert zip_bytes(fast / rel) == zip_bytes(slow / rel), rel
        else:
            assert distcp_bytes(fast) == distcp_bytes(slow)


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


def range_bytes(raw) -> bytes:
    out = b""
    for part in rawcopy.parts_of(raw):
        with open(part.path, "rb") as f:
            f.seek(part.offset)
            out += f.read(part.nbytes)
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("tp", [1, 2])
def test_rank_raw_is_to_rank(hf_dir, tp):
    """For every rule of the local and alibaba tables, the byte ranges row_trace finds are to_rank's bytes; only
    dim-1 splits (ROW) and ranks holding vocab padding have none."""
    from megallama.formats.megatron.alibaba import ALIBABA
    from megallama.formats.megatron.local import LOCAL
    from megallama.formats.megatron.row_trace import rank_raw
    from megallama.formats.megatron.rules import Kind, stage_rules, to_rank
    from megallama.spec import padded_vocab_size

    with open_reader(hf_dir, "hf") as reader:
        spec = reader.spec
        padded = padded_vocab_size(spec.vocab_size, tp, 64)  # TP 2: rank 1 holds padding, rank 0 none
        kinds = set()
        for layout in (LOCAL, ALIBABA):
            for rule, _ in stage_rules(layout, spec, pp_rank=0, pp=1):
                if not rule.sources:
                    continue
                raws = [reader.raw(n) for n in rule.sources]
                tensors = [reader.get(n) for n in rule.sources]
                for rank in range(tp):
                    want = to_rank(rule.kind, tensors, spec, tp_rank=rank, tp=tp, padded_vocab_size=padded)
                    raw = rank_raw(rule.kind, raws, spec, tp_rank=rank, tp=tp, padded_vocab_size=padded)
                    padding = rule.kind is Kind.VOCAB and (rank + 1) * padded // tp > spec.vocab_size
                    assert (raw is None) == (rule.kind is Kind.ROW and tp > 1 or padding), (rule.target, rank)
                    if raw is not None:
                        kinds.add(rule.kind)
                        assert raw.shape == tuple(want.shape) and range_bytes(raw) == tensor_bytes(want), rule
        assert kinds == set(Kind) - ({Kind.ROW} if tp > 1 else set())


def test_column_blocks_are_shard_cols(hf_dir):
    from megallama.transforms import shard_cols

    with open_reader(hf_dir, "hf") as reader:
        name = "model.layers.0.mlp.down_proj.weight"
        blocks = rawcopy.read_column_blocks(reader.raw(name), 2)
        whole = reader.get(name)
        for rank, block in enumerate(blocks):
            assert torch.equal(block, shard_cols(whole, rank, 2))


def test_torch_dist_raw_ranges_are_the_tensor_bytes(hf_dir, tmp_path):
    """Every canonical tensor of a torch_dist checkpoint is found in its .distcp files; not in torch format."""
    dist, meg = tmp_path / "dist", tmp_path / "meg"
    convert(hf_dir, dist, src_format="hf", dst_format="megatron", tp=2)
    convert(hf_dir, meg, src_format="hf", dst_format="megatron", ckpt_format="torch")
    with open_reader(dist, "megatron") as reader:
        for name in reader.names():
            raw = reader.raw(name)
            assert raw is not None and range_bytes(raw) == tensor_bytes(reader.get(name)), name
    with open_reader(meg, "megatron") as reader:
        assert all(reader.raw(n) is None for n in reader.names())


@pytest.mark.parametrize("shape, dtype", [((3, 5), torch.bfloat16), ((1, 7, 2), torch.float32), ((4,), torch.float16)])
def test_frame_is_torch_saves(shape, dtype):
    """A frame filled with a tensor's bytes and CRC-32 is byte for byte what torch.save(tensor, stream) writes."""
    from megallama.formats.megatron.dcp_frames import frame_of

    t = torch.randn(shape).to(dtype)
    saved = io.BytesIO()
    torch.save(t, saved)
    frame = frame_of(shape, dtype)
    data = tensor_bytes(t)
    head, tail = frame.with_crc(zlib.crc32(data))
    ours = head + data + tail
    assert len(ours) == len(saved.getvalue()) == frame.length

    assert ours == saved.getvalue()  # the serialization id included
    assert torch.equal(torch.load(io.BytesIO(ours), weights_only=True), t)
