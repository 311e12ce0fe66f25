"""Two-level distillation: the loss is zero only when the student matches the teacher; class tokens line up."""

import copy
from dataclasses import replace

import pytest
import timm
import torch

from hwnas.errors import HwnasError
from hwnas.export.finetune import ClassTokens, distillation_loss, finetune_export
from hwnas.kernels.block_sparse import BlockSparseLinear
from hwnas.kernels.class_attention import _scaled_identity
from hwnas.pruning.block_layers import forced_impl
from hwnas.pruning.tokens import apply_token_keep


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10).eval()


def test_loss_is_zero_for_a_perfect_student_and_positive_otherwise():
    logits, tokens = torch.randn(4, 10), [torch.randn(4, 8) for _ in range(3)]
    assert distillation_loss(logits, logits, tokens, tokens, None).abs() < 1e-6
    assert distillation_loss(logits + torch.randn(4, 10), logits, tokens, tokens, None) > 0.01
    assert distillation_loss(logits, logits, [t + 1 for t in tokens], tokens, None) > 0.01


def test_class_tokens_line_up_between_a_pruned_student_and_its_teacher(vit):
    student = apply_token_keep(copy.deepcopy(vit), {2: 0.5, 4: 0.25}, "ucc")
    student_tokens, teacher_tokens = ClassTokens(student), ClassTokens(vit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        student(x), vit(x)
    got, expected = student_tokens.take(), teacher_tokens.take()
    assert len(got) == len(expected) == len(vit.blocks)
    assert torch.allclose(got[0], expected[0], atol=1e-5)  # nothing is cut before block 2
    assert not torch.allclose(got[-1], expected[-1], atol=1e-3)


def test_gradients_flow_through_the_pruned_blocks(vit):
    student = apply_token_keep(copy.deepcopy(vit), {2: 0.5, 4: 0.25}, "ucc")
    _scaled_identity.cache_clear()
    with torch.inference_mode():  # an evaluation first (as search does) must not poison cached tensors
        student(torch.randn(2, 3, 32, 32))
    student.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert student.blocks[5].mlp.fc1.weight.grad is not None and student.blocks[5].mlp.fc1.weight.grad.abs().sum() > 0


def test_gradients_pass_block_sparse_layers_on_any_calibrated_path():
    torch.manual_seed(0)
    first = torch.nn.Linear(32, 32)
    mask = torch.tensor([[True, False], [False, True]])
    sparse = BlockSparseLinear.from_linear(torch.nn.Linear(32, 32), mask, block=16)
    sparse.impl["cpu"] = "torch_bsr"  # what calibration may pick: no backward
    model = torch.nn.Sequential(first, sparse)
    with forced_impl(model, "dense"):  # what finetune_export trains with
        model(torch.randn(3, 32)).sum().backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert sparse.impl["cpu"] == "torch_bsr"


def test_finetune_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(HwnasError, match="not an hwnas export"):
        finetune_export(tmp_path, tmp_path / "out")


USER_MODEL = {"name": "vit_tiny_patch16_224",
              "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 6}}


@pytest.fixture(scope="module")
def user_teacher(tmp_path_factory):
    """A timm model trained on an ImageFolder of 40 images in two classes (a red left half, a green right
    half): the images and the teacher's checkpoint."""
    import numpy as np
    import safetensors.torch
    from PIL import Image

    from hwnas.evaluators.data import load_imagefolder
    from hwnas.models.digits import RECIPES, train_model
    from hwnas.models.registry import build_arch

    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    for c, label in enumerate(("red-left", "green-right")):
        (root / "images" / label).mkdir(parents=True)
        for i in range(20):
            pixels = rng.integers(0, 120, size=(32, 32, 3), dtype=np.uint8)
            pixels[:, 16 * c:16 * (c + 1), c] += 120
            Image.fromarray(pixels).save(root / "images" / label / f"{i}.png")
    teacher = build_arch(USER_MODEL)
    images = load_imagefolder(root / "images", teacher, "folder")
    train_model(teacher, torch.cat([images.calib_x, images.test_x]), torch.cat([images.calib_y, images.test_y]),
                replace(RECIPES["digits-deit"], epochs=30, batch_size=16), progress=False)
    safetensors.torch.save_file({k: v.contiguous() for k, v in teacher.state_dict().items()},
                                str(root / "dense.safetensors"))
    return root


def write_user_export(root, teacher_dir):
    """An export of the teacher that keeps half the tokens at block 1 and a quarter at block 2, its fc1
    weights perturbed so that it has something to recover."""
    import json

    import safetensors.torch

    import hwnas
    from hwnas.export.exporter import FORMAT

    state = safetensors.torch.load_file(str(teacher_dir / "dense.safetensors"))
    generator = torch.Generator().manual_seed(0)
    for name in [k for k in state if k.endswith("fc1.weight")]:
        state[name] = state[name] + 0.05 * torch.randn(state[name].shape, generator=generator)
    export = root / "export"
    export.mkdir()
    safetensors.torch.save_file(state, str(export / "model.safetensors"), metadata={"format": FORMAT})
    model = {**USER_MODEL, "checkpoint": str(teacher_dir / "dense.safetensors")}
    keep = {"name": "keep", "transform": "token_keep", "targets": [1, 2], "values": [0.25, 0.5, 1.0]}
    space = {"name": "user", "model": model, "data": {"imagefolder": str(teacher_dir / "images"), "labels": "none"},
             "dimensions": [keep]}
    (export / "hwnas.json").write_text(json.dumps({
        "format": FORMAT, "hwnas_version": hwnas.__version__, "model": model, "space": space,
        "config": {"keep.1": 0.5, "keep.2": 0.25}, "metrics": {"fidelity_kl": 0.5, "flops": 123}}))
    return export


def test_a_timm_export_distils_on_its_space_images_without_labels(tmp_path, user_teacher):
    import hwnas
    from hwnas.export.exporter import read_manifest

    export = write_user_export(tmp_path, user_teacher)
    summary = finetune_export(export, tmp_path / "tuned", epochs=10, progress=False)
    assert summary["metric"] == "fidelity_kl" and summary["train_images"] + summary["test_images"] == 40
    # on the held-out half, the student is closer to its teacher (one run: 0.0027 -> 0.00035)
    assert summary["fidelity_kl_after"] < 0.5 * summary["fidelity_kl_before"]
    metrics = read_manifest(tmp_path / "tuned")["metrics"]
    assert metrics["flops"] == 123 and "accuracy" not in metrics
    assert 0 < metrics["fidelity_kl"] < 0.5  # re-measured on the space's calibration images, as search does
    assert hwnas.load(tmp_path / "tuned")(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_timm_export_trains_on_labelled_images_given_on_the_command_line(tmp_path, user_teacher):
    from hwnas.export.exporter import read_manifest

    export = write_user_export(tmp_path, user_teacher)
    summary = finetune_export(export, tmp_path / "tuned", epochs=1, progress=False, data=str(user_teacher / "images"),
                              labels="folder", max_images=30)
    assert summary["metric"] == "accuracy" and summary["dense_accuracy"] == 1.0
    assert summary["train_images"] + summary["test_images"] == 30
    assert summary["data"] == str(user_teacher / "images")
    metrics = read_manifest(tmp_path / "tuned")["metrics"]
    assert metrics["accuracy"] == summary["accuracy_after"]
    assert "fidelity_kl" not in metrics  # the space's images were not what it trained on: not re-measured


def test_finetune_says_what_data_it_needs(tmp_path, user_teacher):
    import json

    export = write_user_export(tmp_path, user_teacher)
    manifest = json.loads((export / "hwnas.json").read_text())
    manifest["space"]["data"] = {"name": "default"}
    (export / "hwnas.json").write_text(json.dumps(manifest))
    with pytest.raises(HwnasError, match="give --data DIR"):
        finetune_export(export, tmp_path / "out", epochs=1, progress=False)
    with pytest.raises(HwnasError, match="--lr must be positive"):
        finetune_export(export, tmp_path / "out", lr=0.0, progress=False)
    with pytest.raises(HwnasError, match="--max-images caps --data DIR"):
        finetune_export(export, tmp_path / "out", max_images=10, progress=False)
    with pytest.raises(HwnasError, match="max_images must be an integer >= 2"):
        finetune_export(export, tmp_path / "out", data=str(user_teacher / "images"), max_images=1, progress=False)


def test_training_without_labels_needs_a_loss():
    from hwnas.models.digits import RECIPES, train_model

    with pytest.raises(ValueError, match="needs a loss_fn"):
        train_model(torch.nn.Linear(2, 2), torch.randn(4, 2), None, RECIPES["digits-deit"], progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_timm_export_distils_on_cuda(tmp_path, user_teacher):
    export = write_user_export(tmp_path, user_teacher)
    summary = finetune_export(export, tmp_path / "tuned", epochs=10, progress=False, device="cuda")
    assert summary["fidelity_kl_after"] < 0.5 * summary["fidelity_kl_before"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_finetune_on_a_missing_device_is_a_clear_error(tmp_path, user_teacher):
    export = write_user_export(tmp_path, user_teacher)
    with pytest.raises(HwnasError, match="CUDA is not available"):
        finetune_export(export, tmp_path / "tuned", epochs=1, progress=False, device="cuda")
