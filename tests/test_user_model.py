"""The user path: any timm model, a checkpoint file (never unpickled), and an ImageFolder without labels."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from hwnas.cli import _validate as validate
from hwnas.errors import HwnasError
from hwnas.evaluators.data import load_imagefolder
from hwnas.evaluators.evaluator import Evaluator
from hwnas.models.registry import load_checkpoint, load_model
from hwnas.search.study import RunSettings
from hwnas.spaces import space_from_dict

pytestmark = pytest.mark.slow
MODEL = "deit_tiny_patch16_224"


class Payload:
    """An arbitrary pickled object: loading with ``weights_only=True`` must refuse it."""


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A checkpoint of random weights and an ImageFolder of 40 random photos-to-be in two classes."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    state = timm.create_model(MODEL, pretrained=False).state_dict()
    safetensors.torch.save_file(state, str(root / "weights.safetensors"))
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(20):
            pixels = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{i}.png")
    return root, state


def test_timm_model_with_checkpoint_and_imagefolder(user_files, monkeypatch, tmp_path):
    monkeypatch.setenv("HWNAS_CACHE_DIR", str(tmp_path))
    root, state = user_files
    space = space_from_dict({
        "name": "user",
        "model": {"name": MODEL, "checkpoint": str(root / "weights.safetensors")},
        "data": {"imagefolder": str(root / "images"), "labels": "none"},
        "measure": {"batch_size": 4, "warmup": 1, "repeats": 2},
        "dimensions": [
            {"name": "keep", "transform": "token_keep", "targets": [4, 8], "values": [0.5, 1.0],
             "order": "non_increasing"},
            {"name": "sparsity", "transform": "block_sparsity", "targets": {"fc1": "*.mlp.fc1"}, "values": [0.0, 0.5]},
        ],
    })
    evaluator = Evaluator(space)
    for name, tensor in evaluator.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name  # the checkpoint was loaded
    assert evaluator.data.test_y is None and evaluator.data.input_shape == (3, 224, 224)

    dense = evaluator.evaluate(space.identity())
    assert "accuracy" not in dense and dense["fidelity_kl"] == pytest.approx(0.0, abs=1e-6)
    pruned = evaluator.evaluate({"keep.4": 0.5, "keep.8": 0.5, "sparsity.fc1": 0.5})
    assert pruned["fidelity_kl"] > 0
    assert pruned["flops"] < dense["flops"] and pruned["params"] < dense["params"]


def test_torch_checkpoints_load_with_weights_only(user_files, tmp_path):
    _, state = user_files
    torch.save({"state_dict": state}, tmp_path / "weights.pth")
    model = timm.create_model(MODEL, pretrained=False)
    load_checkpoint(model, tmp_path / "weights.pth")
    assert torch.equal(model.head.weight, state["head.weight"])

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(HwnasError, match="not a readable.*weights-only load refused") as refused:
        load_checkpoint(model, tmp_path / "evil.pth")
    assert "weights_only" not in str(refused.value)  # torch's advice to unpickle it anyway is not passed on


def test_a_model_without_checkpoint_is_the_same_in_every_process(user_files, capsys):
    """Ray workers, export and eval each build the model: without a checkpoint its random weights must agree."""
    first = load_model({"name": MODEL}).state_dict()
    torch.rand(1)  # whatever the global generator's state, the weights are seeded
    second = load_model({"name": MODEL}).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)

    space = space_from_dict({"name": "user", "model": {"name": MODEL}, "data": {"imagefolder": str(user_files[0])},
                             "dimensions": [{"name": "keep", "transform": "token_keep", "targets": [4],
                                             "values": [0.5, 1.0]}]})
    validate(space, RunSettings(objectives="fidelity,latency"))  # the images have no labels
    assert "has no checkpoint: its weights are random" in capsys.readouterr().err


def test_more_class_folders_than_model_classes_is_an_error(user_files):
    root, _ = user_files
    single = timm.create_model(MODEL, pretrained=False, num_classes=1)
    with pytest.raises(HwnasError, match="has 2 class folders but the model predicts 1 classes"):
        load_imagefolder(root / "images", single, labels="folder")
    assert load_imagefolder(root / "images", timm.create_model(MODEL, num_classes=2), labels="folder").test_y is not None
