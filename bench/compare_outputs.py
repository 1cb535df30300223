"""Compare two pysafe output folders number by number (e.g. a `pysafe demo --out` run before and after a
refactoring that must not change results).

    python bench/compare_outputs.py BEFORE AFTER

Every JSON file (and every line of a JSONL file) is compared value by value: numbers must be equal
exactly (NaN equals NaN), strings and keys must match. Every HDF5 file is compared dataset by dataset
(dtype, shape, bytes) and attribute by attribute. Other text files (.txt, .md, .csv) are compared line
by line. Keys and lines that record when or how long something ran (``--ignore``, a regex on the JSON
key or the text line) are skipped and counted. Images and HTML are only checked for presence (they
embed times and renderer details). Prints each difference with its path; exits 1 if any.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

# keys/lines that hold wall-clock times, dates, versions, run ids, host details or where the inputs were
# installed (absolute paths), not results
DEFAULT_IGNORE = (r"(^|_)(seconds|elapsed|timings?|time|created|date|started|finished|wall|generated|duration)"
                  r"($|_)|^pysafe_version$|^version$|^command$|^host$|^hostname$|^pid$|^run_id$|^path$"
                  r"|^checkpoint$|^cache_hit")
TEXT_SUFFIXES = {".txt", ".md", ".csv"}
PRESENCE_ONLY = {".png", ".svg", ".html", ".pdf"}


class Tolerance:
    """Numbers equal within atol + rtol·max(|a|, |b|), each tolerated difference tallied per key."""

    def __init__(self, rtol: float = 0.0, atol: float = 0.0):
        self.rtol, self.atol, self.keys = rtol, atol, {}

    def close(self, a: float, b: float, path: str) -> bool:
        diff, scale = abs(a - b), max(abs(a), abs(b))
        if not (math.isfinite(diff) and diff <= self.atol + self.rtol * scale):
            return False
        self.note(re.sub(r"\[\d+\]", "[]", path), diff, diff / scale if scale else 0.0)
        return True

    def note(self, key: str, diff: float, rel: float, n: int = 1) -> None:
        t = self.keys.setdefault(key, {"n": 0, "max_abs": 0.0, "max_rel": 0.0})
        t["n"] += n
        t["max_abs"], t["max_rel"] = max(t["max_abs"], diff), max(t["max_rel"], rel)

    def summary(self) -> dict:
        return {k: {"n": v["n"], "max_abs": float(f"{v['max_abs']:.3g}"), "max_rel": float(f"{v['max_rel']:.3g}")}
                for k, v in sorted(self.keys.items()) if v["max_abs"] > 0}


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _cmp_json(a, b, path: str, ignore: re.Pattern, out: list, skipped: list, nan_null: list | None = None,
              tol: Tolerance | None = None) -> None:
    if nan_null is not None and ((_nan(a) and b is None) or (a is None and _nan(b))):
        nan_null.append(path)  # NaN written as null (strict JSON): the same missing value
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}"
            if ignore.search(str(k)):
                skipped.append(p)
                continue
            if k not in a or k not in b:
                out.append(f"{p}: only in {'after' if k not in a else 'before'}")
                continue
            _cmp_json(a[k], b[k], p, ignore, out, skipped, nan_null, tol)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _cmp_json(x, y, f"{path}[{i}]", ignore, out, skipped, nan_null, tol)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    elif type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                         and not isinstance(a, bool) and not isinstance(b, bool)):
        out.append(f"{path}: {a!r} ({type(a).__name__}) != {b!r} ({type(b).__name__})")
    elif a != b:
        if tol is not None and isinstance(a, (int, float)) and not isinstance(a, bool) and tol.close(a, b, path):
            return
        out.append(f"{path}: {a!r} != {b!r}")


def _load_json(p: Path):
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _cmp_attr(va, vb, where: str, *, pat: re.Pattern, out: list, skipped: list) -> None:
    """Two HDF5 attributes: JSON text (the inputs' descriptions) compared as JSON, anything else bytewise."""
    import numpy as np

    if isinstance(va, str) and isinstance(vb, str) and va[:1] in "{[" and vb[:1] in "{[":
        try:
            _cmp_json(json.loads(va), json.loads(vb), where, pat, out, skipped)
            return
        except ValueError:
            pass
    if va is None or vb is None or np.asarray(va).tobytes() != np.asarray(vb).tobytes():
        out.append(f"{where}: {va!r} != {vb!r}")


def _cmp_h5(pa: Path, pb: Path, rel: str, ignore: re.Pattern, out: list, skipped: list,
            tol: Tolerance | None = None) -> int:
    import h5py
    import numpy as np

    n = 0
    with h5py.File(pa, "r") as fa, h5py.File(pb, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        for name in sorted(set(names_a) | set(names_b)):
            if name not in fa or name not in fb:
                out.append(f"{rel}:{name}: only in {'after' if name not in fa else 'before'}")
                continue
            oa, ob = fa[name], fb[name]
            for k in sorted(set(oa.attrs) | set(ob.attrs)):
                if ignore.search(k):
                    skipped.append(f"{rel}:{name}@{k}")
                    continue
                _cmp_attr(oa.attrs.get(k), ob.attrs.get(k), f"{rel}:{name}@{k}", pat=ignore, out=out, skipped=skipped)
            if isinstance(oa, h5py.Dataset):
                n += 1
                if not isinstance(ob, h5py.Dataset):
                    out.append(f"{rel}:{name}: dataset vs group")
                    continue
                da, db = oa[()], ob[()]
                if getattr(da, "dtype", None) != getattr(db, "dtype", None) or np.shape(da) != np.shape(db):
                    out.append(f"{rel}:{name}: {getattr(da, 'dtype', type(da))}{np.shape(da)} != "
                               f"{getattr(db, 'dtype', type(db))}{np.shape(db)}")
                elif (np.asarray(da).tolist() != np.asarray(db).tolist() if np.asarray(da).dtype == object
                      else np.asarray(da).tobytes() != np.asarray(db).tobytes()):  # strings: by value, not pointer
                    if not (tol is not None and _close_arrays(np.asarray(da), np.asarray(db), f"{rel}:{name}", tol)):
                        out.append(f"{rel}:{name}: values differ")
        for k in sorted(set(fa.attrs) | set(fb.attrs)):
            if ignore.search(k):
                skipped.append(f"{rel}@{k}")
            else:
                _cmp_attr(fa.attrs.get(k), fb.attrs.get(k), f"{rel}@{k}", pat=ignore, out=out, skipped=skipped)
    return n


def _close_arrays(a, b, key: str, tol: Tolerance) -> bool:
    """Numeric datasets equal within ``tol`` (NaN where both are NaN); tallies the largest difference."""
    import numpy as np

    if a.dtype.kind not in "fiuc" or b.dtype.kind not in "fiuc":
        return False
    as_type = np.complex128 if "c" in a.dtype.kind + b.dtype.kind else np.float64
    a, b = a.astype(as_type), b.astype(as_type)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    scale = np.maximum(np.abs(a), np.abs(b))
    if not np.all(np.isfinite(diff) & (diff <= tol.atol + tol.rtol * np.where(both_nan, 0.0, scale))):
        return False
    rel = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
    tol.note(key, float(diff.max(initial=0.0)), float(rel.max(initial=0.0)), int(np.count_nonzero(diff)))
    return True


def compare(before: Path, after: Path, ignore: str = DEFAULT_IGNORE, nan_is_null: bool = False,
            tol: Tolerance | None = None) -> tuple[list, dict]:
    """Returns (differences, counts). ``nan_is_null``: a NaN on one side and null on the other is counted
    (``nan_as_null``), not reported: the same missing value, written as strict JSON. ``tol``: numbers
    within its tolerance are tallied there instead of reported."""
    pat = re.compile(ignore)
    files_a = {p.relative_to(before).as_posix() for p in before.rglob("*") if p.is_file()}
    files_b = {p.relative_to(after).as_posix() for p in after.rglob("*") if p.is_file()}
    out, skipped, nan_null = [], [], ([] if nan_is_null else None)
    counts = {"json": 0, "h5_files": 0, "h5_datasets": 0, "text": 0, "presence_only": 0, "other": 0}
    for rel in sorted(files_a ^ files_b):
        out.append(f"{rel}: only in {'before' if rel in files_a else 'after'}")
    for rel in sorted(files_a & files_b):
        pa, pb = before / rel, after / rel
        suf = pa.suffix.lower()
        if suf in (".json", ".jsonl"):
            counts["json"] += 1
            _cmp_json(_load_json(pa), _load_json(pb), rel, pat, out, skipped, nan_null, tol)
        elif suf in (".h5", ".hdf5"):
            counts["h5_files"] += 1
            counts["h5_datasets"] += _cmp_h5(pa, pb, rel, pat, out, skipped, tol)
        elif suf in TEXT_SUFFIXES:
            counts["text"] += 1
            la = [x for x in pa.read_text(encoding="utf-8").splitlines() if not pat.search(x)]
            lb = [x for x in pb.read_text(encoding="utf-8").splitlines() if not pat.search(x)]
            if la != lb:
                diff = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
                out.append(f"{rel}: line {diff + 1} differs "
                           f"({la[diff] if diff < len(la) else '<end>'!r} vs {lb[diff] if diff < len(lb) else '<end>'!r})")
        elif suf in PRESENCE_ONLY:
            counts["presence_only"] += 1
        else:
            counts["other"] += 1
            if pa.read_bytes() != pb.read_bytes():
                out.append(f"{rel}: bytes differ")
    counts["skipped_keys"] = len(skipped)
    if nan_null is not None:
        counts["nan_as_null"] = len(nan_null)
    counts["skipped_examples"] = sorted({s.rsplit(".", 1)[-1].split("@")[-1] for s in skipped})[:12]
    return out, counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--ignore", default=DEFAULT_IGNORE, help="regex of JSON keys / text lines to skip")
    ap.add_argument("--nan-is-null", action="store_true", help="NaN on one side, null on the other: counted, not a difference")
    ap.add_argument("--rtol", type=float, default=0.0,
                    help="relative tolerance on numbers (default 0: exact); tolerated differences are tallied per key")
    ap.add_argument("--atol", type=float, default=0.0, help="absolute tolerance on numbers (default 0)")
    args = ap.parse_args(argv)
    tol = Tolerance(args.rtol, args.atol) if args.rtol or args.atol else None
    diffs, counts = compare(args.before, args.after, args.ignore, args.nan_is_null, tol)
    for d in diffs:
        print(d)
    if tol is not None:
        counts["tolerated"] = tol.summary()
    print(json.dumps({"differences": len(diffs), **counts}))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
