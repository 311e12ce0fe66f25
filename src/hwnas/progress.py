"""Progress bars for work that ends before the results are shown: training, calibration, fitting, profiling."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, ProgressColumn


def transient_progress(*columns: str | ProgressColumn, console: Console | None = None, enabled: bool = True
                       ) -> Progress:
    """A rich progress bar on stderr that disappears when its work is done.

    Shown on a terminal only: written to a log or a CI job, rich would leave one empty line per bar
    and nothing else.
    """
    console = console or Console(stderr=True)
    return Progress(*columns, console=console, disable=not (enabled and console.is_terminal), transient=True)
