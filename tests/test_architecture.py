"""The layer rule of docs/architecture.md, checked on the source: every import inside pysafe (module-level or
inside a function) goes to the same layer or one below, and the modules import each other without cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pysafe

ROOT = Path(pysafe.__file__).resolve().parent

#: bottom to top; a module belongs to the longest prefix listed. Keep in step with docs/architecture.md.
LAYERS = (
    ("base", ("pysafe._version", "pysafe._loader", "pysafe._core", "pysafe.errors", "pysafe._atomic",
              "pysafe._progress", "pysafe._figures")),
    ("engine", ("pysafe.backend", "pysafe.linalg", "pysafe.checkpoint", "pysafe.distances", "pysafe.svdcache", "pysafe.records",
                "pysafe.weights", "pysafe.synthetic", "pysafe.distributed", "pysafe.trajectory", "pysafe.drift")),
    ("lab: world", ("pysafe.lab", "pysafe.lab.vocab", "pysafe.lab.grammar", "pysafe.lab.tasks", "pysafe.lab.recipe",
                    "pysafe.lab.samplers", "pysafe.lab.testsets", "pysafe.lab.data", "pysafe.lab.answers")),
    ("lab: model", ("pysafe.lab.model", "pysafe.lab.lora")),
    ("lab: train", ("pysafe.lab.objectives", "pysafe.lab.ckpt", "pysafe.lab.train", "pysafe.lab.config")),
    ("lab: eval", ("pysafe.lab.generate", "pysafe.lab.attacks", "pysafe.lab.evaluate", "pysafe.lab.inputs")),
    ("analysis", ("pysafe.analysis",)),
    ("report", ("pysafe.report",)),
    ("api", ("pysafe",)),  # pysafe/__init__.py only: the public API re-exports the engine and the report writer
    ("pipeline", ("pysafe.pipeline",)),
    ("cli", ("pysafe.cli", "pysafe.__main__")),
)


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = ["pysafe", *p.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _layer(module: str) -> tuple[int, str]:
    best = None
    for rank, (name, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            covers = module == pre or (pre != "pysafe" and module.startswith(pre + "."))  # "pysafe": __init__ only
            if covers and (best is None or len(pre) > best[2]):
                best = (rank, name, len(pre))
    if best is None:
        raise AssertionError(f"{module} has no layer: place it in LAYERS (tests/test_architecture.py) and in "
                             "docs/architecture.md")
    return best[0], best[1]


def _imports(path: Path, module: str, known) -> list[tuple[str, int]]:
    """(imported pysafe module, line) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "pysafe"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "pysafe":
                continue
            for a in node.names:  # `from pysafe.lab import data` imports the module pysafe.lab.data
                sub = f"{base}.{a.name}"
                found.append((sub if sub in known or sub == "pysafe._core" else base, node.lineno))
    return found


def test_every_module_has_a_layer_and_imports_go_down():
    mods = _modules()
    wrong = set()
    for module, path in mods.items():
        rank, name = _layer(module)
        for target, line in _imports(path, module, mods):
            t_rank, t_name = _layer(target)
            if t_rank > rank:
                wrong.add(f"{path.relative_to(ROOT.parent)}:{line}: {module} ({name}) imports {target} ({t_name})")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(p, m, mods) if t in mods and t != m} for m, p in mods.items()}
    for m in graph:  # importing pysafe.x.y runs pysafe/__init__ and pysafe/x/__init__ first: not an edge of x.y
        graph[m] -= {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an analysis module importing the pipeline is reported, and a module nobody placed
    has no layer (the checks can fail)."""
    with pytest.raises(AssertionError, match="no layer"):
        _layer("pysafe.newmodule")
    bad = tmp_path / "clusters.py"
    bad.write_text("def f():\n    from pysafe.pipeline.steps import ATTACK_SWEEP\n")
    imports = _imports(bad, "pysafe.analysis.clusters", _modules())
    assert imports == [("pysafe.pipeline.steps", 2)]
    assert _layer(imports[0][0])[0] > _layer("pysafe.analysis.clusters")[0]
