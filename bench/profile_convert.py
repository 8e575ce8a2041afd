"""Profile one conversion in-process with cProfile: `python bench/profile_convert.py hf2megatron [--layers 22]`.

Builds (once, under bench/work/) a bf16 HF checkpoint with the 1B shape's widths and `--layers` layers, runs the
conversion under cProfile and prints the top functions by own time and by cumulative time. docs/performance.md
quotes its output for the torch_dist writer.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

CONVERSIONS = {"hf2megatron": ("hf", "megatron", {}), "hf2megatron_torch": ("hf", "megatron", {"ckpt_format": "torch"}),
               "hf2pth": ("hf", "meta", {}), "megatron2hf": ("megatron", "hf", {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("conversion", choices=sorted(CONVERSIONS))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    opts = parser.parse_args()

    import bench
    from megallama.convert import convert
    from megallama.spec import ModelSpec

    spec = dict(bench.SPEC_1B, num_layers=opts.layers)
    src = bench.WORK / f"hf-profile-{opts.layers}"
    if opts.layers == bench.SPEC_1B["num_layers"]:
        src = bench.build_hf_1b(bench.WORK / "hf-1b")
    elif not (src / "config.json").exists():
        saved = bench.SPEC_1B
        bench.SPEC_1B = spec
        try:
            bench.build_hf_1b(src)
        finally:
            bench.SPEC_1B = saved
    src_format, dst_format, extra = CONVERSIONS[opts.conversion]
    if src_format == "megatron":  # from the torch_dist checkpoint of the same model, made first (not profiled)
        dist = src.parent / f"{src.name}-dist"
        if not (dist / "latest_checkpointed_iteration.txt").exists():
            convert(src, dist, src_format="hf", dst_format="megatron", tp=opts.tp, force=True)
        src = dist
    out = bench.WORK / f"profile-{opts.conversion}"
    shutil.rmtree(out, ignore_errors=True)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    convert(src, out, src_format=src_format, dst_format=dst_format, tp=opts.tp, force=True, **extra)
    profiler.disable()
    seconds = time.perf_counter() - start
    print(f"{opts.conversion}, {ModelSpec(**spec).num_parameters() / 1e9:.2f}B parameters bf16, TP {opts.tp}: "
          f"{seconds:.1f} s in-process (start-up excluded)")
    profiler.dump_stats(bench.WORK / f"profile-{opts.conversion}.prof")
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key).print_stats(opts.top)
        lines = text.getvalue().splitlines()
        first = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        print(f"--- by {key}")
        print("\n".join(line for line in lines[first:] if line.strip()))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
