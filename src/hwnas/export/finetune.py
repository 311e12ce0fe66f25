"""``search finetune``: recover an export's accuracy by two-level distillation from its dense model (UCC).

The student is the exported pruned model, the teacher the dense base model of the same export.
Each step's loss on a batch of (jittered) training images is

* **imitation** — match the teacher closely: KL(teacher ‖ student) of the class distributions at
  temperature 1, plus the mean squared error between the class tokens the two models produce
  after every block (the class token is always kept, so the intermediate tokens line up
  whatever the schedule cut), divided by the teacher's mean squared class token;
* **exploration** — a second, softer target: KL at temperature ``SOFT_TEMPERATURE`` (× T²), which
  passes the teacher's ranking of the wrong classes, plus the label-smoothed cross-entropy on
  the ground truth, so the student may find its own solution rather than only copy;

``loss = imitation + EXPLORATION_WEIGHT × exploration``. Block-sparse kernel layers keep their
pruned blocks frozen (their weights are kernel buffers); every other weight is trained. The
result is written as a new export (same format; ``hwnas.load`` reads it) whose manifest records
the recipe, the images, and the test accuracy (or, without labels, ``fidelity_kl``) before and after.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwnas.errors import HwnasError
from hwnas.evaluators.data import load_eval_data
from hwnas.evaluators.evaluator import resolve_device
from hwnas.evaluators.metrics import fidelity_kl, predict_logits
from hwnas.export.exporter import FORMAT, check_export_target, load, read_manifest
from hwnas.models.digits import TrainRecipe, evaluate_accuracy, load_digits_splits, train_model
from hwnas.models.registry import is_builtin, load_model
from hwnas.pruning.block_layers import forced_impl

SOFT_TEMPERATURE = 4.0
EXPLORATION_WEIGHT = 0.5
#: 20 epochs (under a minute on 2 cores): at −51.6 % FLOPs on the Xeon-trained digits DeiT, ucc recovers
#: 94.22 % → 98.22 % of dense 98.67 % (with β = 0.3, before hwnas 0.3.0: 94.44 % → 98.00 %; ucc-blocks:
#: 10 epochs 97.56 %, 20 epochs 97.78 %, 30 epochs 98.00 %)
FINETUNE_RECIPE = TrainRecipe(epochs=20, batch_size=32, lr=2e-4, weight_decay=0.05, warmup_epochs=0.5,
                              label_smoothing=0.1, max_rotate_deg=10, max_scale=0.1, max_shift_px=2, seed=2)
#: the export's metrics that fine-tuning changes (the others, e.g. latency and FLOPs, stay the searched ones)
QUALITY_METRICS = ("accuracy", "fidelity_kl")


class ClassTokens:
    """Collects the class token after every block of ``model.blocks`` during a forward pass.

    Pruned blocks may run their sub-modules directly rather than ``block(x)``, so the tokens are
    read where every path passes: the input of the next block's ``norm1``, and of the final ``norm``.
    """

    def __init__(self, model: nn.Module):
        self.tokens: list[Tensor] = []
        readers = [block.norm1 for block in list(model.blocks)[1:]] + [model.norm]
        self.handles = [reader.register_forward_pre_hook(self._record) for reader in readers]

    def _record(self, module: nn.Module, args) -> None:
        self.tokens.append(args[0][:, 0])

    def take(self) -> list[Tensor]:
        tokens, self.tokens = self.tokens, []
        return tokens

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, student_tokens: list[Tensor],
                      teacher_tokens: list[Tensor], labels: Tensor | None, label_smoothing: float = 0.1) -> Tensor:
    """imitation + EXPLORATION_WEIGHT × exploration (see the module docstring)."""
    if len(student_tokens) != len(teacher_tokens):
        raise HwnasError("student and teacher must have the same number of blocks")
    imitation = _kl(teacher_logits, student_logits, 1.0)
    for student, teacher in zip(student_tokens, teacher_tokens):
        imitation = imitation + F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-6) / len(teacher_tokens)
    exploration = _kl(teacher_logits, student_logits, SOFT_TEMPERATURE) * SOFT_TEMPERATURE**2
    if labels is not None:
        exploration = exploration + F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return imitation + EXPLORATION_WEIGHT * exploration


def finetune_export(export_dir: str | Path, out: str | Path, epochs: int | None = None, progress: bool = True,
                    data: str | None = None, labels: str = "none", lr: float | None = None, device: str = "cpu",
                    max_images: int | None = None) -> dict:
    """Distil the export in ``export_dir`` from its dense model; write the result to ``out``. Returns the summary.

    A built-in digits model trains on the digits' training split. A timm model trains on an
    ImageFolder (``data``, or its space's own): on the half of it that search calibrated on, and
    is measured on the other half, the test split. With labels (``labels``: ``folder`` or
    ``imagenet``) the summary gives test accuracy; without, distillation needs none and the summary
    gives the test split's ``fidelity_kl`` to the dense model. ``max_images`` caps how many images of
    ``data`` are read (all are held in memory). Student and teacher train and are measured on ``device``.
    """
    export_dir, out = Path(export_dir), Path(out)
    if out.resolve() == export_dir.resolve():
        raise HwnasError("--output must differ from the export it fine-tunes (the original is kept)")
    check_export_target(out)
    manifest = read_manifest(export_dir)
    recipe = replace(FINETUNE_RECIPE, **{k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None})
    if recipe.epochs < 1:
        raise HwnasError(f"--epochs must be at least 1, got {recipe.epochs}")
    if recipe.lr <= 0:
        raise HwnasError(f"--lr must be positive, got {recipe.lr}")
    target = resolve_device(device)
    student = load(export_dir)
    if not (hasattr(student, "blocks") and hasattr(student, "norm") and getattr(student, "num_prefix_tokens", 0)):
        raise HwnasError(f"finetune distils ViT/DeiT exports with a class token; {type(student).__name__} "
                         "(e.g. a Swin window export) is not supported yet")
    teacher = load_model(manifest["model"], progress=progress).eval()
    student, teacher = student.to(target), teacher.to(target)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    sets = _finetune_data(manifest, teacher, data, labels, max_images)
    metric, score = _test_metric(teacher, sets.test_x, sets.test_y)
    before = score(student)

    student_tokens, teacher_tokens = ClassTokens(student), ClassTokens(teacher)

    def loss_fn(batch: Tensor, logits: Tensor, batch_labels: Tensor | None) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(batch)
        return distillation_loss(logits, teacher_logits, student_tokens.take(), teacher_tokens.take(), batch_labels,
                                 recipe.label_smoothing)

    with forced_impl(student, "dense"):  # frozen blocks, but gradients must pass them; only dense has a backward
        train_model(student, sets.train_x, sets.train_y, recipe, "distilling", progress=progress, loss_fn=loss_fn)
    student_tokens.close()
    teacher_tokens.close()
    summary = {"epochs": recipe.epochs, "recipe": asdict(recipe), "soft_temperature": SOFT_TEMPERATURE,
               "exploration_weight": EXPLORATION_WEIGHT, "data": sets.source, "train_images": len(sets.train_x),
               "test_images": len(sets.test_x), "metric": metric, f"{metric}_before": before,
               f"{metric}_after": score(student), "from": str(export_dir.resolve())}
    if metric == "accuracy":
        summary["dense_accuracy"] = score(teacher)
    # the export's quality metrics as search defines them (and search eval re-measures them): accuracy on the
    # test split, fidelity on the space's calibration images (unknown after training on other images)
    metrics = {"accuracy": summary["accuracy_after"]} if metric == "accuracy" else {}
    if sets.calib_x is not None:
        metrics["fidelity_kl"] = _fidelity_to(teacher, sets.calib_x)(student)
    _write(student, manifest, summary, metrics, out)
    return summary


@dataclass(frozen=True)
class FinetuneData:
    """Where the images come from, what fine-tuning trains on, what it is measured on, and the space's
    calibration images (search's fidelity; None when fine-tuning reads other images than the space's)."""

    source: str
    train_x: Tensor
    train_y: Tensor | None
    test_x: Tensor
    test_y: Tensor | None
    calib_x: Tensor | None


def _finetune_data(manifest: dict, teacher: nn.Module, data: str | None, labels: str, max_images: int | None
                   ) -> FinetuneData:
    """The images the export's model fine-tunes on (see ``finetune_export``)."""
    model = manifest["model"]
    if data is None and max_images is not None:
        raise HwnasError("--max-images caps --data DIR; the space's own images keep the space's max_images")
    if is_builtin(model["name"]):
        if data is not None:
            raise HwnasError(f"the built-in model '{model['name']}' fine-tunes on the digits; "
                             "--data is for timm models")
        splits = load_digits_splits(img_size=getattr(teacher.patch_embed, "img_size", (32, 32))[0])
        return FinetuneData("digits", splits.train_x, splits.train_y, splits.test_x, splits.test_y, splits.calib_x)
    if data is None:
        spec = manifest["space"].get("data", {})
    else:
        spec = {"imagefolder": data, "labels": labels, "max_images": max_images}
    if "imagefolder" not in spec:
        raise HwnasError(f"finetune of '{model['name']}' trains on images: give --data DIR (an ImageFolder; "
                         "--labels folder|imagenet to train on its labels too)")
    images = load_eval_data(spec, model, teacher)
    return FinetuneData(str(Path(spec["imagefolder"]).absolute()), images.calib_x, images.calib_y, images.test_x,
                        images.test_y, images.calib_x if data is None else None)


def _test_metric(teacher: nn.Module, test_x: Tensor, test_y: Tensor | None) -> tuple[str, Callable[[nn.Module], float]]:
    """The test metric's name and scorer: accuracy with labels, else the KL divergence to the teacher."""
    if test_y is not None:
        return "accuracy", lambda model: evaluate_accuracy(model, test_x, test_y)
    return "fidelity_kl", _fidelity_to(teacher, test_x)


def _fidelity_to(teacher: nn.Module, x: Tensor) -> Callable[[nn.Module], float]:
    """A scorer of models by their ``fidelity_kl`` to ``teacher`` on the images ``x``."""
    with torch.inference_mode():
        dense_logits = predict_logits(teacher.eval(), x)

    def fidelity(model: nn.Module) -> float:
        with torch.inference_mode():
            return fidelity_kl(dense_logits, predict_logits(model.eval(), x))

    return fidelity


def _kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    log_target=True, reduction="batchmean")


def _write(model: nn.Module, manifest: dict, summary: dict, metrics: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT})
    finetuned = {**manifest, "finetune": summary}
    searched = {k: v for k, v in manifest.get("metrics", {}).items() if k not in QUALITY_METRICS}
    finetuned["metrics"] = {**searched, **metrics}  # quality as measured after training; the rest as searched
    finetuned["search_metrics"] = manifest.get("metrics")
    (out / "hwnas.json").write_text(json.dumps(finetuned, indent=2) + "\n")
