"""The class token's attention row: the torch path against the full attention matrix, the Triton kernel against torch.

The Triton tests run on the CPU under ``TRITON_INTERPRET=1`` (or on CUDA) and skip otherwise.
"""

import importlib
import os

import pytest
import torch

from hwnas.kernels import class_attention
from hwnas.kernels.block_sparse import triton_available

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="needs Triton, and CUDA or TRITON_INTERPRET=1")


def qkv_views(batch: int, tokens: int, heads: int, channels: int, dtype=torch.float32, seed: int = 0):
    """q, k as timm's Attention makes them: strided [B, H, T, D] views of one qkv projection."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3 * heads * channels, generator=gen).to(dtype)
    q, k, _ = qkv.reshape(batch, tokens, 3, heads, channels).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k


def full_attention_row(q, k, scale, bias=None):
    """Row 0 of the whole softmax(q kᵀ · scale + bias) matrix, mean over heads, in float64."""
    logits = (q.double() @ k.double().transpose(-2, -1)) * scale  # [B, H, T, T]
    if bias is not None:
        logits = logits + bias.double()[:, None, None, :]
    return logits.softmax(-1)[:, :, 0].mean(1)


@pytest.mark.parametrize("batch", [1, 3])  # one image takes a per-head product, several the block-diagonal one
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_path_is_row_zero_of_the_attention_matrix(batch, with_bias):
    q, k = qkv_views(batch, 17, 4, 8)
    bias = torch.rand(batch, 17).log() if with_bias else None
    got = class_attention(q, k, 8**-0.5, bias, use_triton=False)
    assert got.dtype == torch.float32 and got.shape == (batch, 17)
    torch.testing.assert_close(got.double(), full_attention_row(q, k, 8**-0.5, bias), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(batch))


@needs_triton
@pytest.mark.parametrize("tokens, channels", [(17, 8), (197, 64), (50, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_the_attention_matrix(tokens, channels, dtype, with_bias):
    """Odd token counts, head sizes that are no power of two, strided qkv views, half precision."""
    q, k = qkv_views(2, tokens, 3, channels, dtype, seed=tokens)
    bias = torch.rand(2, tokens).log() if with_bias else None
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    got = class_attention(on(q), on(k), channels**-0.5, on(bias), use_triton=True).cpu()
    assert got.dtype == torch.float32 and got.shape == (2, tokens)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got.double(), full_attention_row(q, k, channels**-0.5, bias), rtol=tol, atol=tol)


@pytest.mark.parametrize("batch", [1, 2])
def test_autograd_runs_the_torch_path(batch):
    """Gradients flow through either torch path and equal those of the full attention matrix's row."""
    q, k = qkv_views(batch, 9, 2, 4)
    bias = torch.rand(batch, 9).log()
    weights = torch.randn(batch, 9, dtype=torch.float64)
    q_ours, q_ref = q.detach().requires_grad_(), q.detach().double().requires_grad_()
    (class_attention(q_ours, k, 0.5, bias).double() * weights).sum().backward()
    (full_attention_row(q_ref, k, 0.5, bias) * weights).sum().backward()
    torch.testing.assert_close(q_ours.grad.double(), q_ref.grad, rtol=1e-4, atol=1e-6)


def test_rejects_mismatched_shapes():
    q, k = qkv_views(2, 9, 2, 4)
    with pytest.raises(ValueError, match="one shape"):
        class_attention(q, k[:, :, :5], 0.5)
    with pytest.raises(ValueError, match="bias must be"):
        class_attention(q, k, 0.5, torch.zeros(2, 5))


@needs_triton
def test_tiles_too_large_for_one_program_take_the_torch_path(monkeypatch):
    module = importlib.import_module("hwnas.kernels.class_attention")  # the package's name is the function
    calls = []
    torch_path = module._class_attention_torch
    monkeypatch.setattr(module, "_class_attention_torch", lambda *args: calls.append(1) or torch_path(*args))
    q, k = qkv_views(1, 17, 2, 8)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    class_attention(on(q), on(k), 0.5, use_triton=True)  # a 32 × 8 tile: the kernel
    assert calls == []
    monkeypatch.setattr(module, "MAX_TRITON_TILE", 128)
    got = class_attention(on(q), on(k), 0.5, use_triton=True).cpu()
    assert calls == [1]
    torch.testing.assert_close(got.double(), full_attention_row(q, k, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
def test_out_accumulates_the_row_past_skip(path):
    """A cascade's running sum: the row of tokens skip.. (softmax over all T) is added to ``out`` in place."""
    q, k = qkv_views(2, 17, 3, 8)
    bias = torch.rand(2, 17).log()
    device = DEVICE if path == "triton" else "cpu"
    prior = torch.rand(2, 16)
    out = prior.clone().to(device)
    got = class_attention(q.to(device), k.to(device), 8**-0.5, bias.to(device), path == "triton", skip=1, out=out)
    assert got is out
    expected = prior.double() + full_attention_row(q, k, 8**-0.5, bias)[:, 1:]
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    fresh = class_attention(q.to(device), k.to(device), 8**-0.5, bias.to(device), path == "triton", skip=1).cpu()
    torch.testing.assert_close(fresh.double(), full_attention_row(q, k, 8**-0.5, bias)[:, 1:], rtol=1e-5, atol=1e-6)


def test_rejects_a_bad_skip_or_out():
    q, k = qkv_views(2, 9, 2, 4)
    with pytest.raises(ValueError, match="skip must be"):
        class_attention(q, k, 0.5, skip=9)
    with pytest.raises(ValueError, match="out must be fp32"):
        class_attention(q, k, 0.5, skip=1, out=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="out must be fp32"):
        class_attention(q, k, 0.5, out=torch.zeros(2, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit stride"):
        class_attention(q, k, 0.5, skip=1, out=torch.zeros(2, 16)[:, ::2])
