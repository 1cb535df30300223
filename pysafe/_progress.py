"""Progress bars for the long-running commands, drawn by ``rich`` on stderr.

Shown by default only when stderr is a terminal (never in logs, pipes or CI) and not with
``PYSAFE_PROGRESS=0``; the bars refresh on their own, so a stage that takes minutes still shows its elapsed
time. Asked for explicitly (``--progress``) while stderr is a file or a pipe (a batch job's log), progress is
written as plain lines instead: one per bar every ``PYSAFE_PROGRESS_INTERVAL`` seconds (default 30) and one
when the bar completes, so an hour-long run's log shows how far it got.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time


def wanted(enabled: bool | None = None) -> bool:
    """Whether to draw progress: ``enabled`` if given, else stderr is a terminal and PYSAFE_PROGRESS != 0."""
    if enabled is not None:
        return bool(enabled)
    if os.environ.get("PYSAFE_PROGRESS", "").strip() in ("0", "false", "no"):
        return False
    return _stderr_is_terminal()


def _columns():
    from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=28), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))


def _interval() -> float:
    raw = os.environ.get("PYSAFE_PROGRESS_INTERVAL", "").strip()
    try:
        value = float(raw) if raw else 30.0
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"PYSAFE_PROGRESS_INTERVAL={raw!r}: expected a number of seconds >= 0")
    return value


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


class _Lines:
    """The part of ``rich.progress.Progress`` that :class:`Bars` and :class:`Task` use, written as plain lines
    for a log: each bar at most once every ``interval`` seconds, when it completes, and its last state when
    the group stops. No cursor movement, no carriage returns."""

    def __init__(self, interval: float):
        self.interval = interval
        self.console = self
        self._tasks: list[dict] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for t in self._tasks:
            if t["dirty"]:
                self._emit(t)

    def add_task(self, description: str, total: float | None = None, note: str = "") -> int:
        self._tasks.append({"description": description, "total": total, "completed": 0.0, "note": note,
                            "start": time.monotonic(), "last": -math.inf, "dirty": False, "finished": False})
        return len(self._tasks) - 1

    def update(self, task_id: int, advance: float | None = None, completed: float | None = None,
               total: float | None = None, note: str | None = None) -> None:
        t = self._tasks[task_id]
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = float(completed)
        if advance is not None:
            t["completed"] += advance
        if note is not None:
            t["note"] = note
        t["dirty"] = True
        now = time.monotonic()
        if t["total"] is not None and t["completed"] >= t["total"] and not t["finished"]:
            t["finished"] = True
            self._emit(t)
        elif now - t["last"] >= self.interval:
            self._emit(t)

    def _emit(self, t: dict) -> None:
        now = time.monotonic()
        t["last"], t["dirty"] = now, False
        elapsed = now - t["start"]
        done, total = t["completed"], t["total"]
        parts = [t["description"], f"{_count(done)}/{_count(total)}" if total is not None else _count(done),
                 _clock(elapsed)]
        if total is not None and 0 < done < total and elapsed >= 1:  # a rate needs some time behind it
            parts.append(f"eta {_clock(elapsed * (total - done) / done)}")
        if t["note"]:
            parts.append(str(t["note"]))
        self.print("  ".join(parts))

    def print(self, message, **_) -> None:
        print(message, file=sys.stderr, flush=True)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


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
        if self.shown and not _stderr_is_terminal():
            self._p = _Lines(_interval())
        elif self.shown:
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
