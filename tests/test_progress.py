"""Progress in a log: `--progress` with stderr redirected writes plain lines, paced, never a bar."""

import pytest

from pysafe import _progress


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(_progress.time, "monotonic", c)
    return c


def _lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_lines_are_paced_by_the_interval_and_the_end_is_always_written(clock, capsys, monkeypatch):
    monkeypatch.setenv("PYSAFE_PROGRESS_INTERVAL", "30")
    with _progress.Bars(True) as bars:  # pytest's stderr capture is not a terminal
        task = bars.task("tensors", total=10)
        task.advance(1, note="layer 0")          # t = 0: the first update is written
        clock.now += 10
        task.advance(1, note="layer 1")          # t = 10: within the interval, not written
        clock.now += 25
        task.advance(2, note="layer 3")          # t = 35: written, with its eta from the rate so far
        clock.now += 5
        task.advance(6, note="layer 9")          # completes: written at once
    lines = _lines(capsys)
    assert lines == ["tensors  1/10  0:00:00  layer 0",
                     "tensors  4/10  0:00:35  eta 0:00:52  layer 3",
                     "tensors  10/10  0:00:40  layer 9"]


def test_stop_writes_the_last_unwritten_state_and_logs_pass_through(clock, capsys, monkeypatch):
    monkeypatch.setenv("PYSAFE_PROGRESS_INTERVAL", "60")
    with _progress.Bars(True) as bars:
        task = bars.task("training", total=None)
        task.update(completed=5)
        clock.now += 1
        task.update(completed=7, note="loss 0.123")
        bars.log("stage done")
    assert _lines(capsys) == ["training  5  0:00:00", "stage done", "training  7  0:00:01  loss 0.123"]


def test_hidden_bars_write_nothing(capsys):
    with _progress.Bars(False) as bars:
        bars.task("tensors", total=3).advance(3)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", ["soon", "-1", "nan", "inf"])
def test_a_bad_interval_is_named(monkeypatch, bad):
    monkeypatch.setenv("PYSAFE_PROGRESS_INTERVAL", bad)
    with pytest.raises(ValueError, match="PYSAFE_PROGRESS_INTERVAL"):
        _progress.Bars(True)


def test_large_and_fractional_counts_read_plainly(clock, capsys, monkeypatch):
    monkeypatch.setenv("PYSAFE_PROGRESS_INTERVAL", "0")
    with _progress.Bars(True) as bars:
        task = bars.task("bytes", total=26_950_000_000)
        task.update(completed=1_234_567_890)
        task.update(completed=2.5)
    assert _lines(capsys) == ["bytes  1234567890/26950000000  0:00:00", "bytes  2.5/26950000000  0:00:00"]
