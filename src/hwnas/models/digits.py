"""The built-in models: small timm ViTs trained on scikit-learn's bundled digits (no downloads).

``create_digits_model`` trains a model on first use (fixed seeds, CPU, a few minutes at most) and
caches its weights as safetensors under ``cache_dir()/models``; the file name carries a hash of
the architecture, the training recipe and the data split, so changing any of them retrains.
``digits-swin-windows`` is ``digits-swin`` after SparseViT's sparsity-aware adaptation (a short
fine-tune under random window-ratio configurations), cached the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from hwnas.errors import HwnasError
from hwnas.paths import cache_dir
from hwnas.progress import transient_progress

CALIB_FRACTION = 0.15
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class DigitsSplits:
    """Normalized digit images ``[N, 1, S, S]`` (float32) and labels (int64) of the three splits."""

    train_x: Tensor
    train_y: Tensor
    calib_x: Tensor
    calib_y: Tensor
    test_x: Tensor
    test_y: Tensor
    img_size: int


def load_digits_splits(img_size: int = 32, seed: int = 0) -> DigitsSplits:
    """The 1797 digits upsampled (bilinear) to ``img_size``, split stratified 60/15/25 % train/calib/test.

    Pixels are scaled to [0, 1] and standardized with the training split's mean and std.
    """
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(digits.target).long()
    index = torch.arange(len(y)).numpy()
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    train, calib = train_test_split(rest, test_size=CALIB_FRACTION / (1 - TEST_FRACTION),
                                    stratify=y[rest], random_state=seed)
    train, calib, test = (torch.from_numpy(i) for i in (train, calib, test))
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return DigitsSplits(x[train], y[train], x[calib], y[calib], x[test], y[test], img_size)


@dataclass(frozen=True)
class TrainRecipe:
    """How a digits model is trained: AdamW, linear warmup then cosine decay, random affine jitter."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    max_rotate_deg: float
    max_scale: float
    max_shift_px: float
    seed: int = 0


_ARCHS: dict[str, type[nn.Module]] = {"digits-deit": VisionTransformer, "digits-swin": SwinTransformer}

DIGITS_MODELS: dict[str, dict] = {
    # 32x32 input in 8x8 patches: 16 patch tokens + CLS (each patch is 2x2 pixels of the original 8x8 digit)
    "digits-deit": dict(img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=192, depth=6,
                        num_heads=3, class_token=True, global_pool="token"),
    # 16x16 tokens in 4x4 windows: 16, 4 and 1 windows in its three stages
    "digits-swin": dict(img_size=32, patch_size=2, in_chans=1, num_classes=10, window_size=4, embed_dim=32,
                        depths=(2, 2, 2), num_heads=(2, 4, 8)),
}

RECIPES: dict[str, TrainRecipe] = {
    "digits-deit": TrainRecipe(epochs=40, batch_size=32, lr=1e-3, weight_decay=0.05, warmup_epochs=1,
                               label_smoothing=0.1, max_rotate_deg=10, max_scale=0.1, max_shift_px=2),
    "digits-swin": TrainRecipe(epochs=40, batch_size=32, lr=1e-3, weight_decay=0.05, warmup_epochs=1,
                               label_smoothing=0.1, max_rotate_deg=10, max_scale=0.1, max_shift_px=2),
}

#: built-ins derived from another by an adaptation: name -> (base model, fine-tuning recipe)
ADAPTED_MODELS: dict[str, tuple[str, TrainRecipe]] = {
    "digits-swin-windows": ("digits-swin", TrainRecipe(
        epochs=15, batch_size=32, lr=3e-4, weight_decay=0.05, warmup_epochs=1, label_smoothing=0.1,
        max_rotate_deg=10, max_scale=0.1, max_shift_px=2, seed=1)),
}
BUILTIN_MODELS = (*DIGITS_MODELS, *ADAPTED_MODELS)

_SPLIT_SEED = 0


def build_digits_arch(name: str) -> nn.Module:
    """The untrained architecture of a built-in model (weights initialized with a fixed seed)."""
    if name not in BUILTIN_MODELS:
        raise HwnasError(f"unknown digits model '{name}' (known: {', '.join(BUILTIN_MODELS)})")
    name = ADAPTED_MODELS[name][0] if name in ADAPTED_MODELS else name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _ARCHS[name](**DIGITS_MODELS[name])


def checkpoint_path(name: str) -> Path:
    """Where the trained weights of ``name`` are cached (the hash covers arch, recipe and data split)."""
    build_digits_arch(name)  # validates the name
    if name in ADAPTED_MODELS:
        base, recipe = ADAPTED_MODELS[name]
        spec = {"base": checkpoint_path(base).name, "adaptation": asdict(recipe)}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        return cache_dir() / "models" / f"{name}-{digest}.safetensors"
    spec = {"arch": DIGITS_MODELS[name], "class": _ARCHS[name].__name__, "recipe": asdict(RECIPES[name]),
            "data": {"img_size": DIGITS_MODELS[name]["img_size"], "seed": _SPLIT_SEED,
                     "calib": CALIB_FRACTION, "test": TEST_FRACTION}}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name}-{digest}.safetensors"


def checkpoint_fingerprint(name: str) -> str | None:
    """The first 12 hex digits of the SHA-256 of ``name``'s cached weights (None before it is trained).

    Training is seeded, but float rounding differs between CPUs (the same recipe trains different
    weights on an AMD EPYC and an Intel Xeon), so benchmark records name the weights they measured.
    """
    path = checkpoint_path(name)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else None


def create_digits_model(name: str, progress: bool = True) -> nn.Module:
    """The trained built-in model ``name`` in eval mode, trained and cached on first use."""
    path = checkpoint_path(name)
    model = build_digits_arch(name)
    if path.is_file():
        model.load_state_dict(safetensors.torch.load_file(str(path)))
        return model.eval()
    if name in ADAPTED_MODELS:
        base, recipe = ADAPTED_MODELS[name]
        model.load_state_dict(create_digits_model(base, progress=progress).state_dict())
        _adapt_to_windows(model, recipe, progress)
    else:
        splits = load_digits_splits(img_size=DIGITS_MODELS[name]["img_size"], seed=_SPLIT_SEED)
        train_model(model, splits.train_x, splits.train_y, RECIPES[name], description=f"training {name}",
                    progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return model.eval()


def _adapt_to_windows(model: nn.Module, recipe: TrainRecipe, progress: bool) -> None:
    """SparseViT's sparsity-aware adaptation: every step runs a random window-ratio configuration."""
    from hwnas.pruning.window_adaptation import train_step_hook  # pruning builds on the model zoo's timm models
    from hwnas.pruning.windows import apply_window_ratios

    splits = load_digits_splits(img_size=DIGITS_MODELS["digits-swin"]["img_size"], seed=_SPLIT_SEED)
    hook = train_step_hook(model, torch.Generator().manual_seed(recipe.seed))
    train_model(model, splits.train_x, splits.train_y, recipe, description="sparsity-aware adaptation",
                progress=progress, before_step=hook)
    apply_window_ratios(model, {})  # back to the dense structure


def random_affine(x: Tensor, recipe: TrainRecipe, generator: torch.Generator) -> Tensor:
    """Jitter a batch with a random rotation, scale and translation per image (border padding)."""
    n, size = x.shape[0], x.shape[-1]

    def uniform(bound: float) -> Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    angle = uniform(math.radians(recipe.max_rotate_deg))
    scale = 1 + uniform(recipe.max_scale)
    shift = torch.stack([uniform(2 * recipe.max_shift_px / size), uniform(2 * recipe.max_shift_px / size)], 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    theta = torch.cat([theta, shift.unsqueeze(2)], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train_model(model: nn.Module, images: Tensor, labels: Tensor | None, recipe: TrainRecipe,
                description: str = "training", progress: bool = True, before_step: Callable[[], None] | None = None,
                loss_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor] | None = None) -> None:
    """Train ``model`` in place on ``images [N, C, H, W]`` (deterministic for a fixed recipe seed).

    ``labels [N]`` may be None when ``loss_fn`` needs none (distillation from a teacher). The images
    stay where they are; each jittered batch moves to the model's device.
    ``before_step`` runs before every optimisation step (e.g. to draw a random sparsity configuration);
    ``loss_fn(images, logits, labels)`` replaces the label-smoothed cross-entropy (e.g. distillation).
    Only parameters that require grad are optimised. Dropout and stochastic depth draw from torch's
    global generator, seeded here from the recipe (and restored afterwards), so they do not depend
    on what the process ran before.
    """
    if labels is None and loss_fn is None:
        raise ValueError("training without labels needs a loss_fn")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        _train(model, images, labels, recipe, description, progress, before_step, loss_fn)
    model.eval()


def _train(model: nn.Module, images: Tensor, labels: Tensor | None, recipe: TrainRecipe, description: str,
           progress: bool, before_step: Callable[[], None] | None,
           loss_fn: Callable[[Tensor, Tensor, Tensor | None], Tensor] | None) -> None:
    generator = torch.Generator().manual_seed(recipe.seed)
    device = next(model.parameters()).device
    n = len(images)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, round(recipe.warmup_epochs * steps_per_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with transient_progress(*columns, enabled=progress) as bar:
        task = bar.add_task(description, total=recipe.epochs, status="")
        for _ in range(recipe.epochs):
            model.train()
            loss_sum, correct = 0.0, 0
            for batch in torch.randperm(n, generator=generator).split(recipe.batch_size):
                x = random_affine(images[batch], recipe, generator).to(device)
                y = None if labels is None else labels[batch].to(device)
                if before_step is not None:
                    before_step()
                logits = model(x)
                if loss_fn is None:
                    loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
                else:
                    loss = loss_fn(x, logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(batch)
                if y is not None:
                    correct += (logits.argmax(1) == y).sum().item()
            accuracy = "" if labels is None else f"  train acc {correct / n:.1%}"
            bar.update(task, advance=1, status=f"loss {loss_sum / n:.3f}{accuracy}")


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (switched to eval mode, on its device) on images ``x`` with labels ``y``."""
    model.eval()
    device = next(model.parameters()).device
    correct = sum((model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)
