"""Which Megatron layout a checkpoint is, from its keys. A new dialect = one table module + one line here."""

from __future__ import annotations

from collections.abc import Iterable

from megallama.errors import InputError
from megallama.formats.megatron.alibaba import ALIBABA
from megallama.formats.megatron.legacy import LEGACY
from megallama.formats.megatron.llama_fork import LLAMA_FORK
from megallama.formats.megatron.local import LOCAL
from megallama.formats.megatron.rules import Layout
from megallama.formats.megatron.te import TE

# First match wins: (layout, a key fragment that no layout further down has).
DETECTORS: tuple[tuple[Layout, str], ...] = (
    (ALIBABA, "lm_head.weight"),
    (LLAMA_FORK, ".input_rmsnorm.weight"),
    (LEGACY, "language_model."),
    (TE, ".linear_qkv.layer_norm_weight"),
    (LOCAL, "decoder.layers."),
)
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout, _ in DETECTORS}
WRITABLE = {"local": LOCAL, "transformer_engine": TE}  # --transformer-impl -> layout


def layout_named(name: str) -> Layout:
    if name not in LAYOUTS:
        raise InputError(f"unknown Megatron layout {name!r}: expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def detect_layout(keys: Iterable[str]) -> Layout:
    """The layout whose marker key fragment occurs in `keys` (the flattened keys of every stage)."""
    keys = list(keys)
    for layout, fragment in DETECTORS:
        if any(fragment in k for k in keys):
            return layout
    shown = ", ".join(k for k in keys if not k.endswith("_extra_state"))[:300] or "none"
    raise InputError(f"no known Megatron layout ({', '.join(LAYOUTS)}) has these keys: {shown}")
