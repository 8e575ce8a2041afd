"""Distributed init, device selection, and the CPU compatibility layer for megatron-core.

CPU compatibility layer (a workaround, applied only when CUDA is absent; on a GPU nothing here is patched)
--------------------------------------------------------------------------------------------------------
megatron-core 0.16 assumes CUDA in a handful of places that are pure plumbing, not maths. To run its real
GPTModel, pipeline schedules, DDP and optimizer on CPU with the gloo backend, `apply_cpu_compat()` bridges:

1. `torch.cuda.current_device()` -> "cpu": tensor_parallel/layers.py, p2p_communication.py and gpt_model.py pass
   it as `device=` to tensor factories; "cpu" makes those allocate on the host.
2. CUDA RNG state (`torch.cuda.get_rng_state/set_rng_state/manual_seed`, and megatron's own
   `tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`) -> a dedicated CPU `torch.Generator`.
   `CudaRNGStatesTracker.add/fork` and `model_parallel_cuda_manual_seed` save, seed and swap "CUDA" states; a
   separate generator keeps those swaps from disturbing the default CPU generator that data shuffling uses.
3. `torch.cuda.synchronize`, `torch.cuda.Stream/Event/current_stream/stream` -> no-ops: CPU work is synchronous
   (distributed_data_parallel.py creates a communication stream; p2p_communication.py synchronizes).
4. Tensor factories called with `device="cuda"` (`torch.zeros/empty/ones/full/tensor/arange`) -> CPU, for
   megatron-core's modules only: pipeline_parallel/schedules.py allocates `total_num_tokens` with a literal
   `device="cuda"`, distributed/param_and_grad_buffer.py a warm-up tensor, optimizer/*.py their scalars. Those
   modules' global `torch` becomes a proxy of the real module whose factories do the redirect (`_CpuTorch`);
   `torch.zeros` itself is never replaced, because other code keys on the identity of those functions (torch's
   device context does; replacing `torch.tensor` left transformers' rotary `inv_freq` uninitialised).
5. `Tensor.cuda()` -> identity: optimizer.py / distrib_optimizer.py move state with `.cuda()`.
6. `Tensor.type()` reports CPU tensors under their CUDA names ('torch.cuda.FloatTensor') when megatron-core
   asks: optimizer.py, distrib_optimizer.py and clip_grads.py recognise parameter dtypes by those strings.
7. Checkpoint saving (`_bridge_dist_checkpoint_save`, dist_checkpointing/strategies/filesystem_async.py): the
   torch_dist writer collects its results in a queue of a `spawn`ed multiprocessing Manager, which starts a
   fresh interpreter that re-imports `__main__` (seconds per rank on a small CPU, and a re-run of any script
   without a main guard). megallama only saves synchronously, where the results never leave the saving
   process, so a plain in-process queue stands in. Its `torch.cuda.synchronize` and
   `device=torch.cuda.current_device()` calls are already covered by 3 and 1.

8. Mixture of experts (Llama 4; `_bridge_moe`). Of the four CUDA assumptions in megatron-core 0.16.1's MoE, two are
   covered above: the router moving its weight to `torch.cuda.current_device()` (1) and the alltoall dispatcher's
   `torch.cuda.Stream()` (3). The other two: `moe_utils.te_general_gemm` is never defined without Transformer
   Engine (an import-guard slip: the router's gating raises NameError; upstream HEAD sets it to None), so it is set
   to None; and `maybe_move_tensor_to_cpu` converts only CUDA tensors to numpy, so at EP > 1 the alltoall
   dispatcher's split sizes stay tensors, which gloo's `all_to_all_single` rejects: the bridge returns the numpy
   array for CPU tensors too. Experts are the local spec's `SequentialMLP` (grouped GEMM needs TE or CUDA).
   Upstream: Megatron-LM PR #6270 (open).

Outside megatron-core only code that itself names CUDA (`torch.cuda.*`, `.cuda()`) sees a difference.

Each CPU rank gets cores / local ranks intra-op threads (one each when ranks outnumber cores),
otherwise the ranks fight over the cores.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.abc
import os
import sys
import types
import warnings

import torch

from megallama.engine.launch import free_port

# Known, harmless start-up noise from megatron-core on machines without apex/TE/CUDA.
for _msg in ("Apex is not installed", "full scope is deprecated", "When using async grad allreduce",
             "Transformer Engine", "TE is not installed", "torch.distributed.reduce_op"):
    warnings.filterwarnings("ignore", message=f".*{_msg}.*")

_APPLIED = False
_CPU_CUDA_GENERATOR: torch.Generator | None = None
_MCORE = "megatron.core"
_FACTORIES = ("zeros", "empty", "ones", "full", "tensor", "arange", "randn", "rand", "empty_strided")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its local GPU under torchrun, else the CPU."""
    if cuda_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def _is_cuda(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, int):
        return True  # a bare index means a CUDA device to torch
    return str(dev).startswith("cuda")


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """What megatron-core's modules see as `torch`: the real module, with CUDA-placing factories sent to the CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _redirect_factories(module, proxy: _CpuTorch) -> None:
    if getattr(module, "__name__", "").startswith(_MCORE) and getattr(module, "torch", None) is torch:
        module.torch = proxy


class _MegatronImports(importlib.abc.MetaPathFinder):
    """Gives megatron-core modules imported after `apply_cpu_compat()` the proxy too."""

    def __init__(self, proxy: _CpuTorch):
        self.proxy = proxy

    def find_spec(self, name, path, target=None):
        if not name.startswith(_MCORE):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            exec_module = loader.exec_module

            def exec_and_redirect(module):
                exec_module(module)
                _redirect_factories(module, self.proxy)

            loader.exec_module = exec_and_redirect
        return spec


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event on CPU, where every op is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NoOpStream()

    def record(self, *args):
        pass

    def wait(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def apply_cpu_compat() -> None:
    """Patch the CUDA assumptions listed in the module docstring. Idempotent; a no-op when CUDA is present."""
    global _APPLIED, _CPU_CUDA_GENERATOR
    if _APPLIED or cuda_available():
        return
    _APPLIED = True
    gen = _CPU_CUDA_GENERATOR = torch.Generator()
    gen.manual_seed(0)

    # (1) device index
    torch.cuda.current_device = lambda: "cpu"
    # (2) "CUDA" RNG on a dedicated CPU generator
    torch.cuda.get_rng_state = lambda device="cuda": gen.get_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": gen.set_state(new_state)
    torch.cuda.manual_seed = lambda seed: gen.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: gen.manual_seed(int(seed))
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: gen.get_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: gen.set_state(new_state)
    # (3) streams, events, synchronize
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.current_stream = lambda device=None: _NoOpStream()
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    # (4) literal device="cuda" factories, in megatron-core's modules (loaded now or later) only
    proxy = _CpuTorch()
    for module in list(sys.modules.values()):
        _redirect_factories(module, proxy)
    sys.meta_path.insert(0, _MegatronImports(proxy))
    # (5) .cuda() on tensors
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # (6) dtype names as the optimizer expects them on GPU
    torch.Tensor.type = _cuda_named_type(torch.Tensor.type)
    # (7) torch_dist checkpoint saving
    _bridge_dist_checkpoint_save()
    # (8) mixture of experts
    _bridge_moe()


def _bridge_moe() -> None:
    """(8): `te_general_gemm` defined (None) and split sizes as numpy for CPU tensors (EP > 1 over gloo)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _bridge_dist_checkpoint_save() -> None:
    """(7): the torch_dist writer's results queue, in process instead of in a spawned Manager (sync saves only)."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results: queue.Queue = queue.Queue()
    filesystem_async._get_write_results_queue = lambda: results


def _cuda_named_type(original):
    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        name = original(self, dtype, non_blocking, **kwargs)
        if (dtype is None and isinstance(name, str) and name.startswith("torch.") and self.device.type == "cpu"
                and sys._getframe(1).f_globals.get("__name__", "").startswith(_MCORE)):
            return "torch.cuda." + name.removeprefix("torch.")
        return name

    return tensor_type


def init_distributed(*, tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 600, ep: int = 1) -> None:
    """Start torch.distributed from torchrun's environment and megatron-core's model-parallel groups.

    Works as a single process without torchrun too (world size 1). On CPU: gloo, one thread per rank,
    and the compatibility layer; on GPU: NCCL, one device per local rank, nothing patched.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megallama.formats.safe_pickle import guard_dcp_loading

    guard_dcp_loading()  # megatron-core's checkpoint reads in this rank unpickle nothing that could run code
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if cuda_available():
        torch.cuda.set_device(device())
    else:
        apply_cpu_compat()
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend(), timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp) or (world // pp) % (tp * ep):
        from megallama.errors import InputError

        raise InputError(f"world size {world} is not a multiple of TP x PP = {tp * pp} with TP x EP = {tp * ep} "
                         "dividing the ranks of a stage (experts split over data-parallel ranks)")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def reinit_model_parallel(*, tp: int, pp: int, ep: int = 1, seed: int = 1234) -> None:
    """Re-split the running world into another TP x PP (x EP), keeping the process group: one launch can run
    several checkpoints of different splits (verify's jobs; smaller splits run as data-parallel replicas)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
