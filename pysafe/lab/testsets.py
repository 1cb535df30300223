"""Test sets cached on disk: ``test_sets.h5`` (one group per set, one dataset per SafetyBatch field) and
``manifest.json`` (recipe, sizes, sha256, pysafe version), written whole by ``pysafe data generate``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

from pysafe._atomic import replace_dir
from pysafe.lab.recipe import TEST_SET_SPECS, TEST_SETS, DataRecipe
from pysafe.lab.samplers import SafetyBatch, _check_n, test_set

CACHE_FILE = "test_sets.h5"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generate(recipe: DataRecipe, out_dir, n_test: int = 2000, sets=TEST_SETS, *, overwrite: bool = False) -> Path:
    """Write the test sets to ``out_dir/test_sets.h5`` (one group per set, one dataset per
    SafetyBatch field) plus ``out_dir/manifest.json`` (recipe, sizes, sha256, pysafe version).

    Written to a temporary directory next to ``out_dir`` and renamed into place, so a reader never sees
    a half-written cache.

    Raises:
        ValueError: unknown set name. FileExistsError: ``out_dir`` exists and not ``overwrite``.
    """
    import h5py

    from pysafe._version import __version__

    n_test = _check_n(n_test)
    sets = tuple(sets)
    unknown = [s for s in sets if s not in TEST_SET_SPECS]
    if unknown:
        raise ValueError(f"unknown test set(s) {', '.join(unknown)}; known: {', '.join(TEST_SETS)}")
    out = Path(out_dir)
    with replace_dir(out, overwrite=overwrite) as tmp:
        with h5py.File(tmp / CACHE_FILE, "w") as f:
            for name in sets:
                b = test_set(recipe, name, n_test)
                g = f.create_group(name)
                for fld in fields(SafetyBatch):
                    g.create_dataset(fld.name, data=getattr(b, fld.name), compression="lzf")
        manifest = {
            "format": "pysafe-lab-test-sets/1",
            "pysafe_version": __version__,
            "recipe": recipe.to_dict(),
            "sets": {name: {"n": n_test, **dict(zip(("category", "modifier", "attack"), TEST_SET_SPECS[name]))}
                     for name in sets},
            "file": CACHE_FILE,
            "sha256": _sha256(tmp / CACHE_FILE),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def read_manifest(cache_dir) -> dict:
    """The manifest of a cache written by :func:`generate`. Raises FileNotFoundError / ValueError."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {cache_dir} a directory written by `pysafe data generate`?")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != "pysafe-lab-test-sets/1":
        raise ValueError(f"{path}: expected format 'pysafe-lab-test-sets/1', found {m.get('format') if isinstance(m, dict) else type(m).__name__!r}")
    return m


def load_cached(cache_dir, name: str, *, verify: bool = True) -> SafetyBatch:
    """Load test set ``name`` from a cache written by :func:`generate`.

    Raises:
        FileNotFoundError: no manifest or data file. ValueError: ``name`` not in the cache, or the data
        file's sha256 differs from the manifest (``verify``).
    """
    import h5py

    m = read_manifest(cache_dir)
    path = Path(cache_dir) / m["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file named in the manifest is missing")
    if name not in m["sets"]:
        raise ValueError(f"{cache_dir}: test set {name!r} is not cached; cached: {', '.join(m['sets'])}")
    if verify:
        found = _sha256(path)
        if found != m["sha256"]:
            raise ValueError(f"{path}: sha256 {found} does not match the manifest's {m['sha256']}; regenerate it")
    with h5py.File(path, "r") as f:
        g = f[name]
        return SafetyBatch(**{fld.name: g[fld.name][()] for fld in fields(SafetyBatch)})
