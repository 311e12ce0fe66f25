"""Block-sparse linear layers (LPViT block pruning): the BSR weight format and its kernels.

A linear weight ``[out, in]`` pruned in square b×b blocks is stored in BSR form (``BsrWeight``):
the kept blocks ``[nnz, b, b]`` in block-row order, their block-column indices and the
block-row offsets (``crow``). ``bsr_linear`` is the Triton kernel: each program computes
BLOCK_M tokens × one b-wide block-row of output features, looping over that block-row's kept
blocks, KB of them per step as one wider dot (fp32 accumulation, bias fused in the epilogue;
BLOCK_M, KB, the tile layout and warps/stages autotuned per problem size). The feature-major
layout computes the transposed tile W·xᵀ, so the tokens are the matrix unit's wide side (on
Hopper a warpgroup MMA is 64 rows by up to 256 columns: b = 64 features by 256 tokens).
``bsr_linear_reference`` is the dense masked matmul it must match.

``BlockSparseLinear`` holds the BSR weight as buffers and runs, per device type, the
implementation (``IMPLS``) that ``calibrate`` measured fastest for this layer on its input:

* ``triton``: ``bsr_linear`` (CUDA; the default there);
* ``dense``: ``F.linear`` with the zero-filled dense weight (the default on the CPU);
* ``gather`` (CPU): per block-row, gather the input columns of its kept blocks, one matmul;
* ``torch_bsr`` (CPU): PyTorch's BSR tensor times the transposed input.

A sparse path replaces ``dense`` only when it is measurably faster, so a calibrated layer is
never slower than the dense one. Measured on 2 cores (fp32, DeiT-B shapes, 197 to 12608 tokens)
no CPU path wins everywhere: dense mostly wins at 50% sparsity, and which sparse path is ahead
at 75-90% changes with the shape, the token count and the block size. On an H100 (fp16, batch
64, ``benchmarks/results/kernels-h100.json``) the kernel ran at 0.56-0.64x of cuBLAS at 50% with
32×32 blocks and at 1.23-2.14x at 75-90% with 64×64 blocks: there too the choice is per layer.

Under torch.compile the CPU's sparse paths run ``dense`` (the compiler cannot trace their
operands) and the dense weight is built in the graph.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwnas.hwprofiles.latency import Timing, measure

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux x86-64 only
    triton = None

#: the implementations ``calibrate`` times, per device type; the first is what runs before calibration
IMPLS: dict[str, tuple[str, ...]] = {"cpu": ("dense", "gather", "torch_bsr"), "cuda": ("triton", "dense")}
#: the paths whose operands (per-row lists, a sparse tensor) torch.compile cannot trace: compiled, they run ``dense``
HOST_OPERAND_IMPLS = ("gather", "torch_bsr")
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class BsrWeight:
    """A ``[out, in]`` weight as kept b×b blocks in block-row order (block compressed sparse rows)."""

    blocks: Tensor  # [nnz, b, b]
    col_indices: Tensor  # [nnz] int32, block-column of each block
    row_offsets: Tensor  # [out/b + 1] int32, blocks of block-row r are row_offsets[r]:row_offsets[r+1]
    shape: tuple[int, int]
    block: int

    @classmethod
    def from_dense(cls, weight: Tensor, block_mask: Tensor) -> BsrWeight:
        """The blocks of ``weight`` where ``block_mask`` (bool ``[out/b, in/b]``, True = kept) is set."""
        out, inp = weight.shape
        rows, cols = block_mask.shape
        block = out // rows
        if rows * block != out or cols * block != inp or block == 0:
            raise ValueError(f"block mask {tuple(block_mask.shape)} does not tile a {out}x{inp} weight in b×b blocks")
        mask = block_mask.to(device=weight.device, dtype=torch.bool)
        blocks = weight.detach().reshape(rows, block, cols, block).permute(0, 2, 1, 3)[mask].contiguous()
        counts = mask.sum(1, dtype=torch.int32)
        row_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0, dtype=torch.int32)])
        col_indices = mask.nonzero()[:, 1].to(torch.int32)
        return cls(blocks, col_indices, row_offsets, (out, inp), block)

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> BsrWeight:
        """Inverse of ``state``."""
        blocks, cols, rows = state["blocks"], state["col_indices"].to(torch.int32), state["row_offsets"].to(torch.int32)
        out, inp = (int(v) for v in state["shape"])
        return cls(blocks, cols, rows, (out, inp), blocks.shape[-1])

    def state(self) -> dict[str, Tensor]:
        """Plain tensors (blocks, indices, shape) for safetensors; no dense weight."""
        return {
            "blocks": self.blocks,
            "col_indices": self.col_indices,
            "row_offsets": self.row_offsets,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    @property
    def grid(self) -> tuple[int, int]:
        return self.shape[0] // self.block, self.shape[1] // self.block

    def block_rows(self) -> Tensor:
        """Block-row of each kept block, ``[nnz]`` int64."""
        counts = self.row_offsets.diff().long()
        return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts,
                                       output_size=len(self.col_indices))  # a static size: traceable

    def block_mask(self) -> Tensor:
        """Bool ``[out/b, in/b]``, True where a block is kept."""
        mask = torch.zeros(self.grid, dtype=torch.bool, device=self.blocks.device)
        mask[self.block_rows(), self.col_indices.long()] = True
        return mask

    def to_dense(self) -> Tensor:
        """The ``[out, in]`` weight with removed blocks as zeros."""
        rows, cols = self.grid
        b = self.block
        dense = self.blocks.new_zeros(rows, cols, b, b)
        dense[self.block_rows(), self.col_indices.long()] = self.blocks
        return dense.permute(0, 2, 1, 3).reshape(self.shape)


def bsr_linear_reference(x: Tensor, weight: BsrWeight, bias: Tensor | None = None) -> Tensor:
    """``x @ W^T + bias`` with the dense masked weight: what every path must match."""
    return F.linear(x, weight.to_dense().to(x.dtype), None if bias is None else bias.to(x.dtype))


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Whether ``bsr_linear`` can run on ``device``: Triton installed, and CUDA or the interpreter."""
    return triton is not None and (_INTERPRET or (torch.device(device).type == "cuda" and torch.cuda.is_available()))


if triton is not None:

    def _configs() -> list[triton.Config]:
        if _INTERPRET:
            return [triton.Config({"BLOCK_M": 64, "KB": 2, "FEATURE_MAJOR": False})]
        # (BLOCK_M, KB, FEATURE_MAJOR, warps, stages). The batch-64 rows: on an H100 (DeiT-B shapes,
        # fp16, 50-90 % sparsity) these five came within 3 % of the best of 60 (b = 64) and 30 (b = 32)
        # configurations in every case; the older list was up to 22 % behind (b = 32, 90 %)
        shapes = (
            (64, 2, False, 4, 3), (64, 4, False, 4, 3), (128, 1, False, 4, 3), (128, 2, False, 4, 3),
            (128, 1, False, 8, 3), (128, 2, False, 8, 3),  # batch 1 and 8
            (128, 1, False, 4, 4), (256, 1, False, 4, 3), (256, 2, False, 4, 3), (256, 1, True, 8, 3),
            (128, 1, True, 4, 3),  # batch 64
        )  # fmt: skip
        return [
            triton.Config({"BLOCK_M": m, "KB": kb, "FEATURE_MAJOR": fm}, num_warps=w, num_stages=s)
            for m, kb, fm, w, s in shapes
        ]

    def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """Feature-major tiles only for b ≥ 64: Hopper's warpgroup MMA needs 64 rows, and b is the row count."""
        kept = [c for c in configs if kwargs["B"] >= 64 or not c.kwargs["FEATURE_MAJOR"]]
        return kept or configs

    @triton.autotune(
        configs=_configs(), key=["M", "N", "K", "B"], prune_configs_by={"early_config_prune": _prune_configs}
    )
    @triton.jit
    def _bsr_linear_kernel(
        x_ptr, blocks_ptr, col_ptr, row_ptr, bias_ptr, y_ptr,
        M, N, K, stride_xm, stride_ym,
        B: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, KB: tl.constexpr, FEATURE_MAJOR: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # block-rows vary fastest: programs running together share x tiles
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_b = tl.arange(0, B)
        lanes = tl.arange(0, KB * B)  # one K step spans KB kept blocks side by side
        lane_block, lane_col = lanes // B, lanes % B
        in_m = offs_m < M
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        start, end = tl.load(row_ptr + row), tl.load(row_ptr + row + 1)
        if FEATURE_MAJOR:  # y^T tile = W · x^T: the b features are the MMA's M, the tokens its (wide) N
            acc = tl.zeros((B, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
        for i in range(start, end, KB):
            kept = i + lane_block  # the kept block each K lane reads; past ``end`` in the last step
            valid = kept < end
            col = tl.load(col_ptr + kept, mask=valid, other=0)
            x = tl.load(x_rows + (col * B + lane_col)[None, :], mask=in_m[:, None] & valid[None, :], other=0.0)
            w_ptrs = blocks_ptr + kept.to(tl.int64)[None, :] * B * B + offs_b[:, None] * B + lane_col[None, :]
            w = tl.load(w_ptrs, mask=valid[None, :], other=0.0)  # [B out features, KB·B inputs]
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            if FEATURE_MAJOR:
                acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if FEATURE_MAJOR:
            acc = tl.trans(acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + row * B + offs_b).to(tl.float32)[None, :]
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + (row * B + offs_b)[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=in_m[:, None])


def tuned_config() -> dict | None:
    """The kernel configuration the autotuner picked for the most recent problem size (None before any)."""
    config = getattr(_bsr_linear_kernel, "best_config", None) if triton is not None else None
    if config is None:
        return None
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def bsr_linear(x: Tensor, weight: BsrWeight, bias: Tensor | None = None) -> Tensor:
    """``x @ W^T + bias`` for dense ``x [..., in]`` and block-sparse ``W``, with the Triton kernel.

    ``x``, the blocks and the bias must share a dtype (fp32, fp16 or bf16) and a device; fp32
    uses TF32 tensor cores only when ``torch.backends.cuda.matmul.allow_tf32`` is set, as
    ``F.linear`` does.
    """
    if triton is None:
        raise RuntimeError("bsr_linear needs Triton, which is not installed")
    out, inp = weight.shape
    if x.shape[-1] != inp:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {inp}")
    for t in (weight.blocks, bias):
        if t is not None and (t.dtype, t.device) != (x.dtype, x.device):
            raise ValueError(f"dtype/device mismatch: input {x.dtype} on {x.device}, weight {t.dtype} on {t.device}")
    x2 = x.reshape(-1, inp)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = x.new_empty(x2.shape[0], out)
    if y.numel():
        b = weight.block
        blocks, cols, rows = (t.contiguous() for t in (weight.blocks, weight.col_indices, weight.row_offsets))
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        grid = lambda meta: (out // b, triton.cdiv(x2.shape[0], meta["BLOCK_M"]))  # noqa: E731
        _bsr_linear_kernel[grid](
            x2, blocks, cols, rows, y if bias is None else bias.contiguous(), y,
            x2.shape[0], out, inp, x2.stride(0), y.stride(0),
            B=b, HAS_BIAS=bias is not None, PRECISION=precision,
            UPCAST=_INTERPRET and x.dtype == torch.bfloat16,  # the interpreter's dot multiplies bf16 bit patterns
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], out)


class BlockSparseLinear(nn.Module):
    """``nn.Linear`` with a block-sparse weight, run by the implementation calibrated for the input's device.

    The state dict holds ``BsrWeight.state()`` (blocks, indices, shape) and ``bias``; ``impl``
    maps each device type of ``IMPLS`` to the implementation in use there, set by ``calibrate``.
    Devices other than those of ``IMPLS`` run ``dense``.
    """

    def __init__(self, weight: BsrWeight, bias: Tensor | None = None, impl: Mapping[str, str] | None = None):
        super().__init__()
        self.impl = {device: impls[0] for device, impls in IMPLS.items()}
        for device, name in (impl or {}).items():
            if name not in IMPLS.get(device, ()):
                known = ", ".join(f"{d}: {'/'.join(i)}" for d, i in IMPLS.items())
                raise ValueError(f"no implementation {name!r} on {device!r} (known: {known})")
            self.impl[device] = name
        self.out_features, self.in_features = weight.shape
        self.block = weight.block
        for name, tensor in weight.state().items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self._cache: dict[str, tuple[tuple, object]] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_mask: Tensor, block: int) -> BlockSparseLinear:
        """Keep the b×b blocks of ``linear.weight`` where ``block_mask`` is set (``block`` = b)."""
        if tuple(block_mask.shape) != (linear.out_features // block, linear.in_features // block):
            raise ValueError(f"block mask {tuple(block_mask.shape)} does not match {linear} with block {block}")
        return cls(BsrWeight.from_dense(linear.weight, block_mask), linear.bias)

    @property
    def weight(self) -> BsrWeight:
        shape = (self.out_features, self.in_features)
        return BsrWeight(self.blocks, self.col_indices, self.row_offsets, shape, self.block)

    def extra_repr(self) -> str:
        density = self.blocks.shape[0] / (self.out_features * self.in_features / self.block**2)
        impl = ", ".join(f"{device}={name}" for device, name in self.impl.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
            f"density={density:.3f}, bias={self.bias is not None}, impl=({impl})"
        )

    def forward(self, x: Tensor) -> Tensor:
        impl = self.impl.get(x.device.type, "dense")
        if torch.compiler.is_compiling() and impl in HOST_OPERAND_IMPLS:
            impl = "dense"
        return self.forward_with(x, impl)

    def forward_with(self, x: Tensor, impl: str) -> Tensor:
        """The output of implementation ``impl`` (``triton`` also runs CPU tensors under ``TRITON_INTERPRET=1``)."""
        if impl == "triton":
            return bsr_linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)
        if impl == "dense":
            y = F.linear(x2, self._prepared("dense"), self.bias)
        elif impl == "gather":
            y = self._gather(x2)
        elif impl == "torch_bsr":
            sparse = self._prepared("torch_bsr")
            y = (sparse @ x2.T if self.bias is None else torch.addmm(self.bias[:, None], sparse, x2.T)).T
        else:
            raise ValueError(f"unknown implementation {impl!r}")
        return y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def calibrate(
        self, x_example: Tensor, warmup: int = 2, repeats: int = 7, margin: float = 0.05
    ) -> dict[str, Timing]:
        """Time each implementation of the example's device on it; keep the fastest median in ``impl``.

        On CUDA each is timed as the replay of a CUDA graph, the GPU's time.

        A sparse path replaces ``dense`` only when its median is lower by more than ``margin``
        (relative), so timing noise does not trade dense for an equal or slower path.
        Implementations PyTorch does not support for this dtype are left out. Returns the timings.
        """
        device = x_example.device.type
        if device not in IMPLS:
            raise ValueError(f"nothing to calibrate on {device!r}: implementations are timed on {', '.join(IMPLS)}")
        timings = {}
        for impl in IMPLS[device]:
            try:
                call = functools.partial(self.forward_with, x_example, impl)
                timings[impl] = measure(call, device, warmup, repeats, cuda_graph=device == "cuda")
            except RuntimeError:  # e.g. torch_bsr in fp16: not implemented on the CPU
                self._cache.pop(impl, None)
        best = min(timings, key=lambda impl: timings[impl].median_ms)
        faster = timings[best].median_ms < (1 - margin) * timings["dense"].median_ms
        self.impl[device] = best if faster else "dense"
        self._cache = {k: v for k, v in self._cache.items() if k in self.impl.values()}
        return timings

    def _gather(self, x2: Tensor) -> Tensor:
        b = self.block
        x3 = x2.reshape(len(x2), -1, b)
        y = x2.new_empty(len(x2), self.out_features // b, b)
        for r, (cols, w) in enumerate(self._prepared("gather")):
            if cols.numel():
                y[:, r] = x3[:, cols].reshape(len(x2), -1) @ w
            else:
                y[:, r].zero_()
        y = y.reshape(len(x2), self.out_features)
        return y if self.bias is None else y.add_(self.bias)

    def _prepared(self, impl: str):
        """The operand ``impl`` runs on, built once per state of the buffers (device, dtype, values).

        Under torch.compile, which cannot trace that cache, it is built in the graph (inductor's
        ``freezing`` folds it into a constant)."""
        if torch.compiler.is_compiling():
            return _BUILDERS[impl](self.weight)
        blocks = self.blocks
        key = (blocks.data_ptr(), 0 if blocks.is_inference() else blocks._version, blocks.dtype, blocks.device)
        cached = self._cache.get(impl)
        if cached is None or cached[0] != key:
            with torch.no_grad(), torch.inference_mode(False):  # usable in and out of inference mode
                cached = key, _BUILDERS[impl](self.weight)
            self._cache[impl] = cached
        return cached[1]


def _gather_operands(weight: BsrWeight) -> list[tuple[Tensor, Tensor]]:
    """Per block-row: the block-columns of its kept blocks and their weights as ``[nnz_r·b, b]``."""
    b, offsets = weight.block, weight.row_offsets.tolist()
    cols = weight.col_indices.long()
    return [
        (cols[s:e], weight.blocks[s:e].permute(0, 2, 1).reshape(-1, b).contiguous())
        for s, e in zip(offsets[:-1], offsets[1:])
    ]


def _torch_bsr(weight: BsrWeight) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse BSR tensor support is in beta")
        return torch.sparse_bsr_tensor(
            weight.row_offsets, weight.col_indices, weight.blocks, weight.shape, check_invariants=False
        )


_BUILDERS: dict[str, Callable[[BsrWeight], object]] = {
    "dense": BsrWeight.to_dense,
    "gather": _gather_operands,
    "torch_bsr": _torch_bsr,
}
