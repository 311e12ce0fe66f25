"""The Evaluator's latency against the dense model: side by side when the study asks for it."""

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
