"""The three layers hold: every import of the package (function bodies included) read with ast.

library (every subpackage but ``pipeline`` and ``viz``, plus ``io``, ``jobs``, ``validate``) never
imports ``pipeline`` or ``viz``; ``viz`` never imports ``pipeline``; plotly / ipywidgets /
anywidget / kaleido only in ``viz``; ``pipeline/rundir.py`` is the bottom of ``pipeline`` and
``runner.py`` its top; inside the library a subpackage imports only those at or below it in
`LIBRARY_ORDER`; no cycle; no private name imported from another module; no module over 550
lines as ``ruff format`` lays it out (``# fmt: skip`` removed first, so nothing is packed).
"""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "merit_lab"
VIEW_LIBRARIES = {"plotly", "ipywidgets", "anywidget", "kaleido"}
MAX_LINES = 550

# The library, bottom to top: a module imports only its own level and those before it. `io`,
# `jobs`, `envelope` and `cache` are plain utilities; `validate` checks a config against every
# stage's registry, so it sits above all of them.
LIBRARY_ORDER = [
    ("io", "jobs", "envelope", "cache"),
    ("config",),
    ("data",),
    ("models",),
    ("gradients",),
    ("analysis",),
    ("partition",),
    ("merging",),
    ("training",),
    ("evaluation",),
    ("diagnostics",),
    ("demo",),
    ("validate",),
]
LEVEL = {name: i for i, names in enumerate(LIBRARY_ORDER) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in a module."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(
                    (sub, None, node.lineno) if sub in MODULES else (base, a.name, node.lineno)
                )
    return out


def _layer(module: str) -> str:
    if module == "merit_lab":
        return "facade"  # lazy re-exports of the public names (importlib strings, no imports)
    if module == "merit_lab.cli":
        return "cli"
    for layer in ("pipeline", "viz"):
        if module == f"merit_lab.{layer}" or module.startswith(f"merit_lab.{layer}."):
            return layer
    return "library"


def _internal(target: str) -> str | None:
    """The package module an import resolves to (None for third-party imports)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {
    m: {t for imp, _, _ in _imports(m) if (t := _internal(imp)) is not None and t != m}
    for m in MODULES
}


def test_every_module_is_parsed():
    assert {
        "merit_lab.pipeline.rundir",
        "merit_lab.pipeline.runner",
        "merit_lab.partition.session",
        "merit_lab.models.checkpoints",
        "merit_lab.viz.editor",
    } <= set(MODULES)


def _level(module: str) -> int | None:
    """The library level of a module (None outside the library or for the facade)."""
    if _layer(module) != "library" or module == "merit_lab":
        return None
    return LEVEL[module.split(".")[1]]


def test_every_library_module_has_a_level():
    missing = [
        m
        for m in MODULES
        if _layer(m) == "library" and m != "merit_lab" and m.split(".")[1] not in LEVEL
    ]
    assert not missing, f"add these to LIBRARY_ORDER: {missing}"


def _order_problems(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        own = _level(module)
        if own is None:
            continue
        for target in sorted(targets):
            level = _level(target)
            if level is not None and level > own:
                out.append(f"{module} imports {target} (above it in LIBRARY_ORDER)")
    return out


def test_library_subpackage_order():
    assert _order_problems(GRAPH) == []


def test_order_check_finds_a_planted_violation():
    planted = {**GRAPH, "merit_lab.data.mixture": {"merit_lab.training.trainer"}}
    assert _order_problems(planted) == [
        "merit_lab.data.mixture imports merit_lab.training.trainer (above it in LIBRARY_ORDER)"
    ]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layer_rules(module):
    layer = _layer(module)
    problems = []
    for imp, _, line in _imports(module):
        top = imp.split(".")[0]
        target = _internal(imp)
        if top in VIEW_LIBRARIES and layer != "viz":
            problems.append(f"line {line}: {imp} outside merit_lab.viz")
        if target is None:
            continue
        if layer == "library" and _layer(target) in ("pipeline", "viz", "cli"):
            problems.append(f"line {line}: the library imports {target}")
        if layer == "viz" and _layer(target) in ("pipeline", "cli"):
            problems.append(f"line {line}: viz imports {target}")
        if layer == "pipeline" and _layer(target) == "cli":
            problems.append(f"line {line}: pipeline imports {target}")
    assert not problems, f"{module}: " + "; ".join(problems)


def test_rundir_is_the_bottom_and_runner_the_top_of_pipeline():
    below = [t for t in GRAPH["merit_lab.pipeline.rundir"] if _layer(t) == "pipeline"]
    assert below == [], f"rundir imports {below}"
    above = [m for m, ts in GRAPH.items() if "merit_lab.pipeline.runner" in ts]
    assert set(above) <= {"merit_lab.cli"}, f"{above} import the runner"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_cycle_detector_finds_a_planted_cycle():
    planted = {**GRAPH, "merit_lab.io": {*GRAPH["merit_lab.io"], "merit_lab.pipeline.runner"}}
    (cycle,) = _cycles(planted)
    assert {"merit_lab.io", "merit_lab.pipeline.runner"} <= set(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module):
    private = [
        f"{imp}.{name} (line {line})"
        for imp, name, line in _imports(module)
        if name
        and name.startswith("_")
        and _internal(imp) not in (None, module)
        and name not in ("__version__", "__all__")
    ]
    assert not private, f"{module} imports private names: {private}"


@pytest.fixture(scope="module")
def formatted_lines(tmp_path_factory) -> dict[str, int]:
    """Each module's line count as ``ruff format`` lays it out, every ``# fmt: skip`` removed."""
    out = tmp_path_factory.mktemp("formatted")
    shutil.copy(PKG.parent / "pyproject.toml", out / "pyproject.toml")
    for path in MODULES.values():
        text = path.read_text(encoding="utf-8").replace("  # fmt: skip", "")
        dest = out / path.relative_to(PKG.parent)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
    subprocess.run([sys.executable, "-m", "ruff", "format", "-q", str(out)], check=True, cwd=out)
    return {
        name: len((out / path.relative_to(PKG.parent)).read_text(encoding="utf-8").splitlines())
        for name, path in MODULES.items()
    }


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module, formatted_lines):
    n = formatted_lines[module]
    assert n <= MAX_LINES, f"{module}: {n} lines as formatted (split past {MAX_LINES})"


def test_no_fmt_skip_in_the_package():
    packed = [
        f"{n}:{i}"
        for n, p in MODULES.items()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "fmt: skip" in line
    ]
    assert not packed, f"# fmt: skip packs lines: {packed}"


@pytest.mark.parametrize(
    "package",
    ["merit_lab", "merit_lab.pipeline", "merit_lab.viz"]
    + [
        f"merit_lab.{name}"
        for names in LIBRARY_ORDER
        for name in names
        if (PKG / name / "__init__.py").is_file()
    ],
)
def test_lazy_exports_resolve(package):
    """Every public name of a lazy ``__init__`` loads from the module it names."""
    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert getattr(mod, name) is not None
