"""Where evaluations run: Ray actors (the default) or the driver's own process (``--workers 0``).

Each Ray worker is an actor that builds its Evaluator once (model, data, dense logits) and
keeps it warm between candidates. A batch of configurations is spread over the actors and the
outcomes come back as they finish, so the driver records each one immediately.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from hwnas.evaluators.evaluator import Evaluator
from hwnas.spaces import Config, space_from_dict


@dataclass
class Outcome:
    """The result of one evaluation: metrics, or the error that stopped it."""

    index: int
    metrics: dict[str, float] | None = None
    error: str | None = None


class LocalPool:
    """Evaluates in this process, one candidate at a time (debugging, tests)."""

    def __init__(self, space_source: dict, device: str = "cpu", energy: bool = False):
        self.evaluator = Evaluator(space_from_dict(space_source), device=device, energy=energy, progress=True)
        self.workers = 1

    def info(self) -> dict:
        return self.evaluator.info()

    def evaluate(self, configs: list[Config]) -> Iterator[Outcome]:
        for i, config in enumerate(configs):
            try:
                yield Outcome(i, metrics=self.evaluator.evaluate(config))
            except Exception as exc:  # a failed candidate is recorded, not fatal
                yield Outcome(i, error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        pass


class RayPool:
    """Evaluates on ``workers`` Ray actors, each pinned to its share of the CPU threads (or one GPU)."""

    def __init__(self, space_source: dict, workers: int = 1, device: str = "cpu", address: str | None = None,
                 energy: bool = False):
        import ray

        self._ray = ray
        if not ray.is_initialized():
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **({} if address else {"num_cpus": os.cpu_count()}))
        threads = max(1, (os.cpu_count() or 1) // workers)
        gpus = 1 if device.startswith("cuda") else 0
        actor = ray.remote(num_cpus=threads, num_gpus=gpus)(_EvaluatorActor)
        self.actors = [actor.remote(space_source, device, threads, energy) for _ in range(workers)]
        self.workers = workers
        # fail early (bad model, data, device) with the actor's own message
        self._info = ray.get(self.actors[0].info.remote())

    def info(self) -> dict:
        return self._info

    def evaluate(self, configs: list[Config]) -> Iterator[Outcome]:
        ray = self._ray
        pending = {}
        queue = list(enumerate(configs))
        idle = list(self.actors)
        while queue or pending:
            while queue and idle:
                index, config = queue.pop(0)
                actor = idle.pop()
                pending[actor.evaluate.remote(config)] = (index, actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            index, actor = pending.pop(done[0])
            idle.append(actor)
            try:
                yield Outcome(index, metrics=ray.get(done[0]))
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                yield Outcome(index, error=f"{type(cause).__name__}: {cause}")
            except ray.exceptions.RayError as exc:  # actor died
                yield Outcome(index, error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self._ray.shutdown()


class _EvaluatorActor:
    def __init__(self, space_source: dict, device: str, threads: int, energy: bool):
        import torch

        torch.set_num_threads(threads)
        self.evaluator = Evaluator(space_from_dict(space_source), device=device, energy=energy)

    def info(self) -> dict:
        return self.evaluator.info()

    def evaluate(self, config: Config) -> dict[str, float]:
        return self.evaluator.evaluate(config)


def make_pool(space_source: dict, workers: int, device: str, address: str | None, energy: bool):
    """``workers == 0`` evaluates in-process; otherwise on Ray (local, or the cluster at ``address``)."""
    if workers == 0:
        return LocalPool(space_source, device, energy)
    return RayPool(space_source, workers, device, address, energy)
