"""Where evaluations run: Ray actors (the default) or the driver's own process (``--workers 0``).

Each Ray worker is an actor that builds its Evaluator once (model, data, dense logits, layer
databases) and keeps it warm between candidates. ``evaluate`` reads its configurations lazily,
one whenever a worker comes free, and yields the outcomes as they finish: the driver records each
one at once, and a generator of configurations can propose the next candidate knowing every
outcome before it, with no worker waiting for the slowest of a batch.

Faults do not end a study (``FaultPolicy``): a worker that crashes, runs out of memory or hangs
past the per-evaluation timeout is replaced by a fresh actor and its candidate is retried on
another worker, up to ``retries`` times, then reported failed with the reason. An evaluation
that raises, or returns a non-finite metric, fails at once (retrying would give the same).
Every configuration handed to ``evaluate`` yields exactly one Outcome.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from hwnas.errors import HwnasError
from hwnas.evaluators.evaluator import Evaluator
from hwnas.spaces import Config, space_from_dict

DEFAULT_TIMEOUT_S = 900.0
DEFAULT_RETRIES = 2


@dataclass
class Outcome:
    """The result of one evaluation: metrics, or the error that stopped it."""

    index: int
    metrics: dict[str, float] | None = None
    error: str | None = None


@dataclass(frozen=True)
class FaultPolicy:
    """How long one evaluation may run (None: no limit) and how often a lost one is retried."""

    timeout_s: float | None = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES


def checked_outcome(index: int, metrics: dict[str, float]) -> Outcome:
    """An Outcome of ``metrics``, or a failed one when any metric is NaN or infinite (never a Pareto point)."""
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        return Outcome(index, error=f"non-finite metric(s): {', '.join(f'{n}={metrics[n]}' for n in bad)}")
    return Outcome(index, metrics=metrics)


class LocalPool:
    """Evaluates in this process, one candidate at a time (debugging, tests): no retries, no timeout."""

    def __init__(self, space_source: dict, device: str = "cpu", energy: bool = False, hwprofile: dict | None = None):
        self.evaluator = Evaluator(space_from_dict(space_source), device=device, energy=energy, progress=True,
                                   hwprofile=hwprofile)
        self.workers = 1

    def info(self) -> dict:
        return self.evaluator.info()

    def evaluate(self, configs: Iterable[Config]) -> Iterator[Outcome]:
        for i, config in enumerate(configs):
            try:
                metrics = self.evaluator.evaluate(config)
            except Exception as exc:  # a failed candidate is recorded, not fatal
                yield Outcome(i, error=f"{type(exc).__name__}: {exc}")
            else:
                yield checked_outcome(i, metrics)

    def close(self) -> None:
        pass


@dataclass
class _Attempt:
    """One configuration on its way through the pool: how often it was lost, and on which workers."""

    index: int
    config: Config
    losses: list[str] = field(default_factory=list)
    avoid: set[int] = field(default_factory=set)  # worker slots it was lost on
    slot: int = -1
    deadline: float = math.inf


class RayPool:
    """Evaluates on ``workers`` Ray actors, each pinned to its share of the CPU threads (or one GPU)."""

    def __init__(self, space_source: dict, workers: int = 1, device: str = "cpu", address: str | None = None,
                 energy: bool = False, faults: FaultPolicy = FaultPolicy(), hwprofile: dict | None = None,
                 actor_class: type | None = None):
        import ray

        self._ray = ray
        if not ray.is_initialized():
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            _quiet_default_auth_notice()
            sigterm = signal.getsignal(signal.SIGTERM)
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **({} if address else {"num_cpus": os.cpu_count()}))
            if callable(sigterm):  # the caller's own answer to SIGTERM (the CLI's: stop as Ctrl-C does), not Ray's exit
                signal.signal(signal.SIGTERM, sigterm)
        threads = max(1, (os.cpu_count() or 1) // workers)
        gpus = 1 if device.startswith("cuda") else 0
        _check_capacity(ray, workers, threads, gpus)
        self._actor = ray.remote(num_cpus=threads, num_gpus=gpus)(actor_class or _EvaluatorActor)
        self._actor_args = (space_source, device, threads, energy, hwprofile)
        self.faults = faults
        self.workers = workers
        self.actors = [self._actor.remote(*self._actor_args) for _ in range(workers)]
        self.replaced = 0  # workers lost and replaced so far
        self._dead: set[int] = set()  # slots whose replacement failed to start
        self._dead_reason = ""
        # every worker ready (model, data, databases loaded), or fail early with the actor's own message
        try:
            self._info = ray.get([actor.info.remote() for actor in self.actors])[0]
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, HwnasError):  # bad input, told in its own line
                self.close()
                raise exc.cause from None
            raise

    def info(self) -> dict:
        return self._info

    def evaluate(self, configs: Iterable[Config]) -> Iterator[Outcome]:
        """One Outcome per configuration, as each finishes; ``configs`` is read one at a time, when a worker is free."""
        ray = self._ray
        fresh = (_Attempt(i, c) for i, c in enumerate(configs))
        queue: deque[_Attempt] = deque()  # attempts to start: lost ones to retry, then the next fresh one
        running: dict = {}  # object ref -> _Attempt (an evaluation) or int (a new worker's readiness)
        idle = set(range(len(self.actors))) - self._dead
        exhausted = False
        while True:
            started = self._dispatch(queue, idle)
            while idle and not exhausted:  # a worker still free: the next fresh configuration
                attempt = next(fresh, None)
                exhausted = attempt is None
                if attempt is not None:
                    queue.append(attempt)
                    started += self._dispatch(queue, idle)
            for attempt in started:
                running[self.actors[attempt.slot].evaluate.remote(attempt.config)] = attempt
            if exhausted and not queue and not any(isinstance(v, _Attempt) for v in running.values()):
                return
            if not running:  # every worker's replacement failed to start
                if not queue and not exhausted:  # say so on the next configuration, not silently
                    queue.extend(itertools.islice(fresh, 1))
                yield from self._fail_all(queue, f"no worker left: {self._dead_reason}")
                return
            deadline = min((a.deadline for a in running.values() if isinstance(a, _Attempt)), default=math.inf)
            wait_s = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            if not done:
                for ref in [r for r, a in running.items() if isinstance(a, _Attempt) and a.deadline <= time.monotonic()]:
                    attempt = running.pop(ref)
                    running[self._replace(attempt.slot)] = attempt.slot
                    yield from self._lost(attempt, f"timed out after {self.faults.timeout_s:g} s", queue)
                continue
            ref = done[0]
            entry = running.pop(ref)
            if isinstance(entry, int):  # a replacement worker finished starting (or failed to)
                try:
                    ray.get(ref)
                    idle.add(entry)
                except ray.exceptions.RayError as exc:
                    self._dead.add(entry)
                    self._dead_reason = f"a replacement worker failed to start: {exc}"
                continue
            try:
                metrics = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the evaluation raised; the worker is alive
                idle.add(entry.slot)
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                if _is_out_of_memory(cause):
                    yield from self._lost(entry, f"out of memory: {cause}", queue)
                else:
                    yield Outcome(entry.index, error=f"{type(cause).__name__}: {cause}")
            except ray.exceptions.RayError as exc:  # the worker died (crash, killed by Ray's memory monitor)
                running[self._replace(entry.slot)] = entry.slot
                yield from self._lost(entry, f"worker lost ({type(exc).__name__})", queue)
            else:
                idle.add(entry.slot)
                yield checked_outcome(entry.index, metrics)

    def _dispatch(self, queue: deque, idle: set[int]) -> list[_Attempt]:
        """Start queued attempts on idle workers, each on one it was not lost on when there is a choice."""
        started = []
        live = set(range(len(self.actors))) - self._dead
        for attempt in list(queue):
            if not idle:
                break
            fresh = sorted(idle - attempt.avoid)
            if not fresh and live - attempt.avoid:
                continue  # a worker it was not lost on will come free
            attempt.slot = (fresh or sorted(idle))[0]
            idle.discard(attempt.slot)
            timeout = self.faults.timeout_s
            attempt.deadline = time.monotonic() + timeout if timeout else math.inf
            queue.remove(attempt)
            started.append(attempt)
        return started

    def _lost(self, attempt: _Attempt, reason: str, queue: deque) -> Iterator[Outcome]:
        """Retry a lost evaluation, or report it failed once its retries are spent."""
        attempt.losses.append(reason)
        attempt.avoid.add(attempt.slot)
        if len(attempt.losses) > self.faults.retries:
            yield Outcome(attempt.index, error=f"failed on {len(attempt.losses)} attempts: {'; '.join(attempt.losses)}")
        else:
            queue.appendleft(attempt)

    def _replace(self, slot: int):
        """Kill the worker in ``slot`` and start a fresh one; returns the ref that resolves when it is ready."""
        self._ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._actor.remote(*self._actor_args)
        self.replaced += 1
        return self.actors[slot].info.remote()

    @staticmethod
    def _fail_all(queue: deque, reason: str) -> Iterator[Outcome]:
        while queue:
            yield Outcome(queue.popleft().index, error=reason)

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self._ray.shutdown()


def _check_capacity(ray, workers: int, cpus: int, gpus: int) -> None:
    """Raise unless the live Ray nodes can place every worker at once: Ray would wait for the rest forever."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    fits = sum(min(int(r.get("CPU", 0) // cpus), int(r.get("GPU", 0) // gpus) if gpus else workers) for r in nodes)
    if fits < workers:
        wanted = f"{cpus} CPU{'s' if cpus != 1 else ''}" + (f" and {gpus} GPU" if gpus else "")
        seen = "; ".join(f"{int(r.get('CPU', 0))} CPUs, {int(r.get('GPU', 0))} GPUs" for r in nodes) or "none"
        raise HwnasError(f"Ray can place {fits} of the {workers} workers, each needing {wanted} (nodes: {seen}); "
                         f"use --workers {fits}" + (" or fewer" if fits else "") + (", --device cpu" if gpus else "")
                         + ", or a larger cluster")


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError))


class _EvaluatorActor:
    def __init__(self, space_source: dict, device: str, threads: int, energy: bool, hwprofile: dict | None):
        import torch

        torch.set_num_threads(threads)
        self.evaluator, self.bad_input = None, None
        try:
            self.evaluator = Evaluator(space_from_dict(space_source), device=device, energy=energy,
                                       hwprofile=hwprofile)
        except HwnasError as exc:  # Ray keeps only the text of an actor's construction error: info() raises it
            self.bad_input = exc

    def info(self) -> dict:
        if self.bad_input is not None:
            raise self.bad_input
        return self.evaluator.info()

    def evaluate(self, config: Config) -> dict[str, float]:
        return self.evaluator.evaluate(config)


def make_pool(space_source: dict, workers: int, device: str, address: str | None, energy: bool,
              faults: FaultPolicy = FaultPolicy(), hwprofile: dict | None = None):
    """``workers == 0`` evaluates in-process; otherwise on Ray (local, or the cluster at ``address``)."""
    if workers == 0:
        return LocalPool(space_source, device, energy, hwprofile)
    return RayPool(space_source, workers, device, address, energy, faults, hwprofile)


def _drop_default_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_default_auth_notice() -> None:
    """Drop Ray's notice, at every local start, that the cluster uses token authentication (its default);
    its other authentication warnings still show."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _drop_default_auth_notice not in logger.filters:
        logger.addFilter(_drop_default_auth_notice)
