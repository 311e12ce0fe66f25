"""Hardware profiles: what a device can do, from a datasheet (``source: spec``) or measured here.

A profile is a YAML file. Every profile names its ``device`` (as ``device_name`` reports it), its
``kind`` (cpu or cuda), peak compute per dtype (TFLOP/s), memory bandwidth (GB/s), the fixed
cost of one operator (µs), power (W: ``tdp``, and ``idle`` where known), and how much of peak a
GEMM and a block-sparse kernel reach. A GEMM too small to fill the device reaches less: below
``gemm_saturation_gflop``, ``gemm_efficiency × (GFLOP / gemm_saturation_gflop) ** exponent``
(``gemm_fraction``; at 0 every GEMM reaches ``gemm_efficiency``). A measured profile
(``search profile``) adds cost tables per dtype (``TABLES``): the throughput reached by linear
layers (the roofline points) and by attention, by FLOPs; by transcendental activations and
norms, and by plain element-wise operators, by bytes moved. The predictor interpolates them.

Shipped profiles (``h100``, ``h200``, ``a100``, ``cpu``) come from public specifications and
say so (the GPU profiles' GEMM curve is fitted to H100 measurements: ``benchmarks/profile_check.py``);
a prediction from them is labelled predicted and never presented as a measurement.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from hwnas.errors import HwnasError

KINDS = ("cpu", "cuda")
SOURCES = ("spec", "measured")


@dataclass
class CostPoint:
    """One measured point of a cost table: a problem size and the throughput reached there."""

    size: float  # FLOPs (GEMM table) or bytes moved (element-wise table)
    rate: float  # FLOP/s or bytes/s


#: cost tables a measured profile holds per dtype: what the size of a point counts
TABLES = {"gemm": "FLOPs", "attention": "FLOPs", "activation": "bytes", "elementwise": "bytes"}


@dataclass
class HardwareProfile:
    name: str
    device: str
    kind: str
    source: str
    peak_tflops: dict[str, float]
    memory_bandwidth_gbs: float
    launch_overhead_us: float
    power_w: dict[str, float] = field(default_factory=dict)
    gemm_efficiency: float = 0.7
    gemm_saturation_gflop: float = 0.0
    gemm_saturation_exponent: float = 0.5
    block_sparse_efficiency: float = 1.0
    threads: int | None = None  # CPU threads the measurements used
    tables: dict[str, dict[str, list[CostPoint]]] = field(default_factory=dict)  # dtype -> table -> points

    def as_dict(self) -> dict:
        data = asdict(self)
        return {k: v for k, v in data.items() if v not in (None, {}, [])}

    def gemm_fraction(self, flops: float) -> float:
        """The fraction of peak a GEMM (or attention) of ``flops`` reaches, where no cost table says."""
        saturation = self.gemm_saturation_gflop * 1e9
        if flops >= saturation:
            return self.gemm_efficiency
        return self.gemm_efficiency * (max(flops, 1.0) / saturation) ** self.gemm_saturation_exponent

    def describe(self) -> str:
        return f"{self.name} ({self.device}, {self.source})"


def is_this_machine(profile: HardwareProfile, device: str) -> bool:
    """Whether ``device`` here is the profile's device (so it can be measured, not only predicted)."""
    from hwnas.hwprofiles.latency import device_name

    try:
        return device_name(device) == profile.device
    except (RuntimeError, AssertionError):  # an unknown or absent device
        return False


def shipped_profiles() -> list[str]:
    files = importlib.resources.files("hwnas.hwprofiles") / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in files.iterdir() if p.name.endswith(".yaml"))


def load_profile(spec: str | Path) -> HardwareProfile:
    """A shipped profile by name (``h100``) or a profile YAML file; one clear error otherwise."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise HwnasError(f"hardware profile {spec} not found")
        text, origin = path.read_text(), str(path)
    elif str(spec) in shipped_profiles():
        text = (importlib.resources.files("hwnas.hwprofiles") / "profiles" / f"{spec}.yaml").read_text()
        origin = f"shipped profile {spec}"
    else:
        raise HwnasError(f"unknown hardware profile '{spec}' (shipped: {', '.join(shipped_profiles())}; "
                         "or a YAML file from `search profile -o FILE`)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HwnasError(f"{origin} is not valid YAML: {' '.join(str(exc).split())}") from None
    return profile_from_dict(data, origin)


def profile_from_dict(data: object, origin: str = "<mapping>") -> HardwareProfile:
    if not isinstance(data, dict):
        raise HwnasError(f"{origin}: a hardware profile is a mapping (name, device, kind, peak_tflops, ...)")
    try:
        tables = {dtype: {table: [CostPoint(**p) for p in points] for table, points in by_table.items()}
                  for dtype, by_table in (data.get("tables") or {}).items()}
        profile = HardwareProfile(**{k: v for k, v in data.items() if k != "tables"}, tables=tables)
    except (TypeError, AttributeError) as exc:
        raise HwnasError(f"{origin}: {exc}".replace("HardwareProfile.__init__() ", "")) from None
    unknown = {t for by_table in profile.tables.values() for t in by_table} - set(TABLES)
    if unknown:
        raise HwnasError(f"{origin}: unknown cost table(s) {', '.join(sorted(unknown))} (known: {', '.join(TABLES)})")
    if profile.kind not in KINDS:
        raise HwnasError(f"{origin}: kind must be one of {', '.join(KINDS)}, not {profile.kind!r}")
    if profile.source not in SOURCES:
        raise HwnasError(f"{origin}: source must be one of {', '.join(SOURCES)}, not {profile.source!r}")
    if not profile.peak_tflops or profile.memory_bandwidth_gbs <= 0:
        raise HwnasError(f"{origin}: peak_tflops and a positive memory_bandwidth_gbs are required")
    if not 0 < profile.gemm_efficiency <= 1 or profile.gemm_saturation_gflop < 0 \
            or not 0 <= profile.gemm_saturation_exponent <= 1:
        raise HwnasError(f"{origin}: gemm_efficiency must be in (0, 1], gemm_saturation_gflop at least 0 and "
                         "gemm_saturation_exponent in [0, 1]")
    return profile


def write_profile(profile: HardwareProfile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# hwnas hardware profile of {profile.device}, {profile.source} (search profile)\n"
    path.write_text(header + yaml.safe_dump(profile.as_dict(), sort_keys=False))
    return path
