"""The built-in digits models: the data split, the training cache, and the DeiT's accuracy."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from hwnas.errors import HwnasError
from hwnas.models import digits


def test_splits_are_disjoint_stratified_and_deterministic():
    a, b = digits.load_digits_splits(), digits.load_digits_splits()
    assert len(a.train_y) + len(a.calib_y) + len(a.test_y) == 1797
    assert abs(len(a.test_y) / 1797 - digits.TEST_FRACTION) < 0.01
    assert abs(len(a.calib_y) / 1797 - digits.CALIB_FRACTION) < 0.01
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert a.train_x.shape[1:] == (1, 32, 32)
    assert abs(a.train_x.mean().item()) < 1e-4 and abs(a.train_x.std().item() - 1) < 1e-3
    # no image is in two splits
    rows = {split: {tuple(x.flatten().tolist()) for x in xs} for split, xs in
            (("train", a.train_x), ("calib", a.calib_x), ("test", a.test_x))}
    duplicates_within = len(a.train_x) - len(rows["train"])  # digits holds a few identical images
    assert duplicates_within < 10
    assert len(rows["test"] & rows["calib"]) < 3 and len(rows["test"] & rows["train"]) < 5
    for split in (a.train_y, a.calib_y, a.test_y):  # every class in every split, roughly balanced
        counts = torch.bincount(split, minlength=10).float()
        assert counts.min() / counts.max() > 0.8


def test_checkpoint_hash_covers_the_recipe(monkeypatch):
    before = digits.checkpoint_path("digits-deit")
    recipe = dataclasses.replace(digits.RECIPES["digits-deit"], epochs=1)
    monkeypatch.setitem(digits.RECIPES, "digits-deit", recipe)
    assert digits.checkpoint_path("digits-deit") != before


def test_unknown_builtin_is_a_clear_error():
    with pytest.raises(HwnasError, match="unknown digits model 'digits-mlp'"):
        digits.build_digits_arch("digits-mlp")


def test_trained_on_first_use_then_loaded_from_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HWNAS_CACHE_DIR", str(tmp_path))
    tiny = dict(digits.DIGITS_MODELS["digits-deit"], embed_dim=24, depth=1, num_heads=2)
    monkeypatch.setitem(digits.DIGITS_MODELS, "digits-deit", tiny)
    monkeypatch.setitem(digits.RECIPES, "digits-deit", dataclasses.replace(digits.RECIPES["digits-deit"], epochs=1))
    assert digits.checkpoint_fingerprint("digits-deit") is None
    first = digits.create_digits_model("digits-deit", progress=False)
    assert digits.checkpoint_path("digits-deit").is_file()
    fingerprint = digits.checkpoint_fingerprint("digits-deit")
    assert fingerprint == hashlib.sha256(digits.checkpoint_path("digits-deit").read_bytes()).hexdigest()[:12]
    untrained = digits.build_digits_arch("digits-deit")
    assert not torch.equal(first.head.weight, untrained.head.weight)  # it was trained
    second = digits.create_digits_model("digits-deit", progress=False)
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(p, q), name
    assert digits.checkpoint_fingerprint("digits-deit") == fingerprint


@pytest.mark.parametrize("name", ["digits-deit", "digits-swin"])
def test_builtin_models_are_accurate(name):
    model = digits.create_digits_model(name, progress=False)
    splits = digits.load_digits_splits(img_size=digits.DIGITS_MODELS[name]["img_size"])
    assert digits.evaluate_accuracy(model, splits.test_x, splits.test_y) >= 0.95


def test_training_with_dropout_does_not_depend_on_the_global_generator():
    """Stochastic depth and dropout draw from torch's global generator: training seeds it from the recipe,
    so the same recipe trains the same weights whatever the process drew before, and leaves it as it was."""
    splits = digits.load_digits_splits(img_size=32)
    recipe = dataclasses.replace(digits.RECIPES["digits-deit"], epochs=1)
    arch = dict(digits.DIGITS_MODELS["digits-deit"], embed_dim=24, depth=1, num_heads=2, drop_path_rate=0.5,
                drop_rate=0.3)
    initial = digits.VisionTransformer(**arch).state_dict()
    trained = []
    for earlier_draws in (1, 1000):
        torch.rand(earlier_draws)  # the global generator in another state each time
        model = digits.VisionTransformer(**arch)
        model.load_state_dict(initial)
        before = torch.random.get_rng_state()
        digits.train_model(model, splits.train_x, splits.train_y, recipe, progress=False)
        assert torch.equal(torch.random.get_rng_state(), before)
        trained.append(model.state_dict())
    for name, tensor in trained[0].items():
        assert torch.equal(tensor, trained[1][name]), name
