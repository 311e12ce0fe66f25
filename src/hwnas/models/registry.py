"""Model factory: the built-in digits models, or any timm model with an optional checkpoint.

A model spec is the ``model:`` mapping of a space: ``{name, checkpoint?, kwargs?}``. Loading a
checkpoint never unpickles: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn

from hwnas.errors import HwnasError
from hwnas.models.digits import BUILTIN_MODELS, build_digits_arch, create_digits_model


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


#: untrained weights come from this seed, so every process (Ray workers, export, eval) builds the same model
INIT_SEED = 0


def build_arch(spec: dict) -> nn.Module:
    """The model's architecture with untrained weights, the same in every process (exports load theirs into it)."""
    name = spec["name"]
    if is_builtin(name):
        return build_digits_arch(name).eval()
    if not timm.is_model(name):
        raise HwnasError(f"unknown model '{name}': not a built-in ({', '.join(BUILTIN_MODELS)}) "
                         "nor a timm model name (see timm.list_models())")
    try:
        with torch.random.fork_rng():
            torch.manual_seed(INIT_SEED)
            return timm.create_model(name, pretrained=False, **spec.get("kwargs", {})).eval()
    except TypeError as exc:
        raise HwnasError(f"model '{name}': bad kwargs {spec.get('kwargs')}: {exc}") from None


def load_model(spec: dict, progress: bool = True) -> nn.Module:
    """The model with its weights: trained digits model, or timm architecture + checkpoint (if given)."""
    name = spec["name"]
    if is_builtin(name):
        if spec.get("checkpoint"):
            model = build_arch(spec)
            load_checkpoint(model, spec["checkpoint"])
            return model
        return create_digits_model(name, progress=progress).eval()
    model = build_arch(spec)
    if spec.get("checkpoint"):
        load_checkpoint(model, spec["checkpoint"])
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file or a ``torch.save``d state dict (``weights_only=True``) into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise HwnasError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure is a bad file, reported in one line
        raise HwnasError(f"checkpoint {path} is not a readable safetensors/torch state dict ({_reason(exc)}): "
                         "save it with safetensors.torch.save_file or torch.save(model.state_dict())") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise HwnasError(f"checkpoint {path} does not hold a state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise HwnasError(f"checkpoint {path} does not match the model: {str(exc).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise HwnasError(f"checkpoint {path} does not match the model: missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")


def _reason(exc: Exception) -> str:
    """A reader's failure in a few words: torch's weights-only refusal without its advice to unpickle anyway."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # its first sentence says what the file holds that is not a tensor
        detail = text.split("WeightsUnpickler error:")[1].split("Check the documentation")[0]
        return "weights-only load refused: " + " ".join(detail.split()).split(". ")[0].rstrip(".")
    return text.splitlines()[0] if text else type(exc).__name__
