"""Model metrics that do not need timing: accuracy, fidelity to the dense model, FLOPs, parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hwnas.kernels.block_sparse import BlockSparseLinear
from hwnas.pruning.block_layers import forced_impl


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (on the model's device), returned on the CPU in fp32."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    outputs = [model(x[i:i + batch_size].to(device, dtype)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outputs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy, a fraction in [0, 1]."""
    return float((logits.argmax(dim=1) == labels).float().mean())


def fidelity_kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(dense || candidate) of the class distributions: 0 when the candidate matches the dense model."""
    return float(F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(dense_logits, dim=1),
                          log_target=True, reduction="batchmean"))


@torch.inference_mode()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one image (CPU), counted by PyTorch's FlopCounterMode.

    Block-sparse layers are counted on their gather path, which multiplies kept blocks only.
    """
    with forced_impl(model, "gather"), FlopCounterMode(display=False) as counter:
        model(torch.zeros((1, *input_shape)))
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Stored non-zero weights: parameters plus the kept blocks of block-sparse layers."""
    total = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    for layer in model.modules():
        if isinstance(layer, BlockSparseLinear):
            total += int(torch.count_nonzero(layer.blocks))
            total += 0 if layer.bias is None else int(torch.count_nonzero(layer.bias))
    return total
