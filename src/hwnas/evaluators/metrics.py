"""Model metrics that do not need timing: accuracy, fidelity to the dense model, FLOPs, parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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
    """FLOPs of one forward pass on one image, counted by PyTorch's FlopCounterMode."""
    param = next(model.parameters())
    x = torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Stored non-zero weights: parameters plus block-sparse value buffers (pruned blocks do not count)."""
    total = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    total += sum(int(torch.count_nonzero(b)) for name, b in model.named_buffers()
                 if name.endswith(".values") and b.is_floating_point())
    return total
