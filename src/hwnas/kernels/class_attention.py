"""The class token's attention to every token, averaged over heads: what token pruning ranks by.

Fused attention (``F.scaled_dot_product_attention``) never forms the attention matrix, so the
class token's row is computed again from the block's queries and keys: per head
``softmax_t(scale · q₀·k_t + bias_t)``, then the mean over the heads, ``[B, T]`` in fp32.
A cascade that sums the row over blocks passes its running sum as ``out``: the row is added to
it in place, with no launch of its own.

* On CUDA, one Triton program per image and head reads that head's keys ``[T, D]`` once, in
  place from the qkv projection, keeps the logits and softmax in registers, and adds its share
  of the head mean atomically to the output: one launch per block, where the torch path takes
  five or six (plus a zero-fill when there is no running sum yet). The atomic adds make the last
  bit of the sum depend on the order the heads finish in. Beyond ``MAX_TRITON_TILE`` (1024
  tokens of 64 channels), the torch path.
* The torch path (CPU, autograd, long sequences): the class queries laid out block-diagonally
  ``[B, H, H·D]`` times the keys ``[B, H·D, T]`` (a view of the qkv projection): one batched
  matmul gives every head's logits, with no ``[B, H, T, D]`` temporary. For one image, one
  matrix-vector product per head, which skips the block-diagonal's zeros (on a 2-core Xeon,
  deit_small's row at batch 1: 34 µs against 48).

``use_triton`` follows ``hwnas.kernels.gather_scatter``: None runs Triton on CUDA tensors unless
autograd records the call, True forces it (CPU tensors under ``TRITON_INTERPRET=1``), False forces torch.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from hwnas.kernels.gather_scatter import should_use_triton
from hwnas.kernels.launches import one_launch, setup_work

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux x86-64 only
    triton = None

#: the largest [tokens, channels] tile (each rounded up to a power of two) one program holds in registers:
#: 1024 tokens of 64 channels, a 32×32 patch grid and its prefix tokens
MAX_TRITON_TILE = 1024 * 64


if triton is not None:

    @triton.jit
    def _class_attention_kernel(
        q_ptr, k_ptr, bias_ptr, out_ptr, H, T, D, scale, skip,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_ob,
        HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        offs_t, offs_d = tl.arange(0, BLOCK_T), tl.arange(0, BLOCK_D)
        in_t, in_d = offs_t < T, offs_d < D
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=in_d, other=0.0).to(tl.float32)
        keys = k_ptr + b * stride_kb + h * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :]
        k = tl.load(keys, mask=in_t[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        logits = tl.sum(k * q[None, :], axis=1) * scale
        if HAS_BIAS:
            logits += tl.load(bias_ptr + b * T + offs_t, mask=in_t, other=0.0).to(tl.float32)
        logits = tl.where(in_t, logits, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        share = p / (tl.sum(p, axis=0) * H)  # this head's part of the mean over heads
        tl.atomic_add(out_ptr + b * stride_ob + offs_t - skip, share, mask=in_t & (offs_t >= skip))


@one_launch
def class_attention(
    q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None, use_triton: bool | None = None,
    *, skip: int = 0, out: Tensor | None = None,
) -> Tensor:
    """The class token's (token 0's) attention to tokens ``skip..T-1``, mean over heads: ``[B, T - skip]`` fp32.

    ``q``, ``k``: ``[B, H, T, D]`` (strided views of a qkv projection are read in place);
    ``bias [B, T]`` is added to every head's logits (e.g. ``log size`` for proportional attention).
    The softmax runs over all T tokens; ``skip`` only leaves the first ones (e.g. prefix tokens)
    out of the result. With ``out [B, T - skip]`` (fp32) the row is added to it in place and
    ``out`` is returned.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"expected q and k of one shape [B, H, T, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, heads, tokens, channels = k.shape
    if bias is not None and tuple(bias.shape) != (batch, tokens):
        raise ValueError(f"bias must be [B, T] = {(batch, tokens)}, got {tuple(bias.shape)}")
    if not 0 <= skip < tokens:
        raise ValueError(f"skip must be in [0, T) = [0, {tokens}), got {skip}")
    if out is not None and (tuple(out.shape) != (batch, tokens - skip) or out.dtype != torch.float32
                            or out.stride(-1) != 1):
        raise ValueError(f"out must be fp32 [B, T - skip] = {(batch, tokens - skip)} with unit stride along the "
                         f"tokens, got {out.dtype} {tuple(out.shape)} of strides {out.stride()}")
    if should_use_triton(use_triton, k, q, bias) and _fits_one_program(tokens, channels):
        return _class_attention_triton(q, k, scale, bias, skip, out)
    row = _class_attention_torch(q, k, scale, bias)[:, skip:]
    return row if out is None else out.add_(row)


def _fits_one_program(tokens: int, channels: int) -> bool:
    return triton.next_power_of_2(tokens) * triton.next_power_of_2(channels) <= MAX_TRITON_TILE


def _class_attention_triton(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, skip: int,
                            out: Tensor | None) -> Tensor:
    batch, heads, tokens, channels = k.shape
    q0 = q[:, :, 0]
    if q0.stride(-1) != 1 or k.stride(-1) != 1:  # the kernel reads channels contiguously
        q0, k = q0.contiguous(), k.contiguous()
    if out is None:
        out = torch.zeros(batch, tokens - skip, device=k.device, dtype=torch.float32)
    block_t, block_d = triton.next_power_of_2(tokens), triton.next_power_of_2(channels)
    _class_attention_kernel[(batch, heads)](
        q0, k, out if bias is None else bias.contiguous(), out, heads, tokens, channels, float(scale), skip,
        q0.stride(0), q0.stride(1), k.stride(0), k.stride(1), k.stride(2), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4 if block_t * block_d <= 16384 else 8,
    )  # fmt: skip
    return out


def _class_attention_torch(q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    batch, heads, tokens, channels = k.shape
    if batch == 1:  # one image: one matrix-vector product per head, nothing wasted
        logits = torch.bmm(q[0, :, :1], k[0].transpose(1, 2)).float().squeeze(1).mul_(scale)[None]  # [1, H, T]
    else:
        keys = k.transpose(1, 2).reshape(batch, tokens, heads * channels)  # a view when k is one of qkv's
        eye = _scaled_identity(heads, scale, q.dtype, str(q.device))
        queries = (eye[:, :, None] * q[:, None, :, 0]).reshape(batch, heads, heads * channels)  # head h: q₀ in slot h
        logits = torch.bmm(queries, keys.transpose(1, 2)).float()  # [B, H, T]
    logits = logits if bias is None else logits.add_(bias.float()[:, None])
    return logits.softmax(dim=-1).mean(dim=1)


@functools.lru_cache(maxsize=16)
@setup_work
def _scaled_identity(size: int, scale: float, dtype: torch.dtype, device: str) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():  # cached: usable in and out of inference mode
        return torch.eye(size, dtype=dtype, device=device).mul_(scale)
