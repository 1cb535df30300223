"""A few thousand cases of the differential fuzzer (tests/fuzz) against the ``safetensors`` library.

The full campaign (10^5 cases and more, each in a child process with a timeout, so that crashes
and hangs are counted too) is ``python tests/fuzz/campaign.py --cases 100000 --seed 1``; see
bench/README.md for its last result.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

from fuzz import gen, oracle

CI_CASES = 2500


def test_fuzz_cases_agree_with_the_reference(tmp_path):
    counts = collections.Counter()
    failures = []
    path = str(tmp_path / "case.safetensors")
    for i in range(CI_CASES):
        raw, labels = gen.case(7, i)
        with open(path, "wb") as fh:
            fh.write(raw)
        verdict, detail = oracle.check(path)
        counts[verdict] += 1
        if verdict in oracle.FAILURES:
            failures.append((i, labels, verdict, detail))
    assert not failures, failures[:10]
    # not vacuous: both outcomes occur often, and pysafe is stricter only now and then
    assert counts["both_accept"] > CI_CASES // 10 and counts["both_reject"] > CI_CASES // 2, counts
    assert counts["stricter"] < CI_CASES // 10, counts


def test_cases_are_reproducible_across_processes():
    code = "import sys; sys.path.insert(0, sys.argv[1]); from fuzz import gen; " \
           "import hashlib; print(hashlib.sha256(b''.join(gen.case(3, i)[0] for i in range(200))).hexdigest())"
    here = str(Path(__file__).parent)
    digests = {subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1


def test_campaign_counts_crashes_and_hangs(monkeypatch):
    # the runner itself: a worker that dies is a crash, one that stalls is a hang
    import os
    import time

    from fuzz import campaign

    def fake_check(path):
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw == gen.case(0, 1)[0]:
            os._exit(139)
        if raw == gen.case(0, 2)[0]:
            time.sleep(30)
        return "both_reject", "x"

    monkeypatch.setattr(oracle, "check", fake_check)
    counts, failures, _ = campaign.run(5, seed=0, workers=1, timeout=2.0, progress=False)
    assert counts["crash"] == 1 and counts["hang"] == 1 and counts["both_reject"] == 3, counts
    assert sorted((i, v) for i, v, _, _ in failures) == [(1, "crash"), (2, "hang")]
