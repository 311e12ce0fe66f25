"""Search spaces: YAML loading and its errors, codecs for pymoo and Optuna, ordering repair, hashing."""

import numpy as np
import optuna
import pytest

from hwnas.errors import HwnasError
from hwnas.spaces import config_hash, load_space, space_from_dict

TOKENS = {
    "name": "t",
    "model": {"name": "digits-deit"},
    "dimensions": [{"name": "keep", "transform": "token_keep", "targets": [1, 2, 3],
                    "values": {"low": 0.5, "high": 1.0, "step": 0.1}, "order": "non_increasing"}],
}


def test_default_preset_loads_and_prints():
    space = load_space()
    kinds = ["qkv", "proj", "fc1", "fc2"]
    assert space.names == [f"keep.{i}" for i in range(1, 6)] + [f"sparsity.{k}" for k in kinds] + ["block"]
    assert space.identity() == {**{f"keep.{i}": 1.0 for i in range(1, 6)}, **{f"sparsity.{k}": 0.0 for k in kinds},
                                "block": 16}
    assert space.dimension("sparsity.fc1").target == "*.mlp.fc1"
    assert "non-increasing" in space.describe()


def test_range_values_are_exact_grid():
    space = space_from_dict(TOKENS)
    assert space.dimension("keep.1").values == (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_decode_repairs_ordering_and_encode_inverts():
    space = space_from_dict(TOKENS)
    config = space.decode([0, 5, 3])  # 0.5, 1.0, 0.8 -> sorted into non-increasing order
    assert config == {"keep.1": 1.0, "keep.2": 0.8, "keep.3": 0.5}
    valid = space.decode([5, 3, 1])
    assert space.is_valid(valid)
    assert np.array_equal(space.encode(valid), [5, 3, 1])


def test_non_decreasing_inside_stages_only():
    data = {**TOKENS, "dimensions": [{"name": "r", "transform": "window_ratio", "targets": [0, 1, 2, 3],
                                      "values": [0.0, 0.1, 0.2], "order": "non_decreasing", "stages": [[0, 1], [2, 3]]}]}
    space = space_from_dict(data)
    repaired = space.repair({"r.0": 0.2, "r.1": 0.0, "r.2": 0.1, "r.3": 0.0})
    assert repaired == {"r.0": 0.0, "r.1": 0.2, "r.2": 0.0, "r.3": 0.1}


def test_optuna_distributions_and_suggest_respect_order():
    space = space_from_dict(TOKENS)
    dist = space.distributions()["keep.1"]
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.step == pytest.approx(0.1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        config = space.suggest(study.ask())
        assert space.is_valid(config)
        assert all(v in space.dimension(k).values for k, v in config.items())


def test_categorical_for_irregular_values():
    data = {**TOKENS, "dimensions": [{"name": "block_size", "transform": "block_size", "values": [16, 32, 64]}]}
    dist = space_from_dict(data).distributions()["block_size"]
    assert isinstance(dist, optuna.distributions.CategoricalDistribution)


def test_hash_ignores_key_order_and_float_noise():
    a = {"keep.1": 0.7, "keep.2": 0.5}
    b = {"keep.2": 0.5, "keep.1": 0.7000000000000001}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({"keep.1": 0.7, "keep.2": 0.6})


def test_validate_snaps_and_rejects_unknown():
    space = space_from_dict(TOKENS)
    assert space.validate({"keep.1": 0.7000001, "keep.2": 0.8, "keep.3": 0.5})["keep.2"] == 0.7
    with pytest.raises(HwnasError, match="unknown dimension"):
        space.validate({"keep.9": 0.5, "keep.1": 1.0, "keep.2": 1.0, "keep.3": 1.0})


def test_identity_stays_unpruned_when_the_grid_lacks_it():
    """The baseline of a space with a fixed schedule is the dense model, not the nearest grid value."""
    fixed = {**TOKENS, "dimensions": [{"name": "keep", "transform": "token_keep", "targets": [2], "values": [0.4]}]}
    space = space_from_dict(fixed)
    assert space.validate(space.identity()) == {"keep.2": 1.0}
    assert space.validate({"keep.2": 0.9}) == {"keep.2": 0.4}  # any other value still snaps to the grid


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed", "not valid YAML"),
    ("- just\n- a list", "expected a mapping"),
    ("name: x\nmodel: digits-deit\n", "dimensions: missing"),
    ("name: x\nmodel: digits-deit\ncolour: red\ndimensions: []", "colour: unknown key"),
    ("name: x\nmodel: digits-deit\ndimensions:\n - {name: k, transform: shrink, values: [1]}", "unknown transform 'shrink'"),
    ("name: x\nmodel: digits-deit\ndimensions:\n - {name: k, transform: token_keep, values: {low: 1}}",
     "dimensions\\[0\\].values"),
    ("name: x\nmodel: digits-deit\ndimensions:\n - {name: k, transform: token_keep, targets: [1], values: [1.0], order: up}",
     "dimensions\\[0\\].order"),

    *[(f"name: x\nmodel: digits-deit\nmeasure: {{{setting}}}\n"
       "dimensions:\n - {name: k, transform: token_keep, targets: [1], values: [0.5, 1.0]}", message)
      for setting, message in [
          ("batch_size: 0", r"measure.batch_size: expected an integer >= 1, got 0"),
          ("repeats: 2.5", r"measure.repeats: expected an integer >= 1, got 2.5"),
          ("warmup: -1", r"measure.warmup: expected an integer >= 0"),
          ("threads: 0", r"measure.threads: expected an integer >= 1"),
          ("dtype: float8", r"measure.dtype: expected one of float32, float16, bfloat16, got 'float8'"),
          ("versus_dense: maybe", r"measure.versus_dense: expected true or false"),
          ("cuda_graph: 1", r"measure.cuda_graph: expected true or false, got 1"),
      ]],
])
def test_yaml_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(HwnasError, match=message) as info:
        load_space(path)
    assert str(path) in str(info.value)


def test_missing_file_or_preset():
    with pytest.raises(HwnasError, match="neither a YAML file nor a preset"):
        load_space("no-such-space")


def test_paths_are_stored_absolute_so_a_study_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "space.yaml").write_text(
        "name: user\n"
        "model: {name: deit_tiny_patch16_224, checkpoint: weights/w.safetensors}\n"
        "data: {imagefolder: ~/images, labels: folder}\n"
        "dimensions: [{name: keep, transform: token_keep, targets: [1], values: [0.5, 1.0]}]\n")
    space = load_space("space.yaml")
    assert space.model["checkpoint"] == str(tmp_path / "weights" / "w.safetensors")
    assert space.data == {"imagefolder": str(tmp_path / "home" / "images"), "labels": "folder"}
    assert space.source["model"] == space.model and space.source["data"] == space.data  # what a study stores
    monkeypatch.chdir(tmp_path / "..")
    assert space_from_dict(space.source).source == space.source  # reloaded elsewhere: the same files
    assert "data" not in space_from_dict(TOKENS).source  # nothing added to a space that names no data
