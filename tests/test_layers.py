"""The layers run one way (DESIGN.md): a module imports only from its own layer or the ones below, there is no
import cycle between modules, and no private name crosses a package boundary.

Every import is read with `ast`, including those inside functions and under `if TYPE_CHECKING:` (an import moved
into a function still couples the two modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Bottom to top. train.py is the module `train`.
LAYERS = [
    {"core"},                                   # task protocol, errors, messages, data loading, sampler, config schema
    {"optim", "schedules", "regularize"},       # components
    {"tasks"},
    {"trainer"},                                # one run
    {"config"},                                 # config checking
    {"experiments", "bench", "train", "hydra_plugins"},  # tools and entry points
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _modules() -> dict[str, Path]:
    found = {}
    for top in LEVEL:
        paths = sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else [ROOT / f"{top}.py"]
        for path in paths:
            if path.exists():
                found[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import of kiln's own modules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from pkg import module` imports the module
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            out += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{base}.{n}" not in MODULES]
            if rest or not subs:
                out.append((base, rest, node.lineno))
    return [(m, n, line) for m, n, line in out if m.split(".")[0] in LEVEL]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_layer_table_covers_every_package():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "tests"}
    assert packages <= set(LEVEL), f"packages with no layer in tests/test_layers.py: {packages - set(LEVEL)}"
    assert {m.split(".")[0] for m in MODULES} >= {"core", "optim", "tasks", "trainer", "train"}


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for name, imports in GRAPH.items():
        for target, _, line in imports:
            if LEVEL[target.split(".")[0]] > LEVEL[name.split(".")[0]]:
                upward.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {name} imports {target}")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    edges = {name: {t for t, _, _ in imports if t in MODULES and t != name} for name, imports in GRAPH.items()}
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_package():
    crossing = []
    for name, imports in GRAPH.items():
        for target, names, line in imports:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target.split(".")[0] != name.split(".")[0]:
                crossing.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {target}.{', '.join(private)}")
    assert not crossing, "private names imported across packages:\n" + "\n".join(crossing)


def test_the_checker_catches_an_upward_import(tmp_path):
    """The rules above read real imports: a core module that imported the trainer would be reported."""
    fake = tmp_path / "x.py"
    fake.write_text("import os\nfrom trainer.loop import build\n\ndef f():\n    from config import check\n")
    found = {t for t, _, _ in _imports("core.x", fake)}
    assert found == {"trainer.loop", "config"}
    assert all(LEVEL[t.split(".")[0]] > LEVEL["core"] for t in found)
