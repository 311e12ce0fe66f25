"""Evaluation data: calibration images (fidelity, Hessians) and test images (accuracy).

``data: {name: default}`` is the digits split of the built-in models. ``data: {imagefolder: DIR}``
reads an ImageFolder with timm's dataset and the model's own preprocessing; ``labels`` says how
folder names map to the model's classes: ``none`` (fidelity only), ``folder`` (sorted folder
order) or ``imagenet`` (folder names are ImageNet wnids); ``max_images`` caps how many images
are used (a random subset), for quick searches on large models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hwnas.errors import HwnasError
from hwnas.models.digits import load_digits_splits
from hwnas.models.registry import is_builtin

LABEL_MODES = ("none", "folder", "imagenet")


@dataclass(frozen=True)
class EvalData:
    """Calibration images and test images (with labels when the data has them)."""

    name: str
    calib_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    calib_y: torch.Tensor | None = None  # what fine-tuning trains on; search reads no calibration labels

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.test_x.shape[1:])


def check_data_spec(data: dict, model_spec: dict) -> None:
    """Raise on a space's ``data:`` mapping that cannot load, without reading an image (so a study fails first)."""
    if "imagefolder" in data:
        _check_imagefolder(Path(data["imagefolder"]), data.get("labels", "none"), data.get("max_images"))
        return
    name = data.get("name", "default")
    if name != "default":
        raise HwnasError(f"unknown data '{name}': use 'default' or {{imagefolder: DIR}}")
    if not is_builtin(model_spec["name"]):
        raise HwnasError(f"model '{model_spec['name']}' has no default data: give data: {{imagefolder: DIR}} "
                         "(the default data is the digits set of the built-in models)")


def has_labels(data: dict) -> bool:
    """Whether a space's ``data:`` mapping gives labels, so that accuracy can be measured."""
    return data.get("labels", "none") != "none" if "imagefolder" in data else True


def load_eval_data(data: dict, model_spec: dict, model: nn.Module) -> EvalData:
    """Resolve a space's ``data:`` mapping for the given model."""
    check_data_spec(data, model_spec)
    if "imagefolder" in data:
        return load_imagefolder(data["imagefolder"], model, data.get("labels", "none"),
                                float(data.get("calib_fraction", 0.5)), data.get("max_images"))
    splits = load_digits_splits(img_size=int(model.patch_embed.img_size[0]))
    return EvalData("digits", splits.calib_x, splits.test_x, splits.test_y, splits.calib_y)


def load_imagefolder(root: str | Path, model: nn.Module, labels: str = "none", calib_fraction: float = 0.5,
                     max_images: int | None = None) -> EvalData:
    """An ImageFolder (at most ``max_images`` of it), preprocessed as the model expects, split into
    calibration and test halves."""
    from timm.data import ImageDataset, ImageNetInfo, create_transform, resolve_data_config

    root = Path(root)
    _check_imagefolder(root, labels, max_images)
    embed = getattr(model, "patch_embed", None)  # the size the model was built for, e.g. img_size=672
    size, proj = getattr(embed, "img_size", None), getattr(embed, "proj", None)
    args = {"input_size": (proj.in_channels, *size)} if size is not None and proj is not None else {}
    transform = create_transform(**resolve_data_config(args, model=model))
    try:
        dataset = ImageDataset(str(root), transform=transform)
    except Exception as exc:  # timm raises plain errors for empty or unreadable folders
        raise HwnasError(f"image folder {root}: {exc}") from None
    if len(dataset) < 2:
        raise HwnasError(f"image folder {root} holds {len(dataset)} image(s); need at least 2")
    chosen = range(len(dataset))
    if max_images is not None and max_images < len(dataset):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1))[:max_images].sort().values.tolist()
    images, targets = zip(*(dataset[i] for i in chosen))
    x = torch.stack(images)
    y = None
    if labels == "folder":
        folders, classes = len(dataset.reader.class_to_idx), getattr(model, "num_classes", None)
        if classes is not None and folders > classes:
            raise HwnasError(f"image folder {root} has {folders} class folders but the model predicts {classes} "
                             f"classes (labels: folder maps the sorted folders to classes 0..{folders - 1})")
        y = torch.tensor(targets)
    elif labels == "imagenet":
        info = ImageNetInfo()
        index = {wnid: i for i, wnid in enumerate(info.label_names())}
        folders = dataset.reader.class_to_idx
        by_idx = {v: k for k, v in folders.items()}
        unknown = [w for w in folders if w not in index]
        if unknown:
            raise HwnasError(f"image folder {root}: {unknown[0]} is not an ImageNet wnid (labels: imagenet)")
        y = torch.tensor([index[by_idx[t]] for t in targets])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_calib = max(1, min(len(x) - 1, round(calib_fraction * len(x))))
    calib, test = order[:n_calib], order[n_calib:]
    return EvalData(root.name, x[calib], x[test], None if y is None else y[test], None if y is None else y[calib])


def _check_imagefolder(root: Path, labels: str, max_images) -> None:
    if not root.is_dir():
        raise HwnasError(f"image folder {root} does not exist")
    if max_images is not None and (not isinstance(max_images, int) or max_images < 2):
        raise HwnasError(f"data max_images must be an integer >= 2, got {max_images!r}")
    if labels not in LABEL_MODES:
        raise HwnasError(f"data labels '{labels}' unknown (use one of {', '.join(LABEL_MODES)})")
