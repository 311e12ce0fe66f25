"""The Evaluator's latency: side by side with the dense model when the study asks for it; CUDA graph replays on CUDA."""

import copy

import pytest
import torch

from hwnas.evaluators.evaluator import Evaluator
from hwnas.spaces import space_from_dict

SPACE = {
    "name": "keep-only",
    "model": {"name": "digits-deit"},
    "measure": {"batch_size": 64, "warmup": 2, "repeats": 9, "versus_dense": True},
    "dimensions": [{"name": "keep", "transform": "token_keep", "targets": [1, 2, 3, 4, 5],
                    "values": {"low": 0.2, "high": 1.0, "step": 0.1}, "order": "non_increasing"}],
}


def test_versus_dense_times_each_candidate_side_by_side_with_the_dense_model():
    evaluator = Evaluator(space_from_dict(SPACE))
    identity = evaluator.evaluate(evaluator.space.identity())
    pruned = evaluator.evaluate({f"keep.{block}": 0.2 for block in range(1, 6)})  # 3 of 16 tokens from block 1
    assert 0.75 < identity["latency_ms_vs_dense"] < 1.33  # the same network on both sides
    assert pruned["latency_ms_vs_dense"] < 0.85 and pruned["latency_ms_vs_dense"] < identity["latency_ms_vs_dense"]
    plain = Evaluator(space_from_dict({**SPACE, "measure": {"repeats": 3}}))
    assert "latency_ms_vs_dense" not in plain.evaluate(plain.space.identity())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_candidate_is_timed_as_a_cuda_graph_replay_unless_the_space_says_eager():
    measure = {"batch_size": 64, "warmup": 2, "repeats": 5}
    graphed = Evaluator(space_from_dict({**SPACE, "measure": measure}), device="cuda")
    eager = Evaluator(space_from_dict({**SPACE, "measure": {**measure, "cuda_graph": False}}), device="cuda")
    assert graphed.info()["timing"] == "cuda graph replay" and eager.info()["timing"] == "eager"
    pruned = {f"keep.{block}": 0.5 for block in range(1, 6)}
    assert graphed.timed_call(copy.deepcopy(graphed.model)).__name__ == "replay"  # CUDAGraph.replay, not the model
    # a tiny model at batch 64 is launch-bound: the replay skips Python's per-operator launch overhead
    assert graphed.evaluate(pruned)["latency_ms"] < eager.evaluate(pruned)["latency_ms"]


@pytest.mark.parametrize("source, idle_used", [("measured", 80.0), ("spec", None)])
def test_energy_above_idle_takes_the_idle_power_of_a_profile_measured_here_only(monkeypatch, source, idle_used):
    """A shipped profile's idle figure was read on another machine: it cannot split this machine's counter."""
    from hwnas.evaluators import evaluator as evaluator_module
    from hwnas.hwprofiles.energy import Energy
    from hwnas.hwprofiles.latency import device_name

    seen = []

    def fake_energy(call, device, idle_w=None, **kwargs):
        seen.append(idle_w)
        return Energy(10.0, "fake", 1, 1.0, None if idle_w is None else 5.0)

    monkeypatch.setattr(evaluator_module, "measure_energy", fake_energy)
    profile = {"name": "here", "device": device_name("cpu"), "kind": "cpu", "source": source,
               "peak_tflops": {"float32": 1.0}, "memory_bandwidth_gbs": 10.0, "launch_overhead_us": 10.0,
               "power_w": {"idle": 80.0, "tdp": 100.0}}
    evaluator = Evaluator(space_from_dict({**SPACE, "measure": {"repeats": 3}}), energy=True, hwprofile=profile)
    metrics = evaluator.evaluate(evaluator.space.identity())
    assert seen == [idle_used]
    assert ("energy_mj_above_idle" in metrics) == (idle_used is not None)
