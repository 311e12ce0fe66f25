"""``search bench``: the JSON of DESIGN.md, and the path the lent GPU machine runs (no optuna, pymoo, ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from timm.models.vision_transformer import VisionTransformer

from hwnas.bench.record import bench_record
from hwnas.bench.tokens import schedule, schedule_family
from hwnas.models.digits import DIGITS_MODELS
from hwnas.pruning.tokens import keep_counts

BLOCKER = '''
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"optuna", "pymoo", "ray", "platformdirs"}:
            raise ImportError(f"{name} is not installed on this machine")
sys.meta_path.insert(0, _Absent())
'''


def test_bench_runs_without_the_search_stack_and_writes_the_design_format(tmp_path):
    """The GPU machine has torch, triton and timm but not optuna, pymoo, ray or platformdirs (benchmarks/gpu.sh)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), *sys.path]),
               HWNAS_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "kernels.json"
    check = subprocess.run([sys.executable, "-c", "import optuna"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "not installed" in check.stderr  # the blocker works
    result = subprocess.run([sys.executable, "-m", "hwnas", "bench", "kernels", "--quick", "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    measures_profile = subprocess.run([sys.executable, "-c", "import hwnas.hwprofiles.measure_profile"], env=env,
                                      capture_output=True, text=True)  # gpu.sh hwprofile
    assert measures_profile.returncode == 0, measures_profile.stderr
    record = json.loads(out.read_text())
    assert record["bench"] == "kernels" and record["device"].startswith("cpu") and record["threads"] >= 1
    assert "checkpoints" not in record  # no built-in model is measured by this benchmark
    assert {row["impl"] for row in record["results"]} == {"dense", "torch_bsr", "hwnas"}
    for row in record["results"]:
        assert set(row["case"]) == {"shape", "batch", "dtype", "sparsity", "block"}
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["repeats"] > 0


def test_bench_record_names_the_built_in_weights_it_measured():
    record = bench_record("tokens", "cpu", [], {"digits-deit": "0123456789ab"})
    assert record["checkpoints"] == {"digits-deit": "0123456789ab"}
    assert list(record)[-1] == "results"


def test_models_bench_reports_energy_per_image_and_above_idle():
    from hwnas.bench.models import energy_metrics, summary
    from hwnas.hwprofiles.energy import Energy

    dense = energy_metrics(Energy(6400.0, "nvml", 100, 1.0, above_idle_mj_per_call=3200.0), batch=64, idle_w=120.0)
    assert dense == {"energy_mj": 100.0, "energy_source": "nvml", "energy_above_idle_mj": 50.0, "idle_w": 120.0}
    sparse = energy_metrics(Energy(3200.0, "nvml", 100, 1.0, above_idle_mj_per_call=1280.0), batch=64, idle_w=120.0)
    assert "energy_above_idle_mj" not in energy_metrics(Energy(3200.0, "rapl", 10, 1.0), batch=64, idle_w=None)
    case = {"model": "deit_base_patch16_224", "batch": 64, "dtype": "float16", "sparsity": 0.5, "block": 32}
    timing = {"min_ms": 0.0, "max_ms": 0.0, "repeats": 1}
    rows = [{"case": case, "impl": "dense", "median_ms": 6.0, **timing, "metrics": dense},
            {"case": case, "impl": "hwnas", "median_ms": 4.0, **timing,
             "metrics": {**sparse, "impls": {"triton": 40, "dense": 8}}}]
    cells = [next(iter(column.cells)) for column in summary(rows).columns]
    assert cells[3:] == ["32", "6.0", "4.0", "1.50x", "2.00x (2.50x)", "dense 8, triton 40"]


def test_the_tokens_schedule_family_gives_each_set_of_token_counts_once():
    """On the digits DeiT (16 patches) keep 0.35 and 0.4 at block 1 both keep 6 tokens: one schedule, not two."""
    model = VisionTransformer(**DIGITS_MODELS["digits-deit"])
    assert keep_counts(model, schedule(6, (1,), 0.35)) == keep_counts(model, schedule(6, (1,), 0.4))
    family = list(schedule_family(model, (1, 32, 32), targets=(0.5,), cut_sets=((1,),)))
    assert [rho for _, _, rho, _, _ in family] == [0.35]
