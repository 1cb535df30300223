"""Header parsing: time and peak memory of pysafe's reader against the ``safetensors`` library.

    python bench/bench_header.py                       # the issue-13 set: 300k and 1M keys, 40 MB and 100 MB arrays
    python bench/bench_header.py --case tensors:1000000 --case array:40 --repeat 3

Cases (``--case KIND:SIZE``, repeatable):
  tensors:N   N zero-size F32 tensors (``"t<i>": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}``)
  metadata:N  N ``__metadata__`` keys (and one tensor)
  mixed:N     N/2 tensors and N/2 metadata keys
  array:MB    a header of MB megabytes, almost all of it one array of zeros under an unknown key of a
              tensor entry (the reference ignores such keys; pysafe refuses them, after checking the
              whole header's syntax: both must still read the whole array)

Each measurement runs in a fresh subprocess (imports done first) and reports the seconds of the
open call alone, the RSS after the imports and the process's peak RSS (``VmHWM``) at the end. pysafe is measured as
``_core.SafetensorsFile(path)`` (validate + map, what every reader path does first; the Python list of
entries is built after the clock and the RSS reading stop) and as ``pysafe.read_header(path)`` (which
includes building a Python dict per tensor); the reference as
``safetensors.safe_open(path, "pt")`` plus ``keys()`` and ``metadata()``. One JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

PROBE = r"""
import sys, time
kind, path = sys.argv[1], sys.argv[2]

def hwm():
    # VmHWM: this process's peak RSS. (ru_maxrss would not do: it keeps the parent's peak across fork+exec.)
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))

if kind == "reference":
    import torch, safetensors.torch  # safe_open(..., "pt") imports torch on first use: not part of the parse
    from safetensors import safe_open
    def run(p=path):
        with safe_open(p, framework="pt") as f:
            return len(f.keys()) + len(f.metadata() or {})
else:
    import pysafe
    from pysafe import _core
    from pysafe.errors import HeaderError
    def run(p=path):
        try:
            if kind == "pysafe_core":
                f = _core.SafetensorsFile(p)  # the count is taken after the clock and RSS stop (below)
                return lambda: len(f.entries()) + len(f.metadata)
            h = pysafe.read_header(p)
            return len(h["entries"]) + len(h["metadata"])
        except HeaderError as e:
            return "HeaderError:" + e.code
run(sys.argv[3])  # warm-up on a one-tensor file: first-call costs are not parsing
before = hwm()
t0 = time.perf_counter()
try:
    out = run()
except Exception as e:
    out = type(e).__name__ + ": " + str(e)[:120]
secs = time.perf_counter() - t0
peak = hwm()
if callable(out):
    out = out()
print(repr(out), secs, before, peak)
"""


def write_case(path: str, kind: str, size: int) -> int:
    """Write the file; returns the header's byte count."""
    if kind in ("tensors", "metadata", "mixed"):
        nt = size if kind == "tensors" else (size // 2 if kind == "mixed" else 1)
        nm = size - nt if kind == "mixed" else (size if kind == "metadata" else 0)
        parts = [f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(nt)]
        if nm:
            parts.append('"__metadata__":{' + ",".join(f'"k{i}":"v{i}"' for i in range(nm)) + "}")
        header = ("{" + ",".join(parts) + "}").encode()
        data = b""
    elif kind == "array":
        target = size * 1000 * 1000
        prefix = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":['
        body = b"0," * ((target - len(prefix) - 4) // 2)
        header = prefix + body + b"0]}}"
        header += b" " * (target - len(header))
        data = b"\0" * 4
    else:
        raise SystemExit(f"unknown case kind {kind!r}")
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        fh.write(data)
    return len(header)


def measure(kind: str, path: str) -> dict:
    warm = os.path.join(os.path.dirname(path), "warm.safetensors")
    if not os.path.exists(warm):
        write_case(warm, "tensors", 1)
    r = subprocess.run([sys.executable, "-c", PROBE, kind, path, warm], capture_output=True, text=True,
                       cwd=os.path.dirname(path), timeout=3600)
    if r.returncode != 0:
        return {"result": f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", "seconds": None,
                "peak_rss_mb": None}
    out, secs, before, peak = r.stdout.rsplit(None, 3)
    return {"result": out, "seconds": round(float(secs), 4), "rss_after_import_mb": round(int(before) / 2**20, 1),
            "peak_rss_mb": round(int(peak) / 2**20, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", help="KIND:SIZE (see the module docstring); repeatable")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool, interleaved; the fastest is reported")
    ap.add_argument("--tools", default="pysafe_core,pysafe_read_header,reference")
    a = ap.parse_args(argv)
    cases = a.case or ["tensors:300000", "tensors:1000000", "metadata:100000", "metadata:1000000",
                       "mixed:1000000", "array:40", "array:100"]
    with tempfile.TemporaryDirectory(prefix="pysafe-bench-header-") as d:
        for c in cases:
            kind, size = c.split(":")
            path = os.path.join(d, f"{kind}-{size}.safetensors")
            nbytes = write_case(path, kind, int(size))
            line = {"case": c, "header_mb": round(nbytes / 1e6, 2)}
            tools = a.tools.split(",")
            runs = {t: [] for t in tools}
            for _ in range(a.repeat):  # interleaved, so that a busy machine slows every tool alike
                for tool in tools:
                    runs[tool].append(measure(tool, path))
            for tool in tools:
                ok = [r for r in runs[tool] if r["seconds"] is not None]
                line[tool] = min(ok, key=lambda r: r["seconds"]) if ok else runs[tool][0]
            ref = line.get("reference", {}).get("seconds")
            for tool in ("pysafe_core", "pysafe_read_header"):
                if ref and line.get(tool, {}).get("seconds") is not None:
                    line[tool]["x_reference"] = round(line[tool]["seconds"] / ref, 2)
            os.remove(path)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
