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
the recipe and the test accuracy before and after.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwnas.errors import HwnasError
from hwnas.export.exporter import FORMAT, load, read_manifest
from hwnas.models.digits import TrainRecipe, evaluate_accuracy, load_digits_splits, train_model
from hwnas.models.registry import is_builtin, load_model
from hwnas.pruning.block_layers import forced_impl

SOFT_TEMPERATURE = 4.0
EXPLORATION_WEIGHT = 0.5
#: 20 epochs (under a minute on 2 cores): at −51.6 % FLOPs on the Xeon-trained digits DeiT, 10 epochs
#: recovered 97.56 % of dense 98.67 %, 20 epochs 97.78 %, 30 epochs 98.00 %
FINETUNE_RECIPE = TrainRecipe(epochs=20, batch_size=32, lr=2e-4, weight_decay=0.05, warmup_epochs=0.5,
                              label_smoothing=0.1, max_rotate_deg=10, max_scale=0.1, max_shift_px=2, seed=2)


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


def finetune_export(export_dir: str | Path, out: str | Path, epochs: int | None = None,
                    progress: bool = True) -> dict:
    """Distil the export in ``export_dir`` from its dense model; write the result to ``out``. Returns the summary."""
    export_dir, out = Path(export_dir), Path(out)
    manifest = read_manifest(export_dir)
    if out.resolve() == export_dir.resolve():
        raise HwnasError("--output must differ from the export it fine-tunes (the original is kept)")
    if out.is_dir() and any(out.iterdir()) and not (out / "hwnas.json").is_file():
        raise HwnasError(f"{out} exists and is not an hwnas export: choose a new or empty directory")
    if not is_builtin(manifest["model"]["name"]):
        raise HwnasError(f"finetune needs labelled training data: this version trains the built-in digits models "
                         f"only, not '{manifest['model']['name']}'")
    recipe = FINETUNE_RECIPE if epochs is None else replace(FINETUNE_RECIPE, epochs=epochs)
    if recipe.epochs < 1:
        raise HwnasError(f"--epochs must be at least 1, got {recipe.epochs}")
    student = load(export_dir)
    if not (hasattr(student, "blocks") and hasattr(student, "norm") and getattr(student, "num_prefix_tokens", 0)):
        raise HwnasError(f"finetune distils ViT/DeiT exports with a class token; {type(student).__name__} "
                         "(e.g. a Swin window export) is not supported yet")
    teacher = load_model(manifest["model"], progress=progress).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    size = getattr(student.patch_embed, "img_size", (32, 32))[0]
    splits = load_digits_splits(img_size=size)
    before = evaluate_accuracy(student, splits.test_x, splits.test_y)
    dense = evaluate_accuracy(teacher, splits.test_x, splits.test_y)

    student_tokens, teacher_tokens = ClassTokens(student), ClassTokens(teacher)

    def loss_fn(images: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(images)
        return distillation_loss(logits, teacher_logits, student_tokens.take(), teacher_tokens.take(), labels,
                                 recipe.label_smoothing)

    with forced_impl(student, "dense"):  # frozen blocks, but gradients must pass them; only dense has a backward
        train_model(student, splits, recipe, "distilling", progress=progress, loss_fn=loss_fn)
    student_tokens.close()
    teacher_tokens.close()
    after = evaluate_accuracy(student, splits.test_x, splits.test_y)
    summary = {"epochs": recipe.epochs, "recipe": asdict(recipe), "soft_temperature": SOFT_TEMPERATURE,
               "exploration_weight": EXPLORATION_WEIGHT, "dense_accuracy": dense, "accuracy_before": before,
               "accuracy_after": after, "from": str(export_dir.resolve())}
    _write(student, manifest, summary, out)
    return summary


def _kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    log_target=True, reduction="batchmean")


def _write(model: nn.Module, manifest: dict, summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT})
    finetuned = {**manifest, "finetune": summary}
    finetuned["metrics"] = {**manifest.get("metrics", {}), "accuracy": summary["accuracy_after"]}
    finetuned["search_metrics"] = manifest.get("metrics")
    (out / "hwnas.json").write_text(json.dumps(finetuned, indent=2) + "\n")
