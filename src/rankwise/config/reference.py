"""The config reference (``docs/config.md``), generated from the typed schema.

    python -m rankwise.config.reference > docs/config.md

Every key of a run config (``RunConfig`` and the ``model.adapter`` dataclass of each registered
method) and every job key (``JobConfig``) is listed with its type, default, allowed values and
meaning, grouped by section. The meaning is the field's doc comment: the ``#:`` comment lines
directly above the field, or a ``#:`` comment at the end of its line (Sphinx's convention for
attribute docs); plain ``#`` comments are notes for the code's readers and are not shown.
``tests/test_config_reference.py`` fails when the committed file differs from this output or
when a field has no doc comment.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import sys
import tokenize
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

REGENERATE = "python -m rankwise.config.reference > docs/config.md"


@dataclass(frozen=True)
class KeyRow:
    key: str  # dotted path, e.g. training.batch_size
    type: str
    default: str
    allowed: str
    doc: str


@dataclass(frozen=True)
class Section:
    title: str
    about: str  # the first paragraph of the dataclass's docstring, or ""
    rows: tuple[KeyRow, ...]


# --- field docs (``#:`` comments) ----------------------------------------------------------------

@functools.cache
def _module_docs(path: str) -> tuple[dict[int, str], dict[int, str]]:
    """(line -> ``#:`` comment standing alone on its line, line -> ``#:`` comment after code)."""
    source = Path(path).read_text(encoding="utf-8")
    alone, trailing = {}, {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or not tok.string.startswith("#:"):
            continue
        row, col = tok.start
        target = trailing if lines[row - 1][:col].strip() else alone
        target[row] = tok.string[2:].strip()
    return alone, trailing


@functools.cache
def _field_lines(cls: type) -> dict[str, tuple[int, int]]:
    """Field name -> (first line, last line) of its annotated assignment in ``cls``'s source."""
    path = inspect.getsourcefile(cls)
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return {stmt.target.id: (stmt.lineno, stmt.end_lineno) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    return {}


def field_doc(cls: type, name: str) -> str:
    """The ``#:`` doc of field ``name`` of dataclass ``cls`` (looked up where it is defined)."""
    for owner in cls.__mro__:
        span = _field_lines(owner).get(name) if dataclasses.is_dataclass(owner) else None
        if span is None:
            continue
        alone, trailing = _module_docs(inspect.getsourcefile(owner))
        after = [trailing[n] for n in range(span[0], span[1] + 1) if n in trailing]
        if after:
            return " ".join(after)
        above, line = [], span[0] - 1
        while line in alone:
            above.insert(0, alone[line])
            line -= 1
        return " ".join(above)
    return ""


def class_about(cls: type) -> str:
    """The first paragraph of ``cls``'s own docstring, on one line."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):  # the docstring dataclasses makes up
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


# --- types and defaults -----------------------------------------------------------------------

def yaml_value(value: Any) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def type_text(tp: Any) -> str:
    """An annotation in words: ``int or null``, ``list of int``, ``choice``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_text(a) for a in args))
    if origin is Literal:
        return "choice"
    if origin in (list, tuple):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of name to {type_text(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping (below)"
    return getattr(tp, "__name__", str(tp))


def allowed_text(tp: Any) -> str:
    """The values a ``Literal`` (also inside a union) allows, else ""."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return ", ".join(yaml_value(a) for a in args)
    if origin in (Union, types.UnionType):
        return ", ".join(filter(None, (allowed_text(a) for a in args)))
    return ""


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return yaml_value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "(below)" if dataclasses.is_dataclass(value) else yaml_value(value)
    return "required"


def nested_dataclass(tp: Any) -> type | None:
    """The dataclass a field's annotation holds directly, or None."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


# --- sections -----------------------------------------------------------------------------------

def sections(cls: type, prefix: str, title: str | None = None) -> Iterator[Section]:
    """``cls``'s keys as one section, then each nested dataclass's section (depth first)."""
    hints = typing.get_type_hints(cls)
    rows, below = [], []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        nested = nested_dataclass(tp)
        if nested is not None:
            below.append((nested, f"{key}."))
            continue
        shown = "mapping or null" if "convert" in f.metadata else type_text(tp)  # model.adapter
        rows.append(KeyRow(key, shown, default_text(f), allowed_text(tp), field_doc(cls, f.name)))
        value_tp = typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None
        if nested_dataclass(value_tp) is not None:
            below.append((value_tp, f"{key}.<name>."))
    yield Section(title or prefix.rstrip(".") or "top level", class_about(cls), tuple(rows))
    for nested, nested_prefix in below:
        yield from sections(nested, nested_prefix)


def adapter_sections() -> Iterator[Section]:
    """One section per ``model.adapter.type``, from the method registry."""
    from rankwise.methods import registered_methods

    for entry in registered_methods().values():
        if entry.adapter_type and entry.config_cls is not None:
            (section,) = sections(entry.config_cls, "model.adapter.",
                                  f"model.adapter (type: {entry.adapter_type})")
            first = sorted(section.rows, key=lambda r: r.key != "model.adapter.type")  # type first
            yield dataclasses.replace(section, rows=tuple(first))


def all_sections() -> list[Section]:
    """The job keys, then the run config's sections with the adapters after ``model``."""
    from rankwise.config.loader import JobConfig
    from rankwise.config.schema import RunConfig

    run = list(sections(RunConfig, "", "run config: top level"))
    after_model = max(i for i, s in enumerate(run) if s.title.startswith("model")) + 1
    run[after_model:after_model] = list(adapter_sections())
    return [*sections(JobConfig, "", "job keys"), *run]


# --- markdown -----------------------------------------------------------------------------------

HEADER = f"""# Config reference

Every key rankwise reads, with its type, default, allowed values and meaning. A **run
config** (`run=<id>` or `run=path.yaml`) holds the sections from `run_id` on; the **job
keys** belong to the command (`rankwise run`), with defaults in
`src/rankwise/configs/config.yaml`. Any key can be set on the command line in Hydra's
grammar (`training.batch_size=16`); `rankwise run run=<id> [overrides] --cfg job` prints the
config a run will use. How configs are found and validated: [usage.md](usage.md#run-configs).

Generated from the typed schema (`src/rankwise/config/schema.py`, `config/loader.py` and each
method's config dataclass under `src/rankwise/methods/`); do not edit by hand. Regenerate with

```bash
{REGENERATE}
```

`tests/test_config_reference.py` fails when this file differs from what the schema generates.
"""


def cell(text: str) -> str:
    return text.replace("|", "\\|") if text else ""


def section_markdown(section: Section) -> str:
    lines = [f"## {section.title}", ""]
    if section.about:
        lines += [section.about, ""]
    lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    lines += [f"| `{r.key}` | {cell(r.type)} | `{cell(r.default)}` | {cell(r.allowed)} | {cell(r.doc)} |"
              for r in section.rows]
    return "\n".join(lines)


def render() -> str:
    """The whole of docs/config.md."""
    parts = [HEADER.strip()] + [section_markdown(s) for s in all_sections() if s.rows]
    return "\n\n".join(parts) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
