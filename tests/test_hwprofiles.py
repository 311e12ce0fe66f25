"""Hardware profiles, the roofline predictor, `search profile` and `search compare`."""

import functools
import json
import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.errors import HwnasError
from hwnas.hwprofiles.energy import idle_power_w, measure_energy
from hwnas.hwprofiles.latency import measure_side_by_side, paired_ratio
from hwnas.hwprofiles.measure_profile import measure_profile
from hwnas.hwprofiles.predictor import Predictor, op_table, trace_ops
from hwnas.hwprofiles.profile import CostPoint, load_profile, profile_from_dict, shipped_profiles, write_profile
from hwnas.kernels.block_sparse import BlockSparseLinear
from hwnas.kernels.class_attention import _scaled_identity
from hwnas.pruning.tokens import apply_token_keep

SEARCH = [sys.executable, "-m", "hwnas"]


def spec(**overrides) -> dict:
    base = {"name": "toy", "device": "toy device", "kind": "cuda", "source": "spec",
            "peak_tflops": {"float32": 1.0, "float16": 2.0}, "memory_bandwidth_gbs": 100.0,
            "launch_overhead_us": 5.0, "power_w": {"tdp": 200.0}, "gemm_efficiency": 0.5,
            "block_sparse_efficiency": 0.8}
    return {**base, **overrides}


def test_shipped_profiles_are_marked_spec():
    assert set(shipped_profiles()) >= {"h100", "h200", "a100", "cpu"}
    h100 = load_profile("h100")
    assert h100.source == "spec" and h100.kind == "cuda" and h100.device == "NVIDIA H100 80GB HBM3"
    assert h100.peak_tflops["float16"] > h100.peak_tflops["float32"] and h100.power_w["tdp"] == 700
    with pytest.raises(HwnasError, match="unknown hardware profile 'h900'.*shipped: a100, cpu, h100, h200"):
        load_profile("h900")


def test_trace_counts_the_flops_and_bytes_of_each_operator():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU())
    ops = trace_ops(model, torch.zeros(10, 64))
    assert [op.name for op in ops] == ["addmm", "gelu"]
    assert ops[0].flops == 2 * 10 * 64 * 128
    assert ops[0].bytes == 4 * (128 + 10 * 64 + 64 * 128 + 10 * 128)  # bias, input, weight, output
    assert ops[1].flops == 0 and ops[1].bytes == 4 * 2 * 10 * 128


def test_roofline_prediction_of_a_linear_layer_by_hand():
    profile = profile_from_dict(spec())
    model = nn.Linear(1024, 1024)
    x = torch.zeros(512, 1024)
    predicted = Predictor(profile, "float16").predict(model, x)
    flops = 2 * 512 * 1024 * 1024
    moved = 2 * (1024 + 512 * 1024 + 1024 * 1024 + 512 * 1024)  # fp16 bytes
    seconds = 5e-6 + max(flops / (2e12 * 0.5), moved / 100e9)
    assert predicted["latency_ms_predicted"] == pytest.approx(seconds * 1e3)
    assert predicted["energy_mj_predicted"] == pytest.approx(seconds * 200 * 1e3 / 512)  # TDP × time, per image


def test_a_gemm_below_the_saturation_size_reaches_less_of_peak():
    profile = profile_from_dict(spec(gemm_saturation_gflop=1.0, gemm_saturation_exponent=0.5, launch_overhead_us=0.0,
                                     memory_bandwidth_gbs=1e9))
    assert profile.gemm_fraction(4e9) == profile.gemm_fraction(1e9) == 0.5
    assert profile.gemm_fraction(0.25e9) == pytest.approx(0.5 * 0.25 ** 0.5)
    predictor = Predictor(profile, "float32")
    small, large = nn.Linear(256, 256), nn.Linear(1024, 1024)
    x_small, x_large = torch.zeros(1024, 256), torch.zeros(1024, 1024)  # 0.134 and 2.15 GFLOP
    small_ms = predictor.predict(small, x_small)["latency_ms_predicted"]
    large_ms = predictor.predict(large, x_large)["latency_ms_predicted"]
    small_flops = 2 * 1024 * 256 * 256
    assert small_ms == pytest.approx(small_flops / (1e12 * 0.5 * (small_flops / 1e9) ** 0.5) * 1e3)
    assert large_ms == pytest.approx(2 * 1024 * 1024 * 1024 / (1e12 * 0.5) * 1e3)
    # 16x the FLOPs in about 5.9x the time: the small GEMM reaches 0.37 of the large one's rate
    assert large_ms / small_ms == pytest.approx(16 * (small_flops / 1e9) ** 0.5)


def test_predicted_power_idles_through_launch_overheads_and_is_at_tdp_in_the_kernels():
    model = nn.Linear(1024, 1024)
    x = torch.zeros(512, 1024)
    with_idle = Predictor(profile_from_dict(spec(power_w={"idle": 50.0, "tdp": 200.0})), "float16")
    seconds = with_idle.predict(model, x)["latency_ms_predicted"] / 1e3
    busy = 1 - 5e-6 / seconds  # one operator: its 5 µs launch at idle, the rest at TDP
    assert with_idle.predict(model, x)["energy_mj_predicted"] == pytest.approx(
        seconds * (50 + 150 * busy) * 1e3 / 512)
    assert with_idle.mean_power_w(10e-6, 2) == pytest.approx(50.0)  # nothing but launches: idle
    active = Predictor(profile_from_dict(spec(power_w={"idle": 50.0, "tdp": 200.0, "active": 120.0})), "float16")
    assert active.mean_power_w(seconds, 1) == 120.0  # a measured mean power is taken as it is
    assert Predictor(profile_from_dict(spec(power_w={})), "float16").predict(model, x).keys() == {"latency_ms_predicted"}


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_block_sparse_layers_cost_their_kept_blocks_or_the_faster_dense_path(kind):
    linear = nn.Linear(512, 512)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :4] = True  # 25% of the blocks kept
    sparse = BlockSparseLinear.from_linear(linear, mask, 32)
    x = torch.zeros(4096, 512)
    fast_sparse = Predictor(profile_from_dict(spec(kind=kind, launch_overhead_us=0.0, memory_bandwidth_gbs=1e6)), "float32")
    assert fast_sparse.predict(sparse, x)["latency_ms_predicted"] == pytest.approx(
        fast_sparse.predict(linear, x)["latency_ms_predicted"] * 0.25 / 0.8, rel=1e-6)
    slow_sparse = Predictor(profile_from_dict(spec(kind=kind, launch_overhead_us=0.0, memory_bandwidth_gbs=1e6,
                                                   block_sparse_efficiency=0.1)), "float32")
    assert slow_sparse.predict(sparse, x)["latency_ms_predicted"] == pytest.approx(
        slow_sparse.predict(linear, x)["latency_ms_predicted"])  # the layer calibrates onto dense


@pytest.fixture(scope="module")
def ucc_vit() -> nn.Module:
    """A 16-patch ViT whose UCC cut at block 1 runs every token kernel (gather, fused scatter-add, mixed ranking,
    class attention) and the spectral projection."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=4).eval()
    return apply_token_keep(model, {1: 0.5}, "ucc")


KERNELS = {"gather_rows", "scatter_add_rows_", "mixed_descending_order", "class_attention"}


def test_a_gpu_trace_counts_each_token_kernel_as_one_launch(ucc_vit):
    x = torch.zeros(2, 3, 32, 32)
    on_gpu = [op.name for op in trace_ops(ucc_vit, x, one_launch_kernels=True)]
    on_cpu = [op.name for op in trace_ops(ucc_vit, x)]
    assert KERNELS <= set(on_gpu) and not KERNELS & set(on_cpu)
    # the CPU path's index checks and copies run inside them: on the GPU they are one Triton launch
    assert {"index_select", "index_add_", "aminmax"} <= set(on_cpu)
    assert not {"index_select", "index_add_", "aminmax"} & set(on_gpu)
    assert on_gpu.count("gather_rows") == 2 and len(on_gpu) < len(on_cpu)
    cuda, cpu = (Predictor(profile_from_dict(spec(kind=kind)), "float32") for kind in ("cuda", "cpu"))
    assert cuda.predict(ucc_vit, x)["latency_ms_predicted"] < cpu.predict(ucc_vit, x)["latency_ms_predicted"]


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_a_prediction_does_not_price_work_done_once_and_cached(ucc_vit, kind):
    """The CPU class attention's scaled identity is built on the first call only."""
    predictor = Predictor(profile_from_dict(spec(kind=kind)), "float32")
    x = torch.zeros(2, 3, 32, 32)
    _scaled_identity.cache_clear()
    first = predictor.predict(ucc_vit, x)
    assert _scaled_identity.cache_info().currsize == 1  # built inside the trace
    assert predictor.predict(ucc_vit, x) == first


class SelfAttention(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


def test_measured_tables_are_interpolated_and_pick_the_operator_kind():
    profile = profile_from_dict(spec(tables={"float32": {
        "gemm": [{"size": 1e6, "rate": 1e9}, {"size": 1e8, "rate": 1e11}],
        "attention": [{"size": 1e6, "rate": 1e8}],
        "activation": [{"size": 1e3, "rate": 1e8}],
        "elementwise": [{"size": 1e3, "rate": 1e9}, {"size": 1e5, "rate": 1e10}]}}))
    predictor = Predictor(profile, "float32")
    assert predictor.rate("gemm", 1e7) == pytest.approx(1e10)  # log-log midpoint
    assert predictor.rate("gemm", 1e12) == pytest.approx(1e11)  # flat beyond the table
    assert predictor.rate("elementwise", 1e4) == pytest.approx(10 ** 9.5)
    assert Predictor(profile, "float16").rate("gemm", 1e7) == pytest.approx(2e12 * 0.5)  # no fp16 table: spec
    assert isinstance(profile.tables["float32"]["gemm"][0], CostPoint)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
    ops = trace_ops(model, torch.zeros(4, 8))
    assert [op_table(op) for op in ops] == ["activation", "gemm", "activation"]
    attention = trace_ops(SelfAttention(), torch.zeros(1, 2, 5, 8))
    assert [op_table(op) for op in attention] == ["attention"]


def test_measured_profile_round_trips_through_yaml(tmp_path):
    profile = measure_profile("cpu", "here", quick=True)
    assert profile.source == "measured" and profile.device.startswith("cpu: ") and profile.threads
    assert set(profile.tables["float32"]) == {"gemm", "attention", "activation", "elementwise"}
    assert profile.launch_overhead_us > 0
    assert 0 < profile.block_sparse_efficiency
    again = load_profile(write_profile(profile, tmp_path / "here.yaml"))
    assert again == profile


def test_profile_then_compare_prints_both_columns(tmp_path):
    """`search profile` here, then a comparison with the H100 spec: measured and predicted side by side."""
    profile = tmp_path / "cpu.yaml"
    done = subprocess.run([*SEARCH, "profile", "-o", str(profile), "--quick"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "compare"
    done = subprocess.run([*SEARCH, "compare", "--hwprofile", str(profile), "--hwprofile", "h100", "--trials", "4",
                           "--workers", "0", "--out", str(out), "--no-progress"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if "cpu-measured" in line and "h100" in line)
    assert header.index("cpu-measured") < header.index("h100")
    # the measured front's size is up to this machine's timings (dense can dominate 4 trials): the error over it
    # is reported exactly when it has points, the error over all 4 trials always
    measured_front = json.loads((out / "cpu-measured" / "pareto.json").read_text())["points"]
    assert ("predicted vs measured latency (front)" in done.stdout) == bool(measured_front)
    assert "predicted vs measured latency (all trials)" in done.stdout
    data = json.loads((out / "compare.json").read_text())
    here, h100 = data["profiles"]
    assert here["measured"] and not h100["measured"]
    assert (here["prediction_error"] or {"n": 0})["n"] == len(measured_front) and h100["prediction_error"] is None
    assert here["prediction_error_all_trials"]["n"] == 4
    assert h100["prediction_error_all_trials"] is None
    h100_front = json.loads((out / "h100" / "pareto.json").read_text())
    assert "predicted" in h100_front["device"] and "NVIDIA H100" in h100_front["device"]
    assert all("latency_ms" not in p["metrics"] and p["metrics"]["latency_ms_predicted"] > 0
               for p in h100_front["points"])
    assert (out / "compare.png").exists() and "chosen configuration per variable" in (out / "compare.md").read_text()


def test_energy_above_idle_is_reported_beside_the_total():
    def read() -> float:  # a counter that gains 100 W: 100 J per second of wall time, in mJ
        return time.perf_counter() * 100.0 * 1e3

    energy = measure_energy(lambda: time.sleep(0.01), "cpu", min_seconds=0.2, idle_w=40.0, counter=(read, "fake"))
    assert energy.source == "fake" and energy.calls >= 10
    per_call_s = energy.seconds / energy.calls
    assert energy.mj_per_call == pytest.approx(100.0 * per_call_s * 1e3, rel=0.05)
    assert energy.above_idle_mj_per_call == pytest.approx(60.0 * per_call_s * 1e3, rel=0.05)
    assert measure_energy(lambda: None, "cpu", min_seconds=0.05, counter=(read, "fake")).above_idle_mj_per_call is None


def test_side_by_side_timing_runs_each_callable_once_per_round_in_shuffled_order():
    calls: list[str] = []
    timings = measure_side_by_side({name: functools.partial(calls.append, name) for name in "abc"}, warmup=1, rounds=6)
    assert sorted(timings) == list("abc") and all(t.repeats == 6 for t in timings.values())
    assert calls[:3] == list("abc")  # one warm-up call each
    rounds = [calls[i:i + 3] for i in range(3, len(calls), 3)]
    assert len(rounds) == 6 and all(sorted(r) == list("abc") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes from round to round
    assert all(len(t.samples_ms) == 6 and "samples_ms" in t.as_dict() for t in timings.values())


def test_paired_ratio_compares_side_by_side_samples_round_by_round():
    slow_then_fast = [10.0, 20.0, 40.0, 20.0, 10.0]  # the machine's speed drifts 4x
    half = [5.0, 10.0, 20.0, 10.0, 5.0]
    ratio = paired_ratio(slow_then_fast, half)
    assert (ratio.median, ratio.q1, ratio.q3) == (2.0, 2.0, 2.0)  # the drift cancels round by round
    ratio = paired_ratio([2.0, 3.0, 4.0, 6.0, 8.0], [1.0] * 5)
    assert (ratio.q1, ratio.median, ratio.q3) == (3.0, 4.0, 6.0) and str(ratio) == "4.00x (3.00-6.00)"
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0, 2.0], [1.0])


def test_idle_power_is_read_from_the_energy_counter():
    def read() -> float:  # a counter that gains 37 W, in mJ
        return time.perf_counter() * 37.0 * 1e3

    assert idle_power_w("cpu", seconds=0.1, counter=(read, "fake")) == pytest.approx(37.0, rel=0.02)
