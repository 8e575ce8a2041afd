"""Random-weight checkpoints at real scale, for measuring conversion speed and memory (`make bench`).

Weights are random (the converter's cost does not depend on them); the layout is exactly Meta's
(formats.md 1.3), MP = 1, so any real-size `pth2megatron` / `pth2hf` run can be timed offline.

    python -m megallama.synthetic /tmp/bench/pth        # the 1B shape below, bf16, ~2.2 GB
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megallama.spec import ModelSpec

# TinyLlama-1.1B's shape: 22 layers, hidden 2048, 32 heads, 4 KV heads, FFN 5632, vocab 32000.
ONE_B = ModelSpec(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, ffn_hidden_size=5632,
                  vocab_size=32000, dtype="bfloat16", max_position_embeddings=2048)


def meta_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Meta key -> shape for an MP=1 `consolidated.00.pth`."""
    h, f, v, kv = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size, spec.num_kv_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, h)}
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (h, h), p + "attention.wk.weight": (kv, h),
                       p + "attention.wv.weight": (kv, h), p + "attention.wo.weight": (h, h),
                       p + "feed_forward.w1.weight": (f, h), p + "feed_forward.w2.weight": (h, f),
                       p + "feed_forward.w3.weight": (f, h), p + "attention_norm.weight": (h,),
                       p + "ffn_norm.weight": (h,)})
    shapes.update({"norm.weight": (h,), "output.weight": (v, h)})
    return shapes


def make_meta_checkpoint(path: Path, spec: ModelSpec = ONE_B, *, dtype: str | None = None, seed: int = 0) -> Path:
    """Write params.json + consolidated.00.pth (+ megallama.json for what params.json cannot say) to `path`.

    Holds the whole model in memory once while saving (this is the generator, not the thing being measured).
    """
    import torch

    from megallama.formats.base import TORCH_DTYPES, write_manifest

    spec = spec.replace(dtype=dtype or spec.dtype)
    torch_dtype = TORCH_DTYPES[spec.dtype]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in meta_shapes(spec).items():
        if len(shape) == 1:
            state[name] = torch.ones(shape, dtype=torch_dtype)
        else:
            state[name] = torch.empty(shape, dtype=torch_dtype).normal_(0.0, shape[1] ** -0.5, generator=gen)
    if spec.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    torch.save(state, path / "consolidated.00.pth")
    del state
    (path / "params.json").write_text(json.dumps(spec.to_meta_params(), indent=2) + "\n")
    write_manifest(path, spec=spec, fmt="meta", sources=[], meta_extra=spec.meta_extra(), shards=1)
    return path


if __name__ == "__main__":
    print(make_meta_checkpoint(Path(sys.argv[1])))
