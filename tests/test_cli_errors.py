"""Bad input on the command line: one clear line on stderr, a non-zero exit, never a traceback."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hwnas.cli import main
from hwnas.hwprofiles.energy import energy_counter

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
NO_RAPL = pytest.mark.skipif(energy_counter("cpu") is not None, reason="needs a CPU without a readable RAPL counter")


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(err: str, expected: str):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines and expected in lines[-1], err
    assert lines[-1].startswith("search: error:"), err


@pytest.mark.parametrize("argv, expected", [
    (["run", "missing.yaml", "--out", "{tmp}/a"], "neither a YAML file nor a preset"),
    (["run", "--budget", "latency=fast", "--out", "{tmp}/a"], "malformed budget 'latency=fast'"),
    (["run", "--budget", "speed=1ms", "--out", "{tmp}/a"], "unknown budget 'speed'"),
    (["run", "--optimizer", "annealing", "--out", "{tmp}/a"], "unknown optimizer 'annealing'"),
    (["run", "--objectives", "accuracy,beauty", "--out", "{tmp}/a"], "unknown objective 'beauty'"),
    (["run", "--device", "tpu", "--out", "{tmp}/a"], "unknown device 'tpu'"),
    pytest.param(["run", "--device", "cuda", "--out", "{tmp}/a"], "CUDA is not available", marks=NO_CUDA),
    (["eval", "{tmp}", "--threads", "0"], "--threads must be at least 1"),
    (["run", "--workers", "999", "--out", "{tmp}/a"], "--workers 999: this machine has"),
    (["profile", "-o", "{tmp}"], "it is a directory"),
    (["bench", "tokens", "--json", "/dev/null/t.json"], "cannot write /dev/null/t.json: /dev/null is not a directory"),
    (["run", "--resume", "{tmp}/nothing"], "is not a study directory"),
    (["show", "{tmp}"], "has no pareto.json"),
    (["export", "{tmp}", "-o", "{tmp}/out"], "is not a study directory"),
    (["eval", "{tmp}"], "is not an hwnas export"),
    (["run", "--hwprofile", "tpu-v9", "--out", "{tmp}/a"], "unknown hardware profile 'tpu-v9'"),
    (["run", "--hwprofile", "{tmp}/missing.yaml", "--out", "{tmp}/a"], "not found"),
    (["run", "--trial-timeout", "-1", "--out", "{tmp}/a"], "--trial-timeout and --retries must be 0 or more"),
    (["compare", "--hwprofile", "h100", "--out", "{tmp}/c"], "compare needs two or more --hwprofile"),
    (["compare", "--hwprofile", "h100", "--hwprofile", "h100", "--out", "{tmp}/c"], "share the name 'h100'"),
    (["profile", "--device", "tpu", "-o", "{tmp}/p.yaml"], "unknown device 'tpu'"),
    (["compare", "--hwprofile", "h100", "--hwprofile", "a100", "--optimizer", "lpvit", "--out", "{tmp}/c"],
     "compare profiles with nsga2"),
    (["run", "--hwprofile", "h100", "--optimizer", "lpvit", "--out", "{tmp}/a"], "with --hwprofile use nsga2"),
])
def test_bad_arguments(capsys, tmp_path, argv, expected):
    code, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert_one_line(err, expected)


@NO_RAPL
def test_energy_without_a_counter_fails_before_the_study_exists(capsys, tmp_path):
    """Failing at the baseline would leave a study whose fixed objectives can never be resumed."""
    code, err = run_cli(capsys, "run", "--objectives", "accuracy,energy", "--out", str(tmp_path / "a"))
    assert code == 2
    assert_one_line(err, "no energy counter on cpu")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("text, expected", [
    ("name: [oops", "not valid YAML"),
    ("name: x\nmodel: {name: not_a_model_at_all}\ndimensions:\n - {name: k, transform: token_keep, targets: [1], values: [0.5, 1.0]}",
     "unknown model 'not_a_model_at_all'"),
    ("name: x\nmodel: digits-deit\ndimensions:\n - {name: k, transform: tokenkeep, values: [1.0]}",
     "unknown transform 'tokenkeep'"),
    ("name: x\nmodel: digits-deit\ndimensions:\n - {name: k, transform: token_keep, targets: [0], values: [0.5, 1.0]}",
     "block 0 has no earlier attention"),
    ("name: x\nmodel: digits-deit\ndimensions:\n - {name: k, transform: token_keep, targets: [40], values: [0.5, 1.0]}",
     "not a block index"),

    ("name: x\nmodel: digits-deit\ndata: {imagefolder: /no/such/folder}\n"
     "dimensions:\n - {name: k, transform: token_keep, targets: [1], values: [0.5, 1.0]}",
     "image folder /no/such/folder does not exist"),
    ("name: x\nmodel: deit_tiny_patch16_224\n"
     "dimensions:\n - {name: k, transform: token_keep, targets: [1], values: [0.5, 1.0]}",
     "has no default data: give data: {imagefolder: DIR}"),
    ("name: x\nmodel: digits-deit\ndata: {path: /some/folder}\n"
     "dimensions:\n - {name: k, transform: token_keep, targets: [1], values: [0.5, 1.0]}",
     "data.path: unknown key (allowed: calib_fraction, imagefolder, labels, max_images, name)"),
    ("name: x\nmodel: {name: digits-deit, weights: w.safetensors}\n"
     "dimensions:\n - {name: k, transform: token_keep, targets: [1], values: [0.5, 1.0]}",
     "model.weights: unknown key (allowed: checkpoint, kwargs, name)"),
])
def test_bad_space_files(capsys, tmp_path, text, expected):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    code, err = run_cli(capsys, "run", str(space), "--out", str(tmp_path / "study"), "--workers", "0")
    assert code == 2
    assert_one_line(err, expected)
    assert not (tmp_path / "study").exists()  # nothing created for a bad request


@pytest.mark.parametrize("file, expected", [
    (None, "checkpoint {tmp}/w.safetensors does not exist"),
    ({"head.weight": torch.zeros(3, 3)}, "checkpoint {tmp}/w.safetensors does not match the model"),
])
def test_a_checkpoint_that_cannot_be_loaded_fails_before_the_study_exists(capsys, tmp_path, monkeypatch, file,
                                                                           expected):
    monkeypatch.chdir(tmp_path)  # the space names it relative to the working directory
    if file is not None:
        safetensors.torch.save_file(file, "w.safetensors")
    Path("space.yaml").write_text("name: x\nmodel: {name: digits-deit, checkpoint: w.safetensors}\n"
                                  "dimensions:\n - {name: k, transform: token_keep, targets: [1], values: [0.5, 1.0]}")
    code, err = run_cli(capsys, "run", "space.yaml", "--out", "study", "--workers", "0")
    assert code == 2
    assert_one_line(err, expected.format(tmp=tmp_path))
    assert not Path("study").exists()


UNLABELLED = ("name: x\nmodel: digits-deit\ndata: {{imagefolder: {tmp}, labels: none}}\n"
              "dimensions:\n - {{name: k, transform: token_keep, targets: [1], values: [0.5, 1.0]}}")


@pytest.mark.parametrize("argv", [["--objectives", "accuracy,latency"], ["--budget", "accuracy_drop=1%"]])
def test_accuracy_of_images_without_labels_fails_before_the_study_exists(capsys, tmp_path, argv):
    (tmp_path / "space.yaml").write_text(UNLABELLED.format(tmp=tmp_path))
    code, err = run_cli(capsys, "run", str(tmp_path / "space.yaml"), *argv, "--out", str(tmp_path / "study"))
    assert code == 2
    assert_one_line(err, "needs labelled data, and this space's images have none")
    assert not (tmp_path / "study").exists()


def test_images_without_labels_optimise_fidelity_by_default(capsys, tmp_path):
    from hwnas.cli import _default_objectives_for
    from hwnas.search.study import RunSettings
    from hwnas.spaces import load_space

    (tmp_path / "space.yaml").write_text(UNLABELLED.format(tmp=tmp_path))
    settings = RunSettings()
    _default_objectives_for(load_space(tmp_path / "space.yaml"), settings)
    assert settings.objectives == "fidelity,latency"
    assert "have no labels: optimising fidelity,latency" in capsys.readouterr().err


def test_a_space_timed_beside_dense_optimises_that_ratio_by_default():
    from hwnas.cli import _default_objectives_for
    from hwnas.search.study import RunSettings
    from hwnas.spaces import load_space, space_from_dict

    default = load_space()  # the digits have labels; each candidate is timed beside dense
    settings = RunSettings()
    _default_objectives_for(default, settings)
    assert settings.objectives == "accuracy,latency_vs_dense"
    alone = RunSettings()
    _default_objectives_for(space_from_dict({**default.source, "measure": {"versus_dense": False}}), alone)
    assert alone.objectives == "accuracy,latency"


@pytest.mark.parametrize("command", ["export", "finetune"])
def test_an_export_never_writes_over_other_files(capsys, tmp_path, command):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.safetensors").write_text("the user's own file")
    (tmp_path / "file").write_text("")
    for out, expected in ((tmp_path / "mine", "exists and is not an hwnas export"), (tmp_path / "file", "is a file")):
        code, err = run_cli(capsys, command, str(tmp_path / "study"), "-o", str(out))
        assert code == 2
        assert_one_line(err, expected)
    assert (tmp_path / "mine" / "model.safetensors").read_text() == "the user's own file"


def test_corrupted_export(capsys, tmp_path):
    (tmp_path / "hwnas.json").write_text("{not json")
    code, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2
    assert_one_line(err, "hwnas.json is damaged")
    (tmp_path / "hwnas.json").write_text(json.dumps({
        "format": "hwnas-export/1", "model": {"name": "digits-deit"}, "config": {"keep.1": 1.0},
        "space": {"name": "x", "model": {"name": "digits-deit"},
                  "dimensions": [{"name": "keep", "transform": "token_keep", "targets": [1], "values": [0.5, 1.0]}]}}))
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    code, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2
    assert_one_line(err, "model.safetensors is damaged")


@pytest.mark.parametrize("text, expected", [
    ("name: x\n  - : [", "is not valid YAML"),
    ("[1, 2]", "a hardware profile is a mapping"),
    ("name: x\ndevice: d\nkind: tpu\nsource: spec\npeak_tflops: {float32: 1}\nmemory_bandwidth_gbs: 1\n"
     "launch_overhead_us: 1\n", "kind must be one of cpu, cuda"),
    ("name: x\ndevice: d\nkind: cpu\nsource: spec\n", "missing 3 required positional arguments"),
    ("name: x\ndevice: d\nkind: cpu\nsource: spec\npeak_tflops: {float16: 1}\nmemory_bandwidth_gbs: 1\n"
     "launch_overhead_us: 1\n", "hardware profile x has no peak_tflops for float32"),
    ("name: x\ndevice: d\nkind: cpu\nsource: spec\npeak_tflops: {float32: 1}\nmemory_bandwidth_gbs: 1\n"
     "launch_overhead_us: 1\ngemm_saturation_exponent: 2\n", "gemm_saturation_exponent in [0, 1]"),
])
def test_bad_hardware_profile(capsys, tmp_path, text, expected):
    (tmp_path / "p.yaml").write_text(text)
    code, err = run_cli(capsys, "run", "--hwprofile", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "a"))
    assert code == 2
    assert_one_line(err, expected)


def test_a_path_that_cannot_be_read_is_bad_input(capsys, tmp_path):
    (tmp_path / "config.yaml").mkdir()
    (tmp_path / "study.db").touch()
    code, err = run_cli(capsys, "run", "--resume", str(tmp_path))
    assert code == 2
    assert_one_line(err, f"{tmp_path / 'config.yaml'}: Is a directory")
