"""Exports of an earlier hwnas load as what they ran: token methods renamed since are mapped to today's names,
and UCC scores with the spectral weight of that version."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import hwnas
from hwnas.export.exporter import FORMAT, RENAMED_TOKEN_METHODS, _as_it_ran
from hwnas.export.remeasure import remeasure
from hwnas.models.registry import build_arch
from hwnas.pruning.token_methods import EARLIER_SPECTRAL_WEIGHT, SPECTRAL_WEIGHT, UccEveryBlockMethod, UccMethod

MODEL = {"name": "digits-deit"}
KEEP = {"name": "keep", "transform": "token_keep", "targets": [2, 4], "values": [0.25, 0.5, 1.0]}
METHOD = {"name": "tokens", "transform": "token_method", "values": ["ucc", "tome"]}


def write_export(path, version: str, dimensions: list[dict], config: dict):
    """An export as ``version`` wrote it: the architecture's weights (token methods add none) and a manifest."""
    torch.manual_seed(0)
    model = build_arch(MODEL)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.02)
    path.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(path / "model.safetensors"), metadata={"format": FORMAT})
    manifest = {"format": FORMAT, "hwnas_version": version, "model": MODEL, "space": {
        "name": "tokens", "model": MODEL, "dimensions": dimensions}, "config": config}
    (path / "hwnas.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("named", [True, False], ids=["method-variable", "default-method"])
def test_an_older_ucc_export_loads_ranking_by_every_block(tmp_path, named):
    dimensions = [KEEP, METHOD] if named else [KEEP]
    config = {"keep.2": 0.5, "keep.4": 0.25, **({"tokens": "ucc"} if named else {})}
    assert RENAMED_TOKEN_METHODS["0.1.0"]["ucc"] == "ucc-blocks"
    old = hwnas.load(write_export(tmp_path / "old", "0.1.0", dimensions, config))
    new = hwnas.load(write_export(tmp_path / "new", hwnas.__version__, dimensions, config))
    assert type(old.blocks.method) is UccEveryBlockMethod and old.blocks.method.history == "blocks"
    assert type(new.blocks.method) is UccMethod and new.blocks.method.history == "cuts"
    assert old.blocks.method.spectral_weight == 0.3 and new.blocks.method.spectral_weight == SPECTRAL_WEIGHT
    assert old.blocks.observes == [True] * 4 + [False, False]
    x = torch.randn(4, 1, 32, 32)
    with torch.inference_mode():
        assert old(x).shape == new(x).shape == (4, 10)


@pytest.mark.parametrize("named", [True, False], ids=["method-variable", "default-method"])
def test_a_0_2_export_scores_with_its_spectral_weight_unless_its_space_set_one(tmp_path, named):
    dimensions = [KEEP, METHOD] if named else [KEEP]
    config = {"keep.2": 0.5, "keep.4": 0.25, **({"tokens": "ucc"} if named else {})}
    assert EARLIER_SPECTRAL_WEIGHT["0.2.0"] == 0.3 != SPECTRAL_WEIGHT
    old = hwnas.load(write_export(tmp_path / "old", "0.2.0", dimensions, config))
    assert type(old.blocks.method) is UccMethod and old.blocks.method.spectral_weight == 0.3
    chosen = {"name": "beta", "transform": "spectral_weight", "values": [0.6]}
    own = hwnas.load(write_export(tmp_path / "own", "0.2.0", [*dimensions, chosen], {**config, "beta": 0.6}))
    assert own.blocks.method.spectral_weight == 0.6
    new = hwnas.load(write_export(tmp_path / "new", hwnas.__version__, dimensions, config))
    assert new.blocks.method.spectral_weight == SPECTRAL_WEIGHT


def test_an_older_export_of_another_method_loads_unchanged(tmp_path):
    config = {"keep.2": 0.5, "keep.4": 0.25, "tokens": "tome"}
    old = hwnas.load(write_export(tmp_path / "old", "0.1.0", [KEEP, METHOD], config))
    assert old.blocks.method.name == "tome"
    tome_only = {**METHOD, "values": ["tome"]}
    manifest = {"hwnas_version": "0.2.0", "space": {"name": "t", "model": {"name": "digits-deit"},
                                                    "dimensions": [KEEP, tome_only]}, "config": config}
    space, _ = _as_it_ran(manifest, "hwnas.json")  # no UCC can run: no spectral weight to restore
    assert [d["transform"] for d in space["dimensions"]] == ["token_keep", "token_method"]


def test_eval_times_the_export_beside_its_dense_model(tmp_path):
    export = write_export(tmp_path / "export", hwnas.__version__, [KEEP], {"keep.2": 0.5, "keep.4": 0.25})
    _, measured, _ = remeasure(str(export))
    assert measured["latency_ms_vs_dense"] > 0 and measured["latency_ms"] > 0
    _, alone, _ = remeasure(str(export), versus_dense=False)
    assert "latency_ms_vs_dense" not in alone and alone["latency_ms"] > 0
