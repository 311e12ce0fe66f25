import io

from rich.console import Console

from hwnas.progress import transient_progress


def _run(console: Console) -> None:
    with transient_progress(console=console) as bar:
        task = bar.add_task("fitting", total=2)
        bar.advance(task, 2)


def test_a_transient_bar_leaves_nothing_in_a_log():
    log = io.StringIO()
    _run(Console(file=log))  # a file: not a terminal (rich would leave an empty line)
    assert log.getvalue() == ""


def test_on_a_terminal_the_bar_is_drawn_then_erased():
    screen = io.StringIO()
    _run(Console(file=screen, force_terminal=True))
    assert "fitting" in screen.getvalue()
