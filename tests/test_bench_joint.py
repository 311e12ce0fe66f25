"""The joint-versus-single-technique comparison of `search bench joint`, on made-up measurements."""

from hwnas.bench.joint import _rows, front_rows, space_source, summary
from hwnas.search.pareto import Record


def test_spaces_split_the_default_space_by_technique():
    assert {d["transform"] for d in space_source("block")["dimensions"]} == {"block_sparsity", "block_size"}
    assert {d["transform"] for d in space_source("tokens")["dimensions"]} == {"token_keep"}
    assert len(space_source("joint")["dimensions"]) == 3


def test_a_joint_point_no_union_point_matches_is_beyond_the_union():
    # (space, accuracy, latency): dense; block and token points; joint points beyond and inside the union
    made_up = [("dense", 0.98, 50.0), ("block", 0.97, 40.0), ("block", 0.90, 45.0), ("tokens", 0.95, 30.0),
               ("joint", 0.96, 30.0), ("joint", 0.94, 35.0)]
    candidates = [(space, i, {"x": i}) for i, (space, _, _) in enumerate(made_up)]
    records = {i: Record(i, {"x": i}, {"accuracy": a, "latency_ms": t}, True, str(i))
               for i, (_, a, t) in enumerate(made_up)}
    latencies = {i: [t, t + 1.0] for i, (_, _, t) in enumerate(made_up)}
    metrics = {i: {"flops": 1.0} for i in records}
    rows = _rows(candidates, records, latencies, metrics)

    assert [r["metrics"]["on_front"] for r in rows if r["impl"] == "block"] == [True, False]  # 0.90 @ 45 is dominated
    assert [r["case"]["trial"] for r in front_rows(rows, "union")] == [1, 3]
    assert [r["metrics"]["beyond_union"] for r in rows if r["impl"] == "joint"] == [True, False]
    assert rows[4]["metrics"]["hypervolume"] > 0 and rows[1]["metrics"]["union_hypervolume"] > 0
    table = summary(rows)
    volumes = dict(zip(table.columns[0].cells, table.columns[2].cells))
    assert volumes["joint"] == f"{rows[4]['metrics']['hypervolume']:.4f}"
    assert volumes["union"] == f"{rows[1]['metrics']['union_hypervolume']:.4f}"
    assert volumes["block"] != volumes["joint"]
