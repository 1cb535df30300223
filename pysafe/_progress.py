"""Progress bars for the long-running commands, drawn by ``rich`` on stderr.

Shown only when stderr is a terminal (never in logs, pipes or CI) and not with ``PYSAFE_PROGRESS=0``;
the bars refresh on their own, so a stage that takes minutes still shows its elapsed time.
"""

from __future__ import annotations

import contextlib
import os
import sys


def wanted(enabled: bool | None = None) -> bool:
    """Whether to draw progress: ``enabled`` if given, else stderr is a terminal and PYSAFE_PROGRESS != 0."""
    if enabled is not None:
        return bool(enabled)
    if os.environ.get("PYSAFE_PROGRESS", "").strip() in ("0", "false", "no"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _columns():
    from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=28), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))


class Task:
    """One bar: ``advance(n, note=...)``, ``update(completed=..., total=..., note=...)``; a no-op when hidden."""

    def __init__(self, progress, task_id):
        self._p, self._id = progress, task_id

    def advance(self, n: float = 1, note: str | None = None) -> None:
        if self._p is not None:
            kw = {"note": note} if note is not None else {}
            self._p.update(self._id, advance=n, **kw)

    def update(self, completed=None, total=None, note: str | None = None) -> None:
        if self._p is not None:
            kw = {"note": note} if note is not None else {}
            if total is not None:
                kw["total"] = total
            if completed is not None:
                kw["completed"] = completed
            self._p.update(self._id, **kw)


class Bars:
    """A group of bars drawn together; use as a context manager. Hidden when :func:`wanted` is false."""

    def __init__(self, enabled: bool | None = None, transient: bool = False):
        self.shown = wanted(enabled)
        self._p = None
        if self.shown:
            from rich.console import Console
            from rich.progress import Progress

            self._p = Progress(*_columns(), console=Console(stderr=True), transient=transient,
                               refresh_per_second=4)

    def __enter__(self):
        if self._p is not None:
            self._p.start()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.stop()
        return False

    def task(self, description: str, total: float | None = None, note: str = "") -> Task:
        if self._p is None:
            return Task(None, None)
        return Task(self._p, self._p.add_task(description, total=total, note=note))

    def log(self, message: str) -> None:
        """Print a line above the bars (or plainly to stderr when they are hidden)."""
        if self._p is not None:
            self._p.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr)


@contextlib.contextmanager
def bar(description: str, total: float | None = None, enabled: bool | None = None):
    """One bar as a context manager: ``with bar("evaluating", 9) as b: b.advance(note=name)``."""
    with Bars(enabled) as bars:
        yield bars.task(description, total)


def step_callback(description: str, enabled: bool | None = None):
    """A ``progress(done, total, running)`` callback (the training loop's) backed by one bar; the bar ends
    when ``done == total`` or when the callback is called with ``done=None``."""
    state = {"bars": None, "task": None}

    def update(done, total, running=None):
        if done is None or not wanted(enabled):
            if state["bars"] is not None:
                state["bars"].__exit__(None, None, None)
                state["bars"] = None
            return
        if state["bars"] is None:
            state["bars"] = Bars(enabled).__enter__()
            state["task"] = state["bars"].task(description, total)
        note = " ".join(f"{k} {v:.3f}" for k, v in (running or {}).items())
        state["task"].update(completed=done, total=total, note=note)
        if done >= total:
            state["bars"].__exit__(None, None, None)
            state["bars"] = None

    return update
