"""Row gather / scatter for window and token pruning: Triton kernels, torch reference and CPU path.

Window pruning (SparseViT) and token pruning work on a feature map flattened to rows, ``x`` of
shape ``[B, L, C]``. An index table ``rows [B, R]`` (int32 or int64, values in ``[0, L)``) names
the rows a block works on, in the order it wants them: for Swin it encodes the window partition
and the cyclic shift, so partition/reverse and roll become one copy each way.

* ``gather_rows``: ``out[b, r] = x[b, rows[b, r]]``;
* ``scatter_rows_``: ``x[b, rows[b, r]] = values[b, r]`` in place (rows of one image distinct);
* ``scatter_add_rows_``: ``x[b, rows[b, r]] += w[b, r] · values[b, r]`` in place; rows may
  repeat (atomic adds on the Triton path, so the summation order, and rounding, may vary).

The torch functions (``index_select``/``index_copy_``/``index_add_`` on the ``[B·L, C]`` view,
which on the CPU copy whole rows and run 5-8x faster than ``gather``/``scatter_add_`` with an
index expanded over the channels) are the reference, the CPU path and the autograd path. The
Triton kernels are inference-only: each program copies BLOCK_R rows × BLOCK_C channels (masked
tails, any C, fp32/fp16/bf16). ``use_triton=None`` runs Triton on CUDA tensors unless autograd
would record the call (grad enabled and an input requires grad); ``True`` forces it (e.g. on CPU
tensors under ``TRITON_INTERPRET=1``, raising where it cannot run), ``False`` forces torch.
Out-of-range indices raise on the torch path (outside torch.compile, whose graphs skip the
host-side check); the kernels never touch memory outside ``x`` for them (gather reads zeros,
scatters skip the row). Under torch.compile the torch path runs, and the compiler fuses it into
kernels of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hwnas.kernels.block_sparse import triton_available
from hwnas.kernels.launches import one_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux x86-64 only
    triton = None

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def _gather_kernel(
        x_ptr, rows_ptr, out_ptr, L, R, C, stride_xb, stride_xl, stride_xc,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        b = tl.program_id(2).to(tl.int64)
        in_r, in_c = offs_r < R, offs_c < C
        idx = tl.load(rows_ptr + b * R + offs_r, mask=in_r, other=-1).to(tl.int64)
        valid = ((idx >= 0) & (idx < L))[:, None] & in_c[None, :]
        src = x_ptr + b * stride_xb + idx[:, None] * stride_xl + offs_c[None, :] * stride_xc
        out = out_ptr + (b * R + offs_r[:, None]) * C + offs_c[None, :]
        tl.store(out, tl.load(src, mask=valid, other=0.0), mask=in_r[:, None] & in_c[None, :])

    @triton.jit
    def _scatter_kernel(
        x_ptr, rows_ptr, values_ptr, weights_ptr, L, R, C, stride_xb, stride_xl, stride_xc,
        ACCUMULATE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        b = tl.program_id(2).to(tl.int64)
        in_r = offs_r < R
        idx = tl.load(rows_ptr + b * R + offs_r, mask=in_r, other=-1).to(tl.int64)
        valid = ((idx >= 0) & (idx < L))[:, None] & (offs_c < C)[None, :]
        v = tl.load(values_ptr + (b * R + offs_r[:, None]) * C + offs_c[None, :], mask=valid, other=0.0)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + b * R + offs_r, mask=in_r, other=0.0)
            v = v.to(tl.float32) * w.to(tl.float32)[:, None]
        v = v.to(x_ptr.dtype.element_ty)
        dst = x_ptr + b * stride_xb + idx[:, None] * stride_xl + offs_c[None, :] * stride_xc
        if ACCUMULATE:
            tl.atomic_add(dst, v, mask=valid, sem="relaxed")
        else:
            tl.store(dst, v, mask=valid)


def _check(x: Tensor, rows: Tensor, values: Tensor | None = None, weights: Tensor | None = None) -> None:
    """Raise ``ValueError`` unless the shapes, dtypes and devices fit ``x [B, L, C]``, ``rows [B, R]``."""
    if x.dim() != 3 or rows.dim() != 2 or rows.shape[0] != x.shape[0]:
        raise ValueError(f"expected x [B, L, C] and rows [B, R], got x {tuple(x.shape)} and rows {tuple(rows.shape)}")
    if rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be int32 or int64, got {rows.dtype}")
    expected = (*rows.shape, x.shape[2])
    if values is not None and (tuple(values.shape) != expected or values.dtype != x.dtype):
        raise ValueError(f"values must be {x.dtype} {expected}, got {values.dtype} {tuple(values.shape)}")
    if weights is not None and (tuple(weights.shape) != tuple(rows.shape) or not weights.is_floating_point()):
        raise ValueError(f"weights must be float {tuple(rows.shape)}, got {weights.dtype} {tuple(weights.shape)}")
    for t in (rows, values, weights):
        if t is not None and t.device != x.device:
            raise ValueError(f"all inputs must be on x's device {x.device}, got one on {t.device}")


def should_use_triton(use_triton: bool | None, x: Tensor, *inputs: Tensor | None) -> bool:
    """Whether to run the kernels (see the module docstring); raise if ``use_triton`` forces an impossible run."""
    autograd = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *inputs))
    problem = _triton_problem(x, autograd)
    if use_triton is None:
        return x.is_cuda and problem is None
    if use_triton and problem is not None:
        raise ValueError(problem)
    return use_triton


def _triton_problem(x: Tensor, autograd: bool) -> str | None:
    """Why the kernels cannot run on ``x``, or None."""
    if not triton_available(x.device):
        return "Triton needs CUDA tensors or TRITON_INTERPRET=1"
    if x.dtype not in TRITON_DTYPES:
        return f"the Triton kernels take {', '.join(map(str, TRITON_DTYPES))}, not {x.dtype}"
    if autograd:
        return "the Triton kernels do not support autograd: use the torch path for training"
    if torch.compiler.is_compiling():
        return "under torch.compile the torch path runs: the compiler makes its own kernels of it"
    return None


def _launch(kernel, x: Tensor, rows: Tensor, *tensors: Tensor, **constexprs: bool) -> None:
    """One program per (BLOCK_R rows, BLOCK_C channels, image): tiles of about 4096 elements."""
    (batch, r), c = rows.shape, x.shape[2]
    if batch * r * c == 0:
        return
    block_c = min(triton.next_power_of_2(c), 128)
    block_r = 4096 // block_c
    grid = (triton.cdiv(r, block_r), triton.cdiv(c, block_c), batch)
    kernel[grid](
        x, rows.contiguous(), *tensors, x.shape[1], r, c, *x.stride(), **constexprs, BLOCK_R=block_r, BLOCK_C=block_c
    )


def _rows_are_contiguous(x: Tensor) -> bool:
    """Whether every row ``x[b, l]`` is contiguous and the images lie, without overlapping, a whole number
    of rows apart (a row slice ``x[:, a:b]`` of a contiguous tensor does; an expanded batch does not).

    Never under torch.compile: the strides seen while tracing need not be those of the compiled
    program's buffers, so ``as_strided`` over them could read other memory (and a write through it
    cannot be compiled at all)."""
    if torch.compiler.is_compiling():
        return False
    batch, length, channels = x.shape
    apart = x.stride(0) % max(channels, 1) == 0 and (batch == 1 or x.stride(0) >= length * channels)
    return x.stride(2) == 1 and x.stride(1) == channels and apart and x.numel() > 0


def _row_table(x: Tensor) -> tuple[Tensor, int]:
    """``x [B, L, C]`` as one table of rows ``[M, C]`` (a view when its rows are contiguous) and the rows per image."""
    batch, length, channels = x.shape
    if x.is_contiguous():
        return x.view(batch * length, channels), length
    if _rows_are_contiguous(x):
        step = x.stride(0) // channels
        return x.as_strided(((batch - 1) * step + length, channels), (channels, 1)), step
    return x.reshape(batch * length, channels), length


def _table_index(rows: Tensor, step: int, length: int) -> Tensor:
    """``rows [B, R]`` as int64 indices ``[B·R]`` into a row table of ``step`` rows per image; raises if out of range
    (a host-side check, which a compiled graph skips)."""
    if rows.numel() and not torch.compiler.is_compiling():
        low, high = (int(bound) for bound in torch.aminmax(rows))
        if low < 0 or high >= length:
            raise IndexError(f"rows must lie in [0, {length}), got values in [{low}, {high}]")
    index = rows.long()
    if rows.shape[0] > 1:  # image b's rows start at row b·step of the table
        index = index + torch.arange(0, rows.shape[0] * step, step, device=rows.device)[:, None]
    return index.reshape(-1)


def _index_into_(x: Tensor, rows: Tensor, values: Tensor, accumulate: bool) -> Tensor:
    """``index_add_``/``index_copy_`` of ``values [B, R, C]`` into the rows of ``x`` named by ``rows``, in place.

    Writes through a view of ``x`` when its rows are contiguous (a row slice too), else through a copy.
    """
    target = x if _rows_are_contiguous(x) else x.contiguous()
    table, step = _row_table(target)
    index = _table_index(rows, step, x.shape[1])
    flat_values = values.reshape(-1, x.shape[2])
    if accumulate:
        table.index_add_(0, index, flat_values)
    else:
        table.index_copy_(0, index, flat_values)
    return x if target is x else x.copy_(target)


@one_launch
def gather_rows(x: Tensor, rows: Tensor, use_triton: bool | None = None) -> Tensor:
    """``out[b, r, :] = x[b, rows[b, r], :]``: a new contiguous ``[B, R, C]`` tensor."""
    _check(x, rows)
    if not should_use_triton(use_triton, x):
        table, step = _row_table(x)
        return table.index_select(0, _table_index(rows, step, x.shape[1])).reshape(*rows.shape, x.shape[2])
    out = x.new_empty(*rows.shape, x.shape[2])
    _launch(_gather_kernel, x, rows, out)
    return out


@one_launch
def scatter_rows_(x: Tensor, rows: Tensor, values: Tensor, use_triton: bool | None = None) -> Tensor:
    """In place ``x[b, rows[b, r], :] = values[b, r, :]``; returns ``x``. Rows of one image must be distinct."""
    _check(x, rows, values)
    if should_use_triton(use_triton, x, values):
        _launch(_scatter_kernel, x, rows, values.contiguous(), values, ACCUMULATE=False, HAS_WEIGHTS=False)
        return x
    return _index_into_(x, rows, values, accumulate=False)


@one_launch
def scatter_add_rows_(
    x: Tensor, rows: Tensor, values: Tensor, weights: Tensor | None = None, use_triton: bool | None = None
) -> Tensor:
    """In place ``x[b, rows[b, r], :] += weights[b, r] · values[b, r, :]`` (rows may repeat); returns ``x``.

    The product is taken in fp32 (or wider, following ``x``) and rounded once to ``x.dtype``.
    """
    _check(x, rows, values, weights)
    if should_use_triton(use_triton, x, values, weights):
        w = values if weights is None else weights.contiguous()
        _launch(_scatter_kernel, x, rows, values.contiguous(), w, ACCUMULATE=True, HAS_WEIGHTS=weights is not None)
        return x
    if weights is not None:
        wide = torch.promote_types(x.dtype, torch.float32)
        values = (values.to(wide) * weights.to(wide)[..., None]).to(x.dtype)
    return _index_into_(x, rows, values, accumulate=True)
