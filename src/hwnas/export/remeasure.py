"""``search eval OUT``: measure an exported model again, beside what its study recorded."""

from __future__ import annotations

from hwnas.evaluators.evaluator import Evaluator
from hwnas.export.exporter import load, read_manifest
from hwnas.spaces import space_from_dict


def remeasure(path: str, data: str | None = None, labels: str = "none", device: str = "cpu",
              energy: bool = False, threads: int | None = None, versus_dense: bool = True
              ) -> tuple[dict, dict, dict]:
    """(recorded metrics, measured metrics, measurement info) of the export at ``path``.

    ``data`` is ``None``/``"default"`` for the space's own data, or an ImageFolder directory.
    ``threads`` defaults, on the CPU, to the thread count the study measured with (a worker of
    ``--workers N`` had its share of the cores), so the two columns compare. With ``versus_dense``
    the export is timed side by side with the dense model it was pruned from, which adds
    ``latency_ms_vs_dense``: on a machine whose speed drifts, the ratio holds where milliseconds do not.
    """
    manifest = read_manifest(path)
    model = load(path)
    source = dict(manifest["space"])
    if data and data != "default":
        source["data"] = {"imagefolder": data, "labels": labels}
    recorded = manifest.get("hardware", {})
    if threads is None and device == "cpu" and str(recorded.get("device", "")).startswith("cpu"):
        threads = recorded.get("threads")
    measure = dict(source.get("measure") or {})
    if threads:
        measure["threads"] = int(threads)
    source["measure"] = {**measure, "versus_dense": versus_dense}
    evaluator = Evaluator(space_from_dict(source, origin=f"{path}/hwnas.json"), device=device, energy=energy)
    return manifest.get("metrics", {}), evaluator.measure_model(model), evaluator.info()
