"""Conversion = reader -> (transforms inside the writer) -> writer, staged into a temporary folder.

N formats need N readers and N writers; `convert()` is the one function that wires any pair together.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megallama.errors import InputError
from megallama.formats.base import (
    TORCH_DTYPES,
    OnTensor,
    Timer,
    WriteReport,
    check_complete,
    folder_bytes,
    no_checksums,
    peak_rss_bytes,
    prefetch_sha256,
    require_folder,
    staged_output,
    torch_threads,
)
from megallama.formats.megatron.args import TRANSFORMER_IMPLS
from megallama.spec import check_parallel, check_rope_for_megatron, normalize_dtype

FORMATS = ("hf", "meta", "megatron")
CKPT_FORMATS = ("torch_dist", "torch")  # Megatron --ckpt-format; torch_dist is Megatron-LM's default


def open_reader(path: Path, fmt: str, *, layout: str | None = None, model_config: Path | None = None):
    """Open a checkpoint folder of format `fmt` as a canonical Reader; `layout` forces a Megatron torch-format
    layout (`formats/megatron/detect.py`) instead of detecting it from the keys."""
    path = require_folder(path)
    if fmt == "hf":
        from megallama.formats.hf import open_hf
        return open_hf(path)
    if fmt == "meta":
        from megallama.formats.meta import open_meta
        return open_meta(path)
    if fmt == "megatron":  # torch_dist or torch format, told apart by the files
        from megallama.formats.megatron.torch_dist import find_iteration_dir, open_torch_dist
        if find_iteration_dir(path) is not None:
            if layout:
                raise InputError(f"--layout {layout}: {path} is torch_dist, which has one layout (megatron-core's)")
            return open_torch_dist(path, model_config=model_config)
        from megallama.formats.megatron.torch_format import open_megatron
        return open_megatron(path, layout=layout, model_config=model_config)
    raise InputError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")


def open_source(src: Path, fmt: str, *, layout: str | None = None, adapter: Path | None = None,
                base: Path | None = None, dtype: str | None = None, model_config: Path | None = None):
    """The Reader a conversion reads: `src`; a LoRA/DoRA run's base with its adapters merged; and with the HF PEFT
    adapter folder `adapter` merged in (megallama/peft/merge.py)."""
    from megallama.peft.store import is_peft_run

    if fmt == "megatron" and is_peft_run(src):
        from megallama.peft.merge import open_merged_run
        if adapter is not None:
            raise InputError(f"{src} is a LoRA/DoRA run: merge its own adapters (no --adapter) or convert its base")
        return open_merged_run(src, base=base, dtype=dtype)
    if base is not None:
        raise InputError(f"--base is for a LoRA/DoRA run, and {src} is not one (no peft.json): drop --base")
    reader = open_reader(src, fmt, layout=layout, model_config=model_config)
    if adapter is None:
        return reader
    from megallama.peft.merge import with_peft_adapter
    try:
        return with_peft_adapter(reader, adapter, dtype=dtype)
    except BaseException:
        reader.close()
        raise


def convert(src: Path, dst: Path, *, src_format: str, dst_format: str, tp: int | None = None, pp: int | None = None,
            shards: int = 1, dtype: str | None = None, divisible_by: int = 128, force: bool = False,
            ckpt_format: str = "torch_dist", transformer_impl: str = "local", on_tensor: OnTensor | None = None,
            on_start: Callable[[int], None] | None = None, layout: str | None = None,
            model_config: Path | None = None, checksums: bool = True,
            ep: int | None = None, adapter: Path | None = None,
            base: Path | None = None) -> WriteReport:
    """Convert the checkpoint folder `src` into `dst`. Nothing is left at `dst` if anything fails.

    Megatron output is `ckpt_format` "torch_dist" (loads at any TP x PP; `tp`/`pp` only pad the vocab and fill
    the launch flags) or "torch" (per-rank files split for `tp` x `pp`, default 1 x 1).

    `on_start(nbytes)` hears the tensor bytes about to be written, once the input is open (for a progress bar).
    `checksums=False` leaves the sources' sha256 out of the manifest (one read pass of the input less).

    A LoRA/DoRA run as `src` is written merged into its base (`base` overrides the one its record names);
    `adapter`, an HF PEFT adapter folder, is merged into `src` (docs/peft-io.md).
    """
    dtype = normalize_dtype(dtype)
    dst = Path(dst)
    src_abs, dst_abs = Path(src).resolve(), dst.resolve()
    if src_abs == dst_abs or dst_abs in src_abs.parents or src_abs in dst_abs.parents:
        raise InputError(f"input {src} and output {dst} overlap: choose an output folder outside the input "
                         "(and not containing it)")
    for flag, size in (("--tp", tp), ("--pp", pp)):  # `tp or 1` below must never turn a 0 into 1
        if size is not None and size < 1:
            raise InputError(f"{flag} must be >= 1 (got {size})")
    if ckpt_format not in CKPT_FORMATS:
        raise InputError(f"unknown --ckpt-format {ckpt_format!r}: expected one of {', '.join(CKPT_FORMATS)}")
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise InputError(f"--transformer-impl {transformer_impl!r}: expected one of {', '.join(TRANSFORMER_IMPLS)}")
    if divisible_by < 1:
        raise InputError(f"--make-vocab-size-divisible-by must be >= 1 (got {divisible_by})")
    notes: list[str] = []  # stale staging of killed runs, removed by staged_output
    # The output is checked and its staging folder made first: an unwritable target fails before any reading.
    with Timer() as timer, staged_output(dst, force=force, notes=notes) as tmp, \
            torch_threads(1), no_checksums(not checksums):  # copies are memory-bound: spare cores write and hash
        reader = open_source(src, src_format, layout=layout, adapter=adapter, base=base, dtype=dtype,
                             model_config=model_config)
        try:
            check_complete(reader)
            if dst_format == "megatron" or ep:
                check_parallel(reader.spec, tp=tp or 1, pp=pp or 1, ep=ep or 1)
                check_rope_for_megatron(reader.spec)  # the launch flags could only rebuild another model
            bytes_read = sum(p.stat().st_size for p in reader.source_files)
            if checksums:
                prefetch_sha256(reader.source_files)  # the manifest's checksums, hashed while the conversion runs
            if on_start is not None:
                out_dtype = TORCH_DTYPES[dtype or reader.spec.dtype]
                on_start(reader.spec.num_parameters() * out_dtype.itemsize)
            report = _write(reader, tmp, dst_format, tp=tp, pp=pp, shards=shards, dtype=dtype,
                            divisible_by=divisible_by, on_tensor=on_tensor, final_dir=dst,
                            ckpt_format=ckpt_format, transformer_impl=transformer_impl, ep=ep or 1)
            report.notes += getattr(reader, "notes", None) or []  # e.g. Llama 4: the vision tower dropped
        finally:
            reader.close()
    report.output = dst
    report.notes[:0] = notes
    report.seconds = timer.seconds
    report.bytes_read = bytes_read
    report.bytes_written = folder_bytes(dst)
    report.peak_rss = peak_rss_bytes()
    return report


def _write(reader, out_dir: Path, fmt: str, *, tp, pp, shards, dtype, divisible_by, on_tensor,
           final_dir: Path, ckpt_format: str = "torch_dist", transformer_impl: str = "local",
           ep: int = 1) -> WriteReport:
    if fmt == "hf":
        from megallama.formats.hf import write_hf
        return write_hf(reader, out_dir, dtype=dtype, on_tensor=on_tensor)
    if fmt == "meta":
        from megallama.formats.meta import write_meta
        return write_meta(reader, out_dir, shards=shards, dtype=dtype, on_tensor=on_tensor)
    if fmt == "megatron" and ckpt_format == "torch_dist":
        from megallama.formats.megatron.torch_dist import write_torch_dist
        return write_torch_dist(reader, out_dir, tp=tp, pp=pp, dtype=dtype, divisible_by=divisible_by,
                                on_tensor=on_tensor, final_dir=final_dir,
                                args_overrides={"transformer_impl": transformer_impl}, ep=ep)
    if fmt == "megatron":
        from megallama.formats.megatron.torch_format import write_megatron
        return write_megatron(reader, out_dir, tp=tp or 1, pp=pp or 1, dtype=dtype, divisible_by=divisible_by,
                              on_tensor=on_tensor, final_dir=final_dir, transformer_impl=transformer_impl, ep=ep)
    raise InputError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
