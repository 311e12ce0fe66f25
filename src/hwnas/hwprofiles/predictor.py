"""Predicted latency and energy of a transformed model on a hardware profile (a roofline).

The model runs once on the CPU under a dispatch mode that records every operator it executes:
its FLOPs (PyTorch's flop formulas) and the bytes it reads and writes, rescaled to the target
dtype. Each operator then costs the profile's launch overhead plus

* with FLOPs (linear layers, attention): max(FLOPs / rate, bytes / bandwidth);
* without: bytes / rate — activations and norms (``_ACTIVATIONS``) at the activation rate,
  the rest (adds, gathers, copies) at the element-wise rate;

where a measured profile interpolates its cost tables by size and a spec profile uses peak ×
efficiency (FLOPs; lower for GEMMs too small to fill the device, ``HardwareProfile.gemm_fraction``)
or its memory bandwidth (bytes). A block-sparse layer is one operator of its
kept FLOPs at the profile's block-sparse efficiency, or the dense GEMM where that is faster: on
the CPU and on CUDA the runtime picks the faster path by measurement. For a GPU profile, each
kernel function that runs as one Triton launch on CUDA (token gather/scatter, ranking, class
attention: ``hwnas.kernels.launches``) is one operator of the bytes it is handed, not the
several operators its CPU path runs; one-time setup (cached bases) is never priced. Energy is
predicted as time × mean power: the profile's ``active`` power where given; else, where it knows
``idle`` and ``tdp``, the device idles through the launch overheads and runs at TDP (the power
cap) for the rest, ``idle + (tdp − idle) × busy share`` (on the H100 records, 0.82–1.05x of
NVML's energy, where TDP × time gave 1.00–2.33x); else TDP (an upper bound). Values are always
named ``*_predicted``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from hwnas.errors import HwnasError
from hwnas.hwprofiles.profile import CostPoint, HardwareProfile, profile_from_dict
from hwnas.kernels.block_sparse import BlockSparseLinear
from hwnas.kernels.launches import traced_by

#: transcendental and normalising operators, priced by the activation table (slower per byte than an add)
_ACTIVATIONS = {"gelu", "silu", "sigmoid", "tanh", "exp", "erf", "softmax", "_softmax", "log_softmax",
                "_log_softmax", "native_layer_norm", "layer_norm", "pow", "sqrt", "rsqrt"}
#: operators that launch no kernel: views and allocations
_FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "reshape",
         "detach", "alias", "as_strided", "slice", "select", "split", "unbind", "chunk", "_reshape_alias",
         "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh"}


@dataclass
class Op:
    """One executed operator: its name, FLOPs and bytes moved (at the trace's dtype); ``dense_flops``
    is set for a block-sparse layer (the FLOPs of its dense equivalent)."""

    name: str
    flops: float
    bytes: float
    dense_flops: float = 0.0


class _OpTrace(TorchDispatchMode):
    """Records the operators a forward executes; a ``LaunchTracer`` of ``hwnas.kernels.launches`` too."""

    def __init__(self, one_launch_kernels: bool):
        super().__init__()
        self.ops: list[Op] = []
        self.inside_leaf = 0
        self.one_launch_kernels = one_launch_kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None and not self.inside_leaf:  # e.g. aten.linear: record what it decomposes into
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if self.inside_leaf or name in _FREE:
            return out
        flops = float(formula(*args, **kwargs, out_val=out)) if formula else 0.0
        self.ops.append(Op(name, flops, _bytes((args, kwargs, out))))
        return out

    @contextlib.contextmanager
    def unrecorded(self) -> Iterator[None]:
        """Run operators without recording them (inside a leaf: a kernel priced as one op, or setup work)."""
        self.inside_leaf += 1
        try:
            yield
        finally:
            self.inside_leaf -= 1

    def one_launch(self, name: str, run, args: tuple, kwargs: dict):
        if not self.one_launch_kernels or self.inside_leaf:
            return run()
        with self.unrecorded():
            out = run()
        self.ops.append(Op(name, 0.0, _bytes((args, kwargs, out))))
        return out

    def setup_work(self, run):
        with self.unrecorded():
            return run()


def _bytes(values) -> float:
    """The bytes of every tensor in ``values`` (nested args, kwargs, outputs)."""
    return float(sum(t.numel() * t.element_size() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)))


@torch.inference_mode()
def trace_ops(model: nn.Module, x: torch.Tensor, one_launch_kernels: bool = False) -> list[Op]:
    """The operators one forward pass of ``model`` on ``x`` executes (block-sparse layers as one op each).

    With ``one_launch_kernels`` (pricing a GPU) each kernel function that is one launch on CUDA
    (``hwnas.kernels.launches``) is one op, not the operators of its CPU path.
    """
    trace = _OpTrace(one_launch_kernels)
    hooks = []

    def enter(module, inputs):
        trace.inside_leaf += 1

    def leave(module: BlockSparseLinear, inputs, output):
        trace.inside_leaf -= 1
        rows = inputs[0].numel() // module.in_features
        density = module.blocks.shape[0] * module.block ** 2 / (module.in_features * module.out_features)
        dense = 2.0 * rows * module.in_features * module.out_features
        size = inputs[0].element_size()
        moved = (inputs[0].numel() + output.numel() + module.blocks.numel()) * size
        trace.ops.append(Op("block_sparse_linear", dense * density, float(moved), dense))

    for module in model.modules():
        if isinstance(module, BlockSparseLinear):
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with trace, traced_by(trace):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return trace.ops


def prediction_dtype(profile: HardwareProfile, measured_dtype: str) -> str:
    """The dtype to predict in: a GPU runs fp16 where the space measures fp32 on the CPU; else the same."""
    if profile.kind == "cuda" and measured_dtype == "float32" and "float16" in profile.peak_tflops:
        return "float16"
    return measured_dtype


def predictor_for(hwprofile: dict, measured_dtype: str) -> Predictor:
    """The predictor of a profile mapping (as a study stores it) for a space measured in ``measured_dtype``;
    one clear error when the profile cannot price that dtype."""
    profile = profile_from_dict(hwprofile, "the study's hardware profile")
    return Predictor(profile, prediction_dtype(profile, measured_dtype))


class Predictor:
    """Turns a model and an input batch into ``latency_ms_predicted`` (and ``energy_mj_predicted``) on a profile."""

    def __init__(self, profile: HardwareProfile, dtype: str = "float32"):
        self.profile = profile
        self.dtype = dtype
        if dtype not in profile.peak_tflops:
            raise HwnasError(f"hardware profile {profile.name} has no peak_tflops for {dtype} "
                             f"(has {', '.join(profile.peak_tflops)}); add it or set measure.dtype in the space")
        self.itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()

    def predict(self, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
        """Predicted latency of the batch ``x`` in ms, and energy per image in mJ where the profile has power
        (``model`` and ``x`` on the CPU; bytes are rescaled from their dtype to the predicted one)."""
        ops = trace_ops(model, x, one_launch_kernels=self.profile.kind == "cuda")
        return self.metrics(ops, x.element_size(), len(x))

    def metrics(self, ops: list[Op], traced_itemsize: int, images: int) -> dict[str, float]:
        """``predict``'s metrics for the operators ``ops`` of one batch of ``images``, traced with tensors of
        ``traced_itemsize`` bytes."""
        seconds = sum(self.op_seconds(op, traced_itemsize) for op in ops)
        metrics = {"latency_ms_predicted": seconds * 1e3}
        watts = self.mean_power_w(seconds, len(ops))
        if watts:
            metrics["energy_mj_predicted"] = seconds * watts * 1e3 / images
        return metrics

    def mean_power_w(self, seconds: float, operators: int) -> float | None:
        """The mean power (W) of a run of ``operators`` operators taking ``seconds``, or None where the profile has none."""
        power = self.profile.power_w
        if "active" in power:
            return power["active"]
        if "idle" in power and "tdp" in power:
            launches = operators * self.profile.launch_overhead_us * 1e-6
            busy = max(0.0, 1.0 - launches / seconds) if seconds > 0 else 0.0
            return power["idle"] + (power["tdp"] - power["idle"]) * busy
        return power.get("tdp")

    def op_seconds(self, op: Op, traced_itemsize: int) -> float:
        moved = op.bytes * self.itemsize / traced_itemsize
        launch = self.profile.launch_overhead_us * 1e-6
        if op.name == "block_sparse_linear":
            sparse = max(op.flops / (self.rate("gemm", op.flops) * self.profile.block_sparse_efficiency),
                         moved / self.bandwidth)
            dense = op.dense_flops / self.rate("gemm", op.dense_flops)
            return launch + min(sparse, dense)
        table = op_table(op)
        if op.flops:
            return launch + max(op.flops / self.rate(table, op.flops), moved / self.bandwidth)
        return launch + moved / self.rate(table, moved)

    def rate(self, table: str, size: float) -> float:
        """FLOP/s (gemm, attention) or bytes/s (activation, elementwise) at ``size``: the measured table
        where the profile has one, else the spec's peak × efficiency or memory bandwidth."""
        points = self.profile.tables.get(self.dtype, {}).get(table)
        if points:
            return interpolate(points, size)
        if table in ("gemm", "attention"):
            return self.profile.peak_tflops[self.dtype] * 1e12 * self.profile.gemm_fraction(size)
        return self.bandwidth

    @property
    def bandwidth(self) -> float:
        return self.profile.memory_bandwidth_gbs * 1e9


def op_table(op: Op) -> str:
    """Which cost table prices an operator."""
    if "scaled_dot_product" in op.name:
        return "attention"
    if op.flops:
        return "gemm"
    if op.name in _ACTIVATIONS:
        return "activation"
    return "elementwise"


def interpolate(points: list[CostPoint], size: float) -> float:
    """Throughput at ``size``, linear in log-log between measured points (those of equal size averaged),
    flat beyond them."""
    by_size: dict[float, list[float]] = {}
    for p in points:
        by_size.setdefault(p.size, []).append(np.log(p.rate))
    sizes = sorted(by_size)
    rates = [float(np.mean(by_size[s])) for s in sizes]
    return float(np.exp(np.interp(np.log(max(size, 1.0)), np.log(sizes), rates)))
