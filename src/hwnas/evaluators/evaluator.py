"""Candidate -> metrics. An Evaluator loads the model and data once, then measures configurations."""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch

from hwnas.errors import HwnasError
from hwnas.evaluators.data import load_eval_data
from hwnas.evaluators.metrics import accuracy, count_flops, count_params, fidelity_kl, predict_logits
from hwnas.hwprofiles.allocator import allocator_setting
from hwnas.hwprofiles.energy import measure_energy
from hwnas.hwprofiles.latency import cuda_graph_replay, device_name, measure, measure_side_by_side, paired_ratio
from hwnas.hwprofiles.predictor import predictor_for
from hwnas.hwprofiles.profile import is_this_machine
from hwnas.models.registry import load_model
from hwnas.pruning.apply import apply_config
from hwnas.pruning.block_layers import calibrate_block_sparse
from hwnas.pruning.block_pruner import BlockPruner
from hwnas.spaces import Config, Space

DEFAULT_MEASURE = {"batch_size": 64, "warmup": 3, "repeats": 15, "threads": None, "dtype": "float32",
                   "versus_dense": False, "cuda_graph": True}


class Evaluator:
    """Measures configurations of one space on one device.

    ``evaluate(config)`` returns the metrics of DESIGN.md: ``accuracy`` (when the data has
    labels), ``fidelity_kl``, ``latency_ms`` (median, with ``latency_ms_min``/``_max``),
    ``flops``, ``params`` and, where a hardware counter exists, ``energy_mj`` (and, when a profile
    measured on this machine knows its idle power, ``energy_mj_above_idle``). With the measure setting
    ``versus_dense`` each candidate is timed side by side with the dense model (interleaved
    rounds) and ``latency_ms_vs_dense`` is the median of the per-round ratios, which a machine
    whose speed drifts between trials does not move. On CUDA a candidate is captured once into a
    CUDA graph and the graph's replay is timed and metered (DESIGN's protocol: the GPU's time, not
    Python's launch overhead; a candidate's shapes are static); ``cuda_graph: false`` times eagerly.

    With a hardware profile (a mapping, see ``hwprofiles.profile``) it also predicts
    ``latency_ms_predicted``/``energy_mj_predicted`` on that hardware; when the profile is not this
    machine, latency and energy are predicted only (nothing here could measure them).
    """

    def __init__(self, space: Space, device: str = "cpu", energy: bool = False, progress: bool = False,
                 hwprofile: dict | None = None):
        self.space = space
        self.settings = {**DEFAULT_MEASURE, **space.measure}
        self.device = resolve_device(device)
        if self.settings["threads"]:
            torch.set_num_threads(int(self.settings["threads"]))
        self.dtype = getattr(torch, self.settings["dtype"])
        self.energy = energy
        self.model = load_model(space.model, progress=progress)
        self.data = load_eval_data(space.data, space.model, self.model)
        self.dense_calib_logits = predict_logits(self.model, self.data.calib_x)
        self.latency_input = _batch_of(self.data.test_x, int(self.settings["batch_size"]))
        self.pruner = BlockPruner(self.model, self.data.calib_x, progress=progress)
        self.predictor = predictor_for(hwprofile, self.settings["dtype"]) if hwprofile else None
        self.profile = self.predictor.profile if self.predictor else None
        self.measures_here = self.profile is None or is_this_machine(self.profile, str(self.device))
        self._dense: Callable[[], object] | None = None  # the timing reference of versus_dense, made on first use

    def info(self) -> dict:
        """Where and how measurements are taken (and, with a profile, what is predicted for which device)."""
        info = {"device": device_name(self.device), "batch_size": int(self.settings["batch_size"]),
                "dtype": self.settings["dtype"], "threads": torch.get_num_threads(),
                "allocator": allocator_setting()}
        if self.device.type == "cuda":
            info["timing"] = "cuda graph replay" if self.settings["cuda_graph"] else "eager"
        if self.profile is not None:
            info["hwprofile"] = {"name": self.profile.name, "device": self.profile.device,
                                 "source": self.profile.source, "dtype": self.predictor.dtype}
            if not self.measures_here:
                info["device"] = f"{self.profile.device} (predicted, {self.profile.source} profile)"
                info["dtype"] = self.predictor.dtype
        return info

    def evaluate(self, config: Config) -> dict[str, float]:
        """All metrics of one configuration (the pool turns a non-finite one into a failed trial)."""
        model = apply_config(self.model, self.space, config, self.pruner)
        return self.measure_model(model)

    def measure_model(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of an already transformed model (also used to re-measure exports)."""
        metrics = self.quality(model)
        if self.predictor is not None:
            metrics.update(self.predictor.predict(model, self.latency_input))
        if not self.measures_here:
            return metrics

        call = self.timed_call(model)
        warmup, repeats = int(self.settings["warmup"]), int(self.settings["repeats"])
        if self.settings["versus_dense"]:
            timings = measure_side_by_side({"candidate": call, "dense": self._dense_call()}, self.device, warmup,
                                           repeats)
            timing = timings["candidate"]
            metrics["latency_ms_vs_dense"] = paired_ratio(timing.samples_ms, timings["dense"].samples_ms).median
        else:
            timing = measure(call, self.device, warmup, repeats)
        metrics.update(latency_ms=timing.median_ms, latency_ms_min=timing.min_ms, latency_ms_max=timing.max_ms)
        if self.energy:
            measured_here = self.profile is not None and self.profile.source == "measured"  # not a spec's figure
            idle_w = self.profile.power_w.get("idle") if measured_here else None
            energy = measure_energy(call, self.device, idle_w=idle_w)
            if energy is None:
                raise HwnasError(f"no energy counter on {device_name(self.device)} (NVML, or RAPL under "
                                 "/sys/class/powercap): drop the energy objective/budget, or predict energy for a "
                                 "profiled device with --hwprofile")
            images = len(self.latency_input)
            metrics["energy_mj"] = energy.mj_per_call / images  # per image
            if energy.above_idle_mj_per_call is not None:
                metrics["energy_mj_above_idle"] = energy.above_idle_mj_per_call / images
        return metrics

    def quality(self, model: torch.nn.Module) -> dict[str, float]:
        """What does not depend on the device: fidelity, accuracy (with labels), FLOPs and parameters (fp32)."""
        model = model.to(torch.float32).eval()
        logits = predict_logits(model, self.data.calib_x)
        metrics = {"fidelity_kl": fidelity_kl(self.dense_calib_logits, logits)}
        if self.data.test_y is not None:
            metrics["accuracy"] = accuracy(predict_logits(model, self.data.test_x), self.data.test_y)
        metrics["flops"] = count_flops(model, self.data.input_shape)
        metrics["params"] = count_params(model)
        return metrics

    def timed_call(self, model: torch.nn.Module) -> Callable[[], object]:
        """One inference of the latency batch by ``model``, moved (in place) to the measuring device and dtype.

        Each block-sparse layer first picks its fastest path on that batch, as a deployed model does.
        On CUDA (unless ``cuda_graph: false``) the call is the replay of a CUDA graph captured from it.
        """
        model = model.to(self.device, self.dtype).eval()
        x = self.latency_input.to(self.device, self.dtype)
        calibrate_block_sparse(model, x)
        call = functools.partial(model, x)
        if self.device.type != "cuda" or not self.settings["cuda_graph"]:
            return call
        try:
            return cuda_graph_replay(call, self.device)
        except RuntimeError as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise HwnasError(f"{type(model).__name__} cannot be captured in a CUDA graph ({reason}); "
                             "set measure.cuda_graph: false in the space to time it eagerly") from None

    def _dense_call(self) -> Callable[[], object]:
        """The unpruned model's ``timed_call`` (on a copy, made once): the reference of ``versus_dense``."""
        if self._dense is None:
            self._dense = self.timed_call(copy.deepcopy(self.model))
        return self._dense


def resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise HwnasError(f"unknown device '{device}' (use cpu or cuda[:i])") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HwnasError(f"device '{device}' requested but CUDA is not available on this machine")
    if resolved.type not in ("cpu", "cuda"):
        raise HwnasError(f"unsupported device '{device}' (use cpu or cuda[:i])")
    return resolved


def _batch_of(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A latency batch of exactly ``batch_size`` real images (repeating them if there are fewer)."""
    repeats = -(-batch_size // len(x))
    return x.repeat(repeats, *[1] * (x.dim() - 1))[:batch_size].contiguous()
