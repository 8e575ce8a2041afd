"""LoRA / DoRA adapters inside megatron-core's own ColumnParallelLinear / RowParallelLinear (Megatron-Bridge naming).

A targeted linear keeps its class's behaviour and its base `weight` key; it gains a child `adapter` holding
`linear_in` (A, [rank, in]) and `linear_out` (B, [out, rank]), and for DoRA `magnitude` ([out]):

    LoRA   y = base(x) + s * B A drop(x)                                       s = alpha / rank
    DoRA   y = base(x) + (m/n - 1) * W drop(x) + (m/n) * s * B A drop(x)     n = ||W + s B A||_row, detached
           (PEFT's DoraLinearLayer.forward; without dropout W drop(x) is base(x), so y = (m/n) (base(x) + s B A x))

Tensor parallelism (each TP rank computes exactly its slice of what TP1 computes):
    column-parallel (linear_qkv, linear_fc1): A replicated, B split on out rows like the weight, m like B.
        x (gathered over the sequence when SP) -> h = A x, identical on every rank; its gradient is all-reduced
        over TP (copy_to_tensor_model_parallel_region), so A's gradient is whole on every rank.
    row-parallel (linear_proj, linear_fc2): A split on in columns like the weight, B and m replicated.
        h = A_t x_t, summed over TP with the same reduction the base output gets (all-reduce, or reduce-scatter
        over the sequence with SP), then B h. Under SP B's and m's gradients cover a slice of the sequence and
        carry `sequence_parallel`, so finalize_model_grads sums them over TP as it does the norms'.
    DoRA's norm needs the whole input dim: row-parallel all-reduces the squared row norms over TP.
Init: A kaiming-uniform(a=sqrt(5)) (PEFT's), B zero, m = ||W||_row; A drawn on its FULL shape from a generator
seeded by (seed, global layer, module), then sliced: every TP x PP starts from the same adapters.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from megallama.errors import InputError
from megallama.peft.config import MODULES, PeftConfig


class LoraAdapter(torch.nn.Module):
    """This rank's slice of one linear's adapter: linear_in (A), linear_out (B), magnitude (DoRA)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, dora: bool, dropout: float,
                 dtype: torch.dtype, device):
        super().__init__()
        self.linear_in = torch.nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)  # [r, in_t]
        self.linear_out = torch.nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)  # [out_t, r]
        self.magnitude = torch.nn.Parameter(torch.ones(out_features, dtype=dtype, device=device)) if dora else None
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()


class _LoraLinear:
    """Mixin put in front of ColumnParallelLinear / RowParallelLinear (see `lora_class`)."""

    adapter: LoraAdapter
    lora_scale: float
    lora_column: bool  # column-parallel (else row-parallel)
    lora_swiglu: bool  # linear_fc1 of a gated MLP: global rows are [gate; up], each TP rank holds [gate_t; up_t]

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        delta = self._column_adapter if self.lora_column else self._row_adapter
        return delta(input_, output), bias

    # ------------------------------------------------------------ forward
    def _column_adapter(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        ad = self.adapter
        xd = ad.dropout(x)
        if self.sequence_parallel:  # [s/tp, b, in] -> [s, b, in]; backward: this rank's slice of a whole gradient
            xd = gather_from_sequence_parallel_region(xd, tensor_parallel_output_grad=False, group=self.tp_group)
        h = copy_to_tensor_model_parallel_region(ad.linear_in(xd), group=self.tp_group)  # [s, b, r]
        lora = ad.linear_out(h)  # [s, b, out/tp]
        if ad.magnitude is None:
            return base + self.lora_scale * lora
        scale = (ad.magnitude / self._dora_norm()).to(base.dtype)  # [out/tp]
        dropped = base if isinstance(ad.dropout, torch.nn.Identity) or not self.training else F.linear(xd, self.weight)
        return base + (scale - 1) * dropped + scale * self.lora_scale * lora

    def _row_adapter(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        ad = self.adapter
        xd = ad.dropout(x)  # [s, b, in/tp]
        lora = ad.linear_out(self._row_reduce(ad.linear_in(xd)))  # [s(/tp), b, out]
        if ad.magnitude is None:
            return base + self.lora_scale * lora
        scale = (ad.magnitude / self._dora_norm()).to(base.dtype)  # [out]
        dropped = base if isinstance(ad.dropout, torch.nn.Identity) or not self.training else \
            self._row_reduce(F.linear(xd, self.weight))
        return base + (scale - 1) * dropped + scale * self.lora_scale * lora

    def _row_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over TP of a row-parallel partial output, reduced as the base output is."""
        from megatron.core.tensor_parallel.mappings import (
            reduce_from_tensor_model_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)

    @torch.no_grad()
    def _dora_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row over the whole input dim, detached (PEFT's get_weight_norm), fp32."""
        ad = self.adapter
        merged = self.weight.float() + self.lora_scale * (ad.linear_out.weight.float() @ ad.linear_in.weight.float())
        return self._row_norm(merged)

    def _row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        squares = (weight.float() ** 2).sum(dim=1)
        if not self.lora_column and self.tp_group.size() > 1:  # the rows' other columns live on the other ranks
            torch.distributed.all_reduce(squares, group=self.tp_group)
        return squares.sqrt()

    # ------------------------------------------------------------ checkpointing
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base linear's entries, plus the adapter's, sharded as the module docstring says."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        axes = {"linear_out.weight": 0, "magnitude": 0} if self.lora_column else {"linear_in.weight": 1}
        own = make_sharded_tensors_for_checkpoint(self.adapter.state_dict(prefix="", keep_vars=True),
                                                  f"{prefix}adapter.", axes, sharded_offsets, tp_group=self.tp_group,
                                                  dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.lora_swiglu:  # rows [gate_t; up_t] on each rank are two slices of the global [gate; up]
            singleton = (metadata or {}).get("singleton_local_shards", False)
            for key in (f"{prefix}adapter.linear_out.weight", f"{prefix}adapter.magnitude"):
                if key in own:
                    own[key] = apply_swiglu_sharded_factory(own[key], sharded_offsets, singleton)
        sharded.update(own)
        return sharded


_CLASSES: dict[type, type] = {}


def lora_class(base: type) -> type:
    """`base` with the adapter mixin in front (one class per base class)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Lora{base.__name__}", (_LoraLinear, base), {})
    return _CLASSES[base]


def adapter_seed(seed: int, layer: int, module: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{layer}:{module}".encode()).digest()[:8], "little") >> 1


def wrap_linear(linear, peft: PeftConfig, *, layer: int, module: str, seed: int, swiglu: bool) -> None:
    """Turn `linear` (this rank's ColumnParallelLinear / RowParallelLinear) into an adapted one, in place."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        set_tensor_model_parallel_attributes,
    )

    if isinstance(linear, ColumnParallelLinear):
        column = True
    elif isinstance(linear, RowParallelLinear):
        column = False
    else:
        raise InputError(f"peft: {module} of layer {layer} is a {type(linear).__name__}, not megatron-core's "
                         "ColumnParallelLinear / RowParallelLinear (use the local layer spec)")
    tp, tp_rank = linear.tp_group.size(), linear.tp_group.rank()
    weight = linear.weight  # [out_t, in] column / [out, in_t] row
    out_local, in_local = weight.shape
    in_full = in_local if column else in_local * tp
    adapter = LoraAdapter(in_local, out_local, peft.rank, dora=peft.dora, dropout=peft.dropout,
                          dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        a_full = torch.empty(peft.rank, in_full, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(a_full, a=math.sqrt(5),
                                       generator=torch.Generator().manual_seed(adapter_seed(seed, layer, module)))
        a_local = a_full if column else a_full[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        adapter.linear_in.weight.copy_(a_local)
        adapter.linear_out.weight.zero_()
    # which adapter tensors are split over TP (grad norms count them on every rank, the rest on TP rank 0)
    split = [(adapter.linear_out.weight, 0)] if column else [(adapter.linear_in.weight, 1)]
    if peft.dora and column:
        split.append((adapter.magnitude, 0))
    for param, dim in split:
        set_tensor_model_parallel_attributes(param, True, dim, 1)
    if not column and linear.sequence_parallel:  # gradients over a sequence slice: summed over TP
        adapter.linear_out.weight.sequence_parallel = True
        if peft.dora:
            adapter.magnitude.sequence_parallel = True
    linear.__class__ = lora_class(type(linear))
    linear.adapter = adapter
    linear.lora_scale, linear.lora_column, linear.lora_swiglu = peft.scale, column, swiglu
    if peft.dora:
        with torch.no_grad():
            adapter.magnitude.copy_(linear._row_norm(weight))  # ||W||_row (B = 0)


def apply_adapters(model, peft: PeftConfig, *, seed: int) -> None:
    """Adapters on this rank's stage of a megatron-core GPTModel, in place; the base is frozen (requires_grad
    False), so megatron-core's DDP and optimizer see only the adapters."""
    gated = bool(model.config.gated_linear_unit)
    for layer in model.decoder.layers:
        global_layer = layer.layer_number - 1  # megatron-core numbers layers from 1, globally
        for target in peft.targets:
            path = MODULES[target][0]
            wrap_linear(layer.get_submodule(path), peft, layer=global_layer, module=target, seed=seed,
                        swiglu=gated and target == "linear_fc1")
    for name, param in model.named_parameters():
        param.requires_grad = ".adapter." in name
    if getattr(model, "pre_process", False):
        # With a frozen embedding the decoder's input needs no grad, and megatron-core's full recompute
        # (a reentrant checkpoint) then returns outputs without grad: the adapters inside would get none
        # (Megatron-Bridge #1750). Marking the input as requiring grad keeps the graph (HF's
        # enable_input_require_grads does the same).
        model.embedding.register_forward_hook(_require_grad)


def _require_grad(module, inputs, output):
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)
    return output


def adapter_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if ".adapter." in name}


def is_adapter_key(key: str) -> bool:
    return ".adapter." in key and not key.endswith("_extra_state")


def load_full_adapters(model, tensors: dict) -> None:
    """Copy full (TP-gathered, global-layer) adapter tensors, the store's exchange format, into this rank's
    adapter slices (each sliced as `wrap_linear` split it)."""
    for layer in model.decoder.layers:
        for path, linear in layer.named_modules():
            if not isinstance(linear, _LoraLinear):
                continue
            tp, rank = linear.tp_group.size(), linear.tp_group.rank()
            prefix = f"decoder.layers.{layer.layer_number - 1}.{path}.adapter."
            for name, param in linear.adapter.named_parameters():
                if prefix + name not in tensors:
                    raise InputError(f"the adapter has no {prefix + name}: it does not fit this model's targets")
                full = tensors[prefix + name]
                dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
                part = full if dim is None else _tp_slice(full, dim, rank, tp, swiglu=linear.lora_swiglu and dim == 0)
                if tuple(part.shape) != tuple(param.shape):
                    raise InputError(f"adapter {prefix + name} has shape {tuple(full.shape)}, which does not fit "
                                     f"this model (this rank's slice is {tuple(param.shape)})")
                with torch.no_grad():
                    param.copy_(part)


def _tp_slice(full: torch.Tensor, dim: int, rank: int, tp: int, *, swiglu: bool) -> torch.Tensor:
    if swiglu:  # [gate; up] -> [gate_t; up_t]
        return torch.cat([_tp_slice(half, dim, rank, tp, swiglu=False) for half in full.chunk(2, dim=dim)], dim=dim)
    size = full.shape[dim] // tp
    return full.narrow(dim, rank * size, size)


def attach_adapters(model, adapters) -> None:
    """A trained run's adapters (a store.AdapterSet) on a GPTModel that holds its base: for generate / verify,
    applied without merging."""
    from megallama.peft.config import PeftConfig

    r = adapters.record
    apply_adapters(model, PeftConfig(method=r.method, rank=r.rank, alpha=r.alpha, dropout=0.0,
                                     targets=tuple(r.targets)), seed=0)
    load_full_adapters(model, adapters.tensors)
