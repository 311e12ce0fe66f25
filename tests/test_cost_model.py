"""The linear cost model: features, NNLS fit, prediction, files, and its use as a study objective."""

import json

import numpy as np
import pytest

from hwnas.errors import HwnasError
from hwnas.evaluators.pool import Outcome
from hwnas.hwprofiles.cost_model import CostModel, design_configs, random_configs
from hwnas.models.registry import build_arch
from hwnas.search.objectives import parse_budget, parse_objectives
from hwnas.search.runner import SearchRun
from hwnas.search.study import RunSettings, StudyDir
from hwnas.spaces import config_hash, load_space, space_from_dict

# intercept, keep.1..5, sparsity.qkv/proj/fc1/fc2, block (ms per model's worth of work)
TRUE = np.array([0.8, 0.4, 0.3, 0.5, 0.2, 0.6, 3.0, 1.0, 4.0, 2.5, 1.5])


@pytest.fixture(scope="module")
def default_model():
    space = load_space()
    return space, CostModel.for_space(space, build_arch(space.model))


def synthetic(model, configs, coef=TRUE, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [{"latency_ms": float(model.features(c) @ coef) * (1 + noise * rng.standard_normal()),
             "energy_mj": 2.0 * float(model.features(c) @ coef)} for c in configs]


def test_features_follow_the_kept_work(default_model):
    space, model = default_model
    identity = space.identity()
    dense = model.features(identity)
    block_share = model.profile.blocks["blocks.1"] / model.profile.flops
    assert dense[0] == 1.0 and dense[1:6] == pytest.approx([block_share] * 5)  # each keep.k governs one block
    assert dense[6:10].sum() == pytest.approx(sum(model.profile.layers.values()) / model.profile.flops)
    assert dense[10] == 0  # no pruned layer, no block overhead
    half_fc1 = model.features({**identity, "sparsity.fc1": 0.5})
    assert half_fc1[8] == pytest.approx(dense[8] / 2) and half_fc1[10] > 0
    # keep.3 = 0.5 drops blocks 3..5 to 8 of 16 patch tokens (+ CLS): their work scales by 9/17, fc1's included
    tokens = model.features(space.repair({**identity, "keep.3": 0.5, "keep.4": 0.5, "keep.5": 0.5}))
    assert tokens[3:6] == pytest.approx(dense[3:6] * 9 / 17)
    assert tokens[8] == pytest.approx(dense[8] * (3 + 3 * 9 / 17) / 6)


def test_fit_recovers_known_coefficients(default_model):
    space, model = default_model
    configs = design_configs(space, seed=0)
    assert len(configs) == 2 * len(space.dimensions) + 2 and len({config_hash(c) for c in configs}) == len(configs)
    assert configs[0] == space.identity() and all(space.is_valid(c) for c in configs)
    model.fit(configs, synthetic(model, configs))
    assert model.coefficients["latency_ms"] == pytest.approx(TRUE.tolist(), rel=1e-6)
    held_out = random_configs(space, 8, seed=5, exclude=configs)
    truth = synthetic(model, held_out)
    for config, measured in zip(held_out, truth):
        predicted = model.predict(config)
        assert set(predicted) == {"latency_ms_predicted", "energy_mj_predicted"}
        assert predicted["latency_ms_predicted"] == pytest.approx(measured["latency_ms"], rel=1e-6)
        assert predicted["energy_mj_predicted"] == pytest.approx(measured["energy_mj"], rel=1e-6)
    assert model.error(held_out, truth)["latency_ms_predicted"]["max_rel_error"] < 1e-6


def test_noisy_fit_is_close_and_never_negative(default_model):
    space, model = default_model
    configs = design_configs(space, seed=1)
    model.fit(configs, synthetic(model, configs, noise=0.03, seed=2))
    assert min(model.coefficients["latency_ms"]) >= 0
    held_out = random_configs(space, 20, seed=3, exclude=configs)
    error = model.error(held_out, synthetic(model, held_out))["latency_ms_predicted"]
    assert error["n"] == 20 and error["median_rel_error"] < 0.03 and error["max_rel_error"] < 0.1


def test_prediction_falls_as_sparsity_rises_and_tokens_drop(default_model):
    space, model = default_model
    configs = design_configs(space)
    model.fit(configs, synthetic(model, configs))
    identity = space.identity()
    for name in ("sparsity.qkv", "sparsity.proj", "sparsity.fc1", "sparsity.fc2"):
        for block in (16, 32):
            # from the first pruned level on (0 -> 0.1 adds the block-sparse kernel's overhead)
            costs = [model.predict({**identity, "block": block, name: s})["latency_ms_predicted"]
                     for s in space.dimension(name).values[1:]]
            assert all(a > b for a, b in zip(costs, costs[1:])), (name, block, costs)
    keeps = [model.predict({**identity, "keep.2": k, "keep.3": k, "keep.4": k, "keep.5": k})["latency_ms_predicted"]
             for k in space.dimension("keep.2").values]
    assert all(a < b for a, b in zip(keeps, keeps[1:]))


def test_save_load_round_trip(default_model, tmp_path):
    space, model = default_model
    configs = design_configs(space)
    model.fit(configs, synthetic(model, configs))
    model.fit_error = model.error(configs[:4], synthetic(model, configs[:4]))
    path = model.save(tmp_path / "cost_model.json")
    document = json.loads(path.read_text())
    assert document["features"][0] == "intercept" and len(document["points"]) == len(configs)
    loaded = CostModel.load(path)
    for config in random_configs(space, 5, seed=9):
        assert loaded.predict(config) == model.predict(config)
    assert loaded.fit_error == model.fit_error and loaded.metrics == model.metrics
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(HwnasError, match="not a hwnas.cost_model v1 file"):
        CostModel.load(tmp_path / "bad.json")


def test_window_ratio_keeps_a_fraction_of_its_block():
    space = space_from_dict({"name": "w", "model": {"name": "digits-swin"}, "dimensions": [
        {"name": "ratio", "transform": "window_ratio", "targets": [0, 2], "values": [0.0, 0.5]}]})
    model = CostModel.for_space(space, build_arch(space.model))
    blocks = list(model.profile.blocks)
    assert blocks[:3] == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"]
    dense = model.features({"ratio.0": 0.0, "ratio.2": 0.0})
    assert dense[2] == pytest.approx(model.profile.blocks["layers.1.blocks.0"] / model.profile.flops)
    assert model.features({"ratio.0": 0.5, "ratio.2": 0.0})[1] == pytest.approx(dense[1] / 2)


def test_unknown_transform_is_one_clear_error():
    space = load_space()
    space.dimensions[0] = type(space.dimensions[0])("x", "teleport", None, (0, 1), 0)
    with pytest.raises(HwnasError, match="no feature rule for transform 'teleport'"):
        CostModel.for_space(space, build_arch(space.model))


# ---- as a study objective --------------------------------------------------------------------
SPACE = {
    "name": "formula",
    "model": {"name": "digits-deit"},
    "dimensions": [{"name": "keep", "transform": "token_keep", "targets": [1, 2, 3, 4, 5],
                    "values": {"low": 0.2, "high": 1.0, "step": 0.1}, "order": "non_increasing"}],
}


class FormulaPool:
    """Latency = 0.5 ms + 6 ms × the fraction of block work the token schedule keeps (what the features measure)."""

    workers = 1

    def __init__(self):
        self.evaluated = []
        self.model = CostModel.for_space(space_from_dict(SPACE), build_arch(SPACE["model"]))

    def info(self):
        return {"device": "formula", "batch_size": 1, "dtype": "float32", "threads": 1}

    def evaluate(self, configs):
        for i, config in enumerate(configs):
            self.evaluated.append(config_hash(config))
            work = self.model.features(config)[1:].sum() + 1 / 6  # block 0 always runs in full
            yield Outcome(i, metrics={"accuracy": 0.5 + 0.5 * work, "latency_ms": 0.5 + 6.0 * work})


def test_predicted_latency_objective_and_budget(tmp_path):
    settings = RunSettings(objectives="accuracy,latency_predicted", budget="latency_predicted=5.5ms",
                           optimizer="random", trials=6, seed=0)
    study_dir = StudyDir.create(tmp_path / "study", space_from_dict(SPACE), settings)
    pool = FormulaPool()
    summary = SearchRun(study_dir, pool, progress=False).run()
    n_calibration = 2 * 5 + 2 + 4 - 1  # design points + held-out ones, the baseline measured once
    assert len(pool.evaluated) == 1 + n_calibration + 6
    saved = json.loads((study_dir.path / "cost_model.json").read_text())
    assert saved["fit_error"]["latency_ms_predicted"]["max_rel_error"] < 1e-6 and saved["device"] == "formula"
    document = json.loads((study_dir.path / "pareto.json").read_text())
    assert document["objectives"] == {"accuracy": "max", "latency_ms_predicted": "min"}
    assert document["budget"] == {"latency_ms_predicted": 5.5}
    assert "latency_ms_predicted" in document["baseline"]["metrics"]
    assert all(r.metrics["latency_ms_predicted"] == pytest.approx(r.metrics["latency_ms"]) for r in summary.records)
    assert all(p["metrics"]["latency_ms_predicted"] <= 5.5 for p in document["points"])
    assert document["predicted"]["latency_ms_predicted"]["n"] == 6
    assert "latency_ms_predicted: median error 0.0% (max 0.0%) against the measured latency_ms of 6 trials" in \
        (study_dir.path / "report.md").read_text()

    resumed = StudyDir.open(study_dir.path)
    resumed.settings.trials = 8
    again = FormulaPool()
    SearchRun(resumed, again, progress=False).run()
    assert len(again.evaluated) == 2  # the saved cost model is reused: no calibration measurements


def test_predicted_metric_names_and_errors():
    assert [o.metric for o in parse_objectives("accuracy,latency_predicted,energy_predicted")][1:] == \
        ["latency_ms_predicted", "energy_mj_predicted"]
    assert parse_budget("latency_predicted=5ms,energy_predicted=2J").limits == \
        {"latency_ms_predicted": 5.0, "energy_mj_predicted": 2000.0}


def test_energy_predicted_without_energy_measurements_is_one_clear_error(tmp_path):
    settings = RunSettings(objectives="accuracy,energy_predicted", optimizer="random", trials=2)
    study_dir = StudyDir.create(tmp_path / "study", space_from_dict(SPACE), settings)
    with pytest.raises(HwnasError, match="energy_mj_predicted needs energy_mj measurements"):
        SearchRun(study_dir, FormulaPool(), progress=False).run()
