"""A Llama-4-Scout-shaped HF `Llama4ForCausalLM` folder for `make bench --only llama4`, and a streamed
bit-exactness check of two HF folders.

Scout's text model at full width (hidden 5120, 40/8 heads of 128, 16 experts of 8192, top-1, vocab 202048,
every 4th layer NoPE, chunked attention, llama3 rope 16/1/1/8192, bf16) with fewer layers: one layer is about
8.6 GB (its experts 4.3 GB, embedding + lm_head 4.1 GB). `scale` shrinks every width for a smoke run.

The tensor names and shapes come from transformers' own `Llama4ForCausalLM` built on the meta device (no
memory), not from megallama's tables, so the bench reads the layout the Hub stores. Files are written one
tensor at a time (`save_safetensors_streamed`), shards + index like `save_pretrained`: peak memory is the
largest tensor (the fused experts, 2.7 GB at full width), never the model.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

SCOUT_LAYERS = 48
CHUNK = 1 << 26  # random values are drawn, and compared, this many elements at a time


def _width(full: int, scale: float, multiple: int) -> int:
    return max(multiple, round(full * scale / multiple) * multiple)


def scout_text_config(*, layers: int = 1, scale: float = 1.0) -> dict:
    """Llama-4-Scout's text config (transformers 5.x `Llama4TextConfig` keys) with `layers` layers and every
    width times `scale` (multiples of 64; heads keep Scout's 5 query heads per KV head, at least 2 KV heads so
    TP 2 divides them)."""
    kv_heads = max(2, 2 * round(8 * scale / 2))
    return dict(
        architectures=["Llama4ForCausalLM"], model_type="llama4_text", dtype="bfloat16",
        hidden_size=_width(5120, scale, 64), num_attention_heads=5 * kv_heads, num_key_value_heads=kv_heads,
        head_dim=_width(128, scale, 16), intermediate_size=_width(8192, scale, 64),
        intermediate_size_mlp=_width(16384, scale, 64), vocab_size=_width(202048, scale, 64),
        num_hidden_layers=layers, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
        no_rope_layers=[int((i + 1) % 4 != 0) for i in range(layers)], use_qk_norm=True,
        attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=10485760, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=None,
    )


def hf_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of transformers' Llama4ForCausalLM for `config`, in its state-dict order (built on the
    meta device: no weights allocated)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    with torch.device("meta"):
        model = Llama4ForCausalLM(Llama4TextConfig(**config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def random_tensor(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """bf16 N(0, 0.02) (norm weights: 1 + N(0, 0.02)), drawn CHUNK values at a time into the output."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat, draw = out.view(-1), torch.empty(min(CHUNK, out.numel()))
    for start in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - start)
        piece = torch.randn(n, generator=gen, out=draw[:n]).mul_(0.02)
        flat[start:start + n].copy_(piece.add_(1.0) if len(shape) == 1 else piece)
    return out


def shard_groups(shapes: dict[str, tuple[int, ...]], max_shard_bytes: int) -> list[list[str]]:
    """Names in order, cut into files of at most `max_shard_bytes` (a larger tensor gets a file of its own)."""
    from megallama.formats.hf import group_by_bytes

    return group_by_bytes({name: 2 * int(torch.Size(shape).numel()) for name, shape in shapes.items()},
                          max_shard_bytes)  # bf16


def write_scout_hf(out: Path, config: dict, *, max_shard_bytes: int, seed: int = 0) -> Path:
    """Write a random-weight HF folder for `config` (config.json, sharded safetensors, index) into `out`, one
    tensor in memory at a time. A folder that already has config.json is kept (a `--keep-work` rerun)."""
    from megallama.formats.hf import shard_file_names
    from megallama.formats.rawcopy import save_safetensors_streamed

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    shapes = hf_tensor_shapes(config)
    groups = shard_groups(shapes, max_shard_bytes)
    files = shard_file_names(len(groups))
    gen = torch.Generator().manual_seed(seed)
    for file, names in zip(files, groups, strict=True):
        entries = [(name, "bfloat16", shapes[name]) for name in names]
        save_safetensors_streamed(out / file, entries, lambda name: random_tensor(shapes[name], gen),
                                  metadata={"format": "pt"})
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    weight_map = {name: file for file, names in zip(files, groups, strict=True) for name in names}
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # written last: the folder is complete
    return out


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), folder / "model.safetensors")


def compare_tensors(a: Path, b: Path) -> dict:
    """Whether the HF folders `a` and `b` hold the same tensor names with the same dtypes, shapes and bits,
    compared one slice of at most CHUNK values at a time (memory: two slices, never a whole tensor)."""
    from safetensors import safe_open

    files_a, files_b = _tensor_files(a), _tensor_files(b)
    differ = sorted(set(files_a) ^ set(files_b))
    compared = nbytes = 0
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def opened(path: Path):
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, "pt"))
            return handles[path]

        for name in sorted(set(files_a) & set(files_b)):
            sa, sb = opened(files_a[name]).get_slice(name), opened(files_b[name]).get_slice(name)
            shape = sa.get_shape()
            if shape != sb.get_shape() or sa.get_dtype() != sb.get_dtype():
                differ.append(name)
                continue
            row = max(1, int(torch.Size(shape[1:]).numel()))
            step = max(1, CHUNK // row)
            for start in range(0, shape[0], step):
                x, y = sa[start:start + step], sb[start:start + step]
                if not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
                    differ.append(name)
                    break
                nbytes += x.numel() * x.element_size()
            compared += 1
    return {"tensors": len(files_a), "compared": compared, "bytes_compared": nbytes, "differ": differ[:10],
            "bit_exact": not differ}


def main() -> None:
    """`python bench/scout_model.py OUT [--layers N] [--scale S]`: the bench runs the build as its own process,
    so that its wall time and peak RSS are measured like a conversion's."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--max-shard-bytes", type=int, default=2 * 10**9)
    opts = parser.parse_args()
    write_scout_hf(opts.out, scout_text_config(layers=opts.layers, scale=opts.scale),
                   max_shard_bytes=opts.max_shard_bytes)


if __name__ == "__main__":
    main()
