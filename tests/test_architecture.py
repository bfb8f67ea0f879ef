"""The shape of ``src/rankwise``, checked from its source (``ast``, nothing imported):

- **layers**: every ``rankwise`` import (module level, inside functions, under
  ``TYPE_CHECKING``) points to the importer's layer or one below it (``LAYERS``);
- **no import cycles** between modules (strongly connected components of the import graph);
- **short functions**: none over ``MAX_LINES`` lines unless a ``# long: <reason>`` comment
  sits on its ``def`` line or the line above it;
- **names from the registry**: no registered method name as a string literal in ``src/``
  outside ``rankwise/methods/`` and the shipped configs (docstrings aside), and no test that
  loops over methods from a list written by hand (a ``for`` or ``parametrize`` over a literal
  naming methods of two or more method modules): such loops read ``registered_methods()``.

There is no exemption list: a new upward import, name literal or hand list fails.

Each check is run on a small made-up source tree too, so it is shown to fail where it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

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


def docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def method_name_literals(src: Path, names: set[str]) -> list[str]:
    """String constants equal to a method name in ``src/rankwise`` outside ``methods/`` and
    ``configs/`` (docstrings aside)."""
    out = []
    for path in sorted((src / "rankwise").rglob("*.py")):
        rel = path.relative_to(src / "rankwise").parts
        if rel[0] in ("methods", "configs"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        docs = docstring_nodes(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value in names and id(node) not in docs):
                out.append(f"{path.relative_to(src)}:{node.lineno} {node.value!r}")
    return out


def _named_strings(node: ast.AST | None, assigned: dict[str, ast.AST], depth: int = 0) -> set[str]:
    """The strings a loop's collection names directly: elements of a list, tuple or set
    literal, keys of a dict literal, through module-level names, ``list()`` / ``tuple()`` /
    ``sorted()``, ``a if c else b`` and ``a + b``."""
    if node is None or depth > 5:
        return set()
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    if isinstance(node, ast.Name):
        return _named_strings(assigned.get(node.id), assigned, depth + 1)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1 \
            and node.func.id in ("list", "tuple", "sorted", "set"):
        return _named_strings(node.args[0], assigned, depth + 1)
    if isinstance(node, ast.IfExp):
        return _named_strings(node.body, assigned, depth + 1) | _named_strings(node.orelse, assigned, depth + 1)
    if isinstance(node, ast.BinOp):
        return _named_strings(node.left, assigned, depth + 1) | _named_strings(node.right, assigned, depth + 1)
    return set()


def _loop_collections(tree: ast.AST) -> list[tuple[int, ast.AST]]:
    """(line, collection) of every ``for``, comprehension and ``parametrize`` argument list."""
    out: list[tuple[int, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.AsyncFor)):
            out.append((node.lineno, node.iter))
        elif isinstance(node, ast.comprehension):
            out.append((node.iter.lineno, node.iter))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "parametrize" and len(node.args) >= 2):
            out.append((node.lineno, node.args[1]))
    return out


def hand_listed_methods(tests: Path, family: dict[str, str]) -> list[str]:
    """Loops in test files over a literal naming methods (``family``: method name -> its
    module) of two or more modules."""
    out = []
    for path in sorted(tests.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        for line, collection in _loop_collections(tree):
            named = sorted(n for n in _named_strings(collection, assigned) if n in family)
            if len({family[n] for n in named}) >= 2:
                out.append(f"{path.relative_to(tests)}:{line} {named}")
    return out


def method_families() -> dict[str, str]:
    """Registered method name -> the module under ``rankwise.methods`` that defines it (its
    base's for an importance-weighted twin: the list of a family is one family's tests)."""
    from rankwise.methods import registered_methods

    out = {}
    for name, entry in registered_methods().items():
        cls = entry.method_cls
        if entry.importance_weighted_of:
            cls = registered_methods()[entry.importance_weighted_of].method_cls
        out[name] = ".".join(cls.__module__.split(".")[:3])
    return out


def test_no_method_name_literal_outside_methods():
    assert method_name_literals(SRC, set(method_families())) == []


def test_no_test_lists_methods_by_hand():
    assert hand_listed_methods(TESTS, method_families()) == []


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


def test_an_upward_import_from_config_to_training_fails(tmp_path: Path):
    """The config layer may read the registries below it (methods, tasks, metrics), never
    what is built on it."""
    pkg = tmp_path / "rankwise"
    for sub in ("config", "methods", "training"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "config" / "schema.py").write_text(
        "from rankwise.methods import registry\nfrom rankwise.training import build\n")
    (pkg / "methods" / "registry.py").write_text("")
    (pkg / "training" / "build.py").write_text("")
    assert upward_imports(import_graph(tmp_path)) == [
        "rankwise.config.schema (layer 2) imports rankwise.training.build (layer 5)"]


def test_the_name_checks_fail_where_they_should(tmp_path: Path):
    src, tests = tmp_path / "src", tmp_path / "tests"
    for sub in ("methods", "bench"):
        (src / "rankwise" / sub).mkdir(parents=True)
    tests.mkdir()
    (src / "rankwise" / "methods" / "lora.py").write_text('NAME = "lora"\n')  # its home: fine
    (src / "rankwise" / "bench" / "train.py").write_text(
        '"""Times "lora" and "dora"."""\n'
        'def reference(labels):\n    """"lora"."""\n    return "lora" if "lora" in labels else labels[0]\n')
    (tests / "test_x.py").write_text(
        "import pytest\n"
        "ROWS = {'lora': 1, 'tabs': 2}\n"
        "METHODS = ['lora'] if QUICK else list(ROWS)\n"
        "@pytest.mark.parametrize('m', METHODS)\ndef test_a(m): pass\n"
        "@pytest.mark.parametrize('m', ['bhsp', 'cbsp', 'tabs'])\ndef test_one_family(m): pass\n"
        "def test_b():\n    for m in ('lora', 'adalora'):\n        pass\n"
        "    for role, algo in (('proposed', 'lora'), ('baseline', 'tabs')):\n        pass\n")
    family = {"lora": "lora", "adalora": "adalora", "bhsp": "spectral", "cbsp": "spectral",
              "tabs": "spectral"}
    assert method_name_literals(src, set(family)) == [
        f"{Path('rankwise/bench/train.py')}:4 'lora'", f"{Path('rankwise/bench/train.py')}:4 'lora'"]
    assert hand_listed_methods(tests, family) == [
        "test_x.py:4 ['lora', 'tabs']", "test_x.py:9 ['adalora', 'lora']"]
