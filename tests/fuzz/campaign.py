"""The full differential fuzzing campaign of the reader against the ``safetensors`` library.

    python tests/fuzz/campaign.py --cases 100000 --seed 1 [--workers 1] [--timeout 10]

(run it as a script, so that ``pysafe`` is the installed package, not the source tree).

Each worker is a child process that rebuilds case ``i`` from (seed, i), writes it to its own file
and judges it (:func:`tests.fuzz.oracle.check`). The parent hands out case numbers one at a time
and watches: a worker that dies is a crash (its case is recorded, a new worker takes over), one
that does not answer within ``--timeout`` seconds is a hang (killed and replaced). At the end it
prints one line of counts and, for every failure, the case number and what went wrong; the exit
status is 1 when crashes, hangs, lenient accepts, mismatches or exception-type violations are not
all zero.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "fuzz"  # noqa: A001

from . import gen, oracle  # noqa: E402,F401  (oracle loads torch and the core before the workers fork)

COUNTED = ("both_accept", "both_reject", "stricter", "lenient", "mismatch", "exception", "crash", "hang")


def _worker(conn, seed: int, workdir: str) -> None:
    path = os.path.join(workdir, f"case-{os.getpid()}.safetensors")
    parent = os.getppid()
    while True:
        if not conn.poll(5):
            if os.getppid() != parent:  # the runner was killed: do not linger
                return
            continue
        i = conn.recv()
        if i is None:
            return
        raw, labels = gen.case(seed, i)
        with open(path, "wb") as fh:
            fh.write(raw)
        verdict, detail = oracle.check(path)
        conn.send((i, verdict, detail, labels))


class _Slot:
    def __init__(self, ctx, seed, workdir):
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, seed, workdir), daemon=True)
        self.proc.start()
        child.close()
        self.case = None
        self.since = 0.0

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()


def run(cases: int, seed: int, workers: int = 1, timeout: float = 10.0, start: int = 0, progress: bool = True):
    """Run cases [start, start + cases); returns (counts, failures, {stricter code: (count, first case)})."""
    ctx = mp.get_context("fork")
    counts = collections.Counter({k: 0 for k in COUNTED})
    failures = []
    stricter = collections.Counter()
    examples = {}
    with tempfile.TemporaryDirectory(prefix="pysafe-fuzz-") as workdir:
        slots = [_Slot(ctx, seed, workdir) for _ in range(workers)]
        todo = iter(range(start, start + cases))
        done = 0
        t0 = last = time.monotonic()

        def feed(s):
            i = next(todo, None)
            s.case = i
            s.since = time.monotonic()
            if i is not None:
                s.parent.send(i)

        for s in slots:
            feed(s)
        while any(s.case is not None for s in slots):
            busy = [s for s in slots if s.case is not None]
            ready = mp.connection.wait([s.parent for s in busy] + [s.proc.sentinel for s in busy], timeout=0.5)
            now = time.monotonic()
            for k, s in enumerate(slots):
                if s.case is None:
                    continue
                if s.parent in ready:
                    try:
                        i, verdict, detail, labels = s.parent.recv()
                    except (EOFError, OSError):
                        verdict = None
                    else:
                        counts[verdict] += 1
                        if verdict == "stricter":
                            stricter[detail] += 1
                            examples.setdefault(detail, i)
                        elif verdict in ("lenient", "mismatch", "exception"):
                            failures.append((i, verdict, detail, labels))
                            if progress and len(failures) <= 20:
                                print(f"  case {i}: {verdict}: {detail}", file=sys.stderr, flush=True)
                        done += 1
                        feed(s)
                        continue
                if s.proc.sentinel in ready or not s.proc.is_alive():
                    counts["crash"] += 1
                    failures.append((s.case, "crash", f"worker exit code {s.proc.exitcode}", gen.case(seed, s.case)[1]))
                elif now - s.since > timeout:
                    counts["hang"] += 1
                    failures.append((s.case, "hang", f"no answer in {timeout:g} s", gen.case(seed, s.case)[1]))
                else:
                    continue
                if progress and len(failures) <= 20:
                    print(f"  case {s.case}: {failures[-1][1]}: {failures[-1][2]}", file=sys.stderr, flush=True)
                s.kill()
                done += 1
                slots[k] = s = _Slot(ctx, seed, workdir)
                feed(s)
            if progress and now - last > 30:
                last = now
                rate = done / (now - t0)
                print(f"  {done}/{cases} cases, {rate:.0f}/s, failures so far: {len(failures)}", file=sys.stderr,
                      flush=True)
        for s in slots:
            if s.proc.is_alive():
                s.parent.send(None)
            s.proc.join(timeout=5)
            s.kill()
    return counts, failures, {k: (v, examples[k]) for k, v in stricter.most_common()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first case number (to resume or to split a run)")
    ap.add_argument("--workers", type=int, default=1, help="child processes (one core each)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds before a case counts as a hang")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    counts, failures, stricter = run(a.cases, a.seed, a.workers, a.timeout, a.start)
    secs = time.monotonic() - t0
    bad = sum(counts[k] for k in ("crash", "hang", "lenient", "mismatch", "exception"))
    print(f"seed {a.seed}, cases {a.start}..{a.start + a.cases - 1}, {secs:.0f} s: "
          f"crashes {counts['crash']}, hangs {counts['hang']}, lenient accepts {counts['lenient']}, "
          f"bit mismatches {counts['mismatch']}, exception-type violations {counts['exception']}; "
          f"agreed: both accept {counts['both_accept']}, both reject {counts['both_reject']}; "
          f"pysafe stricter {counts['stricter']}")
    if stricter:
        print("pysafe stricter, by pysafe's error code (count, first case): "
              + ", ".join(f"{k} {v} (case {i})" for k, (v, i) in stricter.items()))
    for i, verdict, detail, labels in failures[:50]:
        print(f"  case {i} ({'+'.join(labels) or 'valid'}): {verdict}: {detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
