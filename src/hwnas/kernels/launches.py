"""What the kernels launch on a GPU, told to an operator trace that runs them on the CPU.

A hardware prediction (``hwnas.hwprofiles.predictor``) traces a model on the CPU and prices
every operator it sees. Two kinds of work would mislead it:

* ``one_launch``: a function that runs as one Triton kernel on CUDA, where its CPU path runs
  several torch operators (index checks, copies, a softmax). A trace pricing a GPU sees it as
  one operator; a trace pricing the CPU sees the operators the CPU runs.
* ``setup_work``: work done once and cached (e.g. a constant tensor built on the first call), which a
  forward pass that finds it cached does not run: no trace sees it.

A trace enters ``traced_by(tracer)``; while it is active each marked call is handed to it
(``LaunchTracer``). Outside a trace a marked call costs one check of an empty list.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Protocol, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class LaunchTracer(Protocol):
    def one_launch(self, name: str, run: Callable[[], Any], args: tuple, kwargs: dict) -> Any:
        """Run ``run()`` (the call of kernel function ``name`` on ``args``/``kwargs``) and return its result."""

    def setup_work(self, run: Callable[[], Any]) -> Any:
        """Run ``run()`` without recording what it executes, and return its result."""


_tracers: list[LaunchTracer] = []


@contextlib.contextmanager
def traced_by(tracer: LaunchTracer) -> Iterator[None]:
    """Hand every marked call to ``tracer`` inside the block."""
    _tracers.append(tracer)
    try:
        yield
    finally:
        _tracers.remove(tracer)


def one_launch(function: F) -> F:
    """Mark ``function`` as one kernel launch on CUDA (see the module docstring)."""

    @functools.wraps(function)
    def marked(*args, **kwargs):
        if not _tracers:
            return function(*args, **kwargs)
        return _tracers[-1].one_launch(function.__name__, functools.partial(function, *args, **kwargs), args, kwargs)

    return marked  # type: ignore[return-value]


def setup_work(function: F) -> F:
    """Mark ``function`` as one-time work that a forward pass does not repeat (see the module docstring)."""

    @functools.wraps(function)
    def marked(*args, **kwargs):
        if not _tracers:
            return function(*args, **kwargs)
        return _tracers[-1].setup_work(functools.partial(function, *args, **kwargs))

    return marked  # type: ignore[return-value]
