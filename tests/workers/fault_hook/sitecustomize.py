"""Test hook: real faults inside torchrun ranks (tests/test_bad_inputs.py, tests/test_sft.py). Nothing in
megallama knows about it; it acts only with this folder on PYTHONPATH and MEGALLAMA_TEST_FAULT set, and only in
torchrun ranks (never the parent, never torchrun itself).

MEGALLAMA_TEST_FAULT=crash        build_gpt_model raises RuntimeError in every rank, the way a bug in megallama
                                  or megatron-core surfaces inside a worker.
MEGALLAMA_TEST_FAULT=kill:STEP    rank 0 dies by SIGKILL part-way through writing a data file of the iteration
                                  STEP checkpoint: a torch_dist .distcp file after its first item, or a torch
                                  model_optim_rng.pt after half its bytes.
"""

import functools
import importlib.abc
import importlib.util
import io
import os
import signal
import sys

FAULT = os.environ.get("MEGALLAMA_TEST_FAULT", "")
RANK_PID = os.getpid()  # the rank itself; a writer process it forks inherits this value


def after_import(name: str, patch) -> None:
    """Run patch(module) right after `name` is first imported."""

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)  # find the real module, then wrap its loader
            spec = importlib.util.find_spec(fullname)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


def die() -> None:
    os.kill(RANK_PID, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)  # a forked writer goes with it


def crash(module) -> None:
    def build_gpt_model(*args, **kwargs):
        raise RuntimeError("injected crash in a torchrun worker")

    module.build_gpt_model = build_gpt_model


def kill_in(folder: str):
    def in_folder(path) -> bool:
        return f"/{folder}/" in str(path)

    def patch_dcp(module) -> None:  # megatron-core's torch_dist writer: one _write_item per tensor of the file
        write_item = module._write_item

        @functools.wraps(write_item)  # megatron-core inspects its signature
        def _write_item(*args, **kwargs):
            result = write_item(*args, **kwargs)
            stream = next((a for a in args if hasattr(a, "name") and hasattr(a, "write")), None)
            if stream is not None and in_folder(stream.name):
                stream.flush()
                die()  # one item written, the rest of the file never will be
            return result

        module._write_item = _write_item

    def patch_torch(module) -> None:  # torch format: torch.save of model_optim_rng.pt
        save = module.save

        @functools.wraps(save)
        def torch_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and in_folder(f):
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                with open(f, "wb") as out:
                    out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                die()
            return save(obj, f, *args, **kwargs)

        module.save = torch_save

    after_import("megatron.core.dist_checkpointing.strategies.filesystem_async", patch_dcp)
    after_import("torch", patch_torch)


if FAULT and "LOCAL_RANK" in os.environ:
    if FAULT == "crash":
        after_import("megallama.engine.model", crash)
    elif FAULT.startswith("kill:") and os.environ.get("RANK") == "0":
        kill_in(f"iter_{int(FAULT[5:]):07d}")
