"""Merging adapters into base weights, one canonical tensor at a time, inside the streaming conversion.

    base reader (HF / Meta / Megatron) -> MergedReader (W' per projection, fp32) -> any writer (cast to its dtype)

The arithmetic is PEFT's `merge_and_unload()` step for step (peft/tuners/lora/layer.py `get_delta_weight`,
variants.py `DoraLinearVariant.merge_unsafe`), so an fp32 merge is bit-identical to PEFT's:

    delta = (B @ A) * scale                                         # LoRA:  W' = W + delta
    norm  = ||W + delta||_row   (L2 over the input dim, per output row)
    W'    = (m / norm)[:, None] * (W + delta)                       # DoRA
"""

from __future__ import annotations

from pathlib import Path

import torch

from megallama.errors import InputError
from megallama.formats.base import TORCH_DTYPES, ContextReader
from megallama.peft.mapping import ProjAdapter, fused_to_projections


def merge_weight(w: torch.Tensor, adapter: ProjAdapter) -> torch.Tensor:
    """W [out, in] with `adapter` merged in, in fp32."""
    w = w.to(torch.float32)
    delta = (adapter.b.to(torch.float32) @ adapter.a.to(torch.float32)) * adapter.scale  # [out, in]
    if adapter.magnitude is None:
        return w + delta
    norm = torch.linalg.norm(w + 1 * delta, dim=1)  # [out]; PEFT's get_weight_norm(W, delta, scaling=1)
    factor = adapter.magnitude.to(torch.float32) / norm
    return factor.view(-1, 1) * (w + delta)


class MergedReader(ContextReader):
    """A canonical Reader that hands out `base`'s tensors with the adapters merged into their projections.

    `adapters` maps HF module paths (`model.layers.3.self_attn.q_proj`) to their adapter. A merged tensor is
    computed in fp32 and returned in `dtype` (the output dtype; default: the base tensor's), so the writer's own
    cast is a no-op and nothing is rounded twice.
    """

    def __init__(self, base, adapters: dict[str, ProjAdapter], *, dtype: str | None = None,
                 adapter_files: list[Path] | None = None):
        self.base, self.adapters = base, adapters
        self.spec = base.spec
        self.tokenizer_files = base.tokenizer_files
        self.source_files = [*base.source_files, *(adapter_files or [])]  # the manifest hashes the adapter too
        self.notes = [*getattr(base, "notes", [])]
        self._dtype = TORCH_DTYPES[dtype] if dtype else None

    def names(self) -> list[str]:
        return self.base.names()

    def get(self, name: str) -> torch.Tensor:
        t = self.base.get(name)
        adapter = self.adapters.get(name.removesuffix(".weight"))
        if adapter is None:
            return t
        return merge_weight(t, adapter).to(self._dtype or t.dtype)

    def close(self) -> None:
        self.base.close()


# ---------------------------------------------------------------- the two ways adapters enter a conversion
def open_merged_run(run: Path, *, base: Path | None = None, dtype: str | None = None) -> MergedReader:
    """A LoRA/DoRA run as a canonical Reader: its base (from the run's record, or `base`) with the adapters merged.

    The base must have the fingerprint the run recorded; its format (HF, Meta, Megatron) does not matter.
    """
    from megallama.peft.store import check_base, open_any, read_adapters, run_root

    adapters = read_adapters(run)
    record = adapters.record
    base_path = resolve_base(run_root(Path(run)), record.base_path, base)
    check_base(record, base_path)
    reader = open_any(base_path)
    try:
        projs = fused_to_projections(adapters.tensors, reader.spec, scale=record.scale)
        check_fits(projs, reader.spec, str(run))
        return MergedReader(reader, projs, dtype=dtype, adapter_files=_run_files(Path(run), adapters.iteration))
    except BaseException:
        reader.close()
        raise


def _run_files(run: Path, iteration: int | None) -> list[Path]:
    """The adapter checkpoint's files, for the output manifest's checksums."""
    from megallama.formats.megatron.torch_format import iteration_dir
    from megallama.peft.store import RECORD, run_root

    it_dir = run if run.name.startswith("iter_") else iteration_dir(run_root(run), iteration)
    return [run_root(run) / RECORD, *sorted(p for p in it_dir.glob("*") if p.is_file())]


def resolve_base(run: Path, recorded: str, given: Path | None) -> Path:
    """`given`, else the recorded base path (as written, or relative to the run folder); InputError if missing."""
    if given is not None:
        return Path(given)
    for candidate in (Path(recorded), run / recorded):
        if recorded and candidate.exists():
            return candidate
    raise InputError(f"the base {recorded!r} recorded in {run}/peft.json does not exist here: pass --base PATH|HUB_ID")


def with_peft_adapter(reader, adapter_dir: Path, *, dtype: str | None = None) -> MergedReader:
    """`reader` with the HF PEFT adapter folder `adapter_dir` merged in (as peft's merge_and_unload())."""
    from megallama.peft.hf_adapter import CONFIG_FILE, read_peft_folder

    folder = read_peft_folder(adapter_dir, reader.spec)
    return MergedReader(reader, folder.adapters, dtype=dtype,
                        adapter_files=[folder.path / CONFIG_FILE, folder.weight_file])


def check_fits(projs: dict[str, ProjAdapter], spec, where: str) -> None:
    """Every adapter's A and B fit its base projection (an adapter trained on another model is refused)."""
    from megallama.peft.mapping import PROJECTION_TARGET, projection_shape

    for module, pa in projs.items():
        projection = module.split(".", 3)[3]  # self_attn.q_proj
        out_f, in_f = projection_shape(PROJECTION_TARGET[projection.rsplit(".", 1)[1]], spec, projection)
        if pa.a.shape[1] != in_f or pa.b.shape[0] != out_f or pa.a.shape[0] != pa.b.shape[1]:
            raise InputError(f"{where}: the adapter of {module} (A {tuple(pa.a.shape)}, B {tuple(pa.b.shape)}) "
                             f"does not fit the base's {out_f}x{in_f} weight")
