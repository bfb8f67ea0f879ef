"""The shape of ``src/rankwise``, checked from its source (``ast``, nothing imported):

- **layers**: every ``rankwise`` import (module level, inside functions, under
  ``TYPE_CHECKING``) points to the importer's layer or one below it (``LAYERS``);
- **no import cycles** between modules (strongly connected components of the import graph);
- **short functions**: none over ``MAX_LINES`` lines unless a ``# long: <reason>`` comment
  sits on its ``def`` line or the line above it.

Each check is run on a small made-up source tree too, so it is shown to fail where it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module belongs to the layer of its longest listed prefix. Foundations
# (no rankwise imports beyond errors); the registries of facts (tasks, metrics, methods);
# the config schema built on them; data loading; measurement and statistics; training; the
# jobs (search, runner, comparison, grid); the entry points.
LAYERS: list[tuple[str, ...]] = [
    ("rankwise", "rankwise.errors", "rankwise.config.typed", "rankwise.results",
     "rankwise.runtime", "rankwise.models", "rankwise.tracking", "rankwise.distributed"),
    ("rankwise.data.tasks", "rankwise.data.glue", "rankwise.metrics", "rankwise.methods"),
    ("rankwise.config",),
    ("rankwise.data",),
    ("rankwise.stats", "rankwise.verdicts", "rankwise.summary", "rankwise.plots", "rankwise.measure"),
    ("rankwise.training",),
    ("rankwise.search", "rankwise.runner", "rankwise.evaluate", "rankwise.grid"),
    ("rankwise.bench", "rankwise.main", "rankwise.cli", "rankwise.__main__"),
]
MAX_LINES = 60


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def import_graph(src: Path) -> dict[str, set[str]]:
    """module -> the rankwise modules it names in an import (``from pkg import sub`` names
    ``pkg.sub`` when that is a module, else ``pkg``)."""
    mods = modules(src)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] != "rankwise":
                    continue
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets.update(subs)
                if len(subs) < len(node.names):
                    targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "rankwise")
        graph[name] = {t for t in targets if t != name}
    return graph


def layer_of(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    if layer is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return layer


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
                  for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions(src: Path, max_lines: int = MAX_LINES) -> list[str]:
    """Functions over ``max_lines`` lines without a ``# long: <reason>`` beside their def."""
    out = []
    for path in sorted(src.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - first + 1
            beside = lines[first - 2: node.lineno]
            if n > max_lines and not any("# long:" in line for line in beside):
                out.append(f"{path.relative_to(src)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports(import_graph(SRC)) == []


def test_no_import_cycles():
    assert cycles(import_graph(SRC)) == []


def test_every_module_is_in_a_layer():
    for name in modules(SRC):
        layer_of(name)


def test_no_function_over_60_lines_without_a_reason():
    assert long_functions(SRC) == []


@pytest.fixture
def made_up_tree(tmp_path: Path) -> Path:
    pkg = tmp_path / "rankwise"
    (pkg / "training").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from rankwise.training import loop\n")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "loop.py").write_text(
        "from rankwise import errors\n"
        "def g():\n" + "    x = 1\n" * 61 +
        "# long: one state machine\n"
        "def h():\n" + "    x = 1\n" * 61)
    return tmp_path


def test_the_checks_fail_where_they_should(made_up_tree: Path):
    graph = import_graph(made_up_tree)
    assert graph["rankwise.errors"] == {"rankwise.training.loop"}
    assert upward_imports(graph) == [
        "rankwise.errors (layer 0) imports rankwise.training.loop (layer 5)"]
    assert cycles(graph) == [["rankwise.errors", "rankwise.training.loop"]]
    assert long_functions(made_up_tree) == [f"{Path('rankwise/training/loop.py')}:2 g (62 lines)"]
