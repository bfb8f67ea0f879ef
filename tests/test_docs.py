"""README.md and docs/*.md stay true to the code.

- README.md is a front page (at most 300 lines) and keeps the install and test commands that
  ``.ci/run`` runs.
- Every relative link and image in README.md and docs/*.md points to a file that exists, and
  every ``#anchor`` to a heading of that file (GitHub's heading slugs).
- Every ``rankwise ...`` / ``python -m rankwise...`` command in their ``bash`` code blocks and
  inline code spans is checked in-process, without training or writing anything: a concrete
  command is parsed and validated the way the command itself does it before any work (``run``:
  with ``--cfg job`` appended, so the whole config and the preflight checks; ``evaluate``: its
  argument parser; ``grid``: its arguments and every selected cell's config; ``bench``: its
  options and each run's config; a command that already carries ``--help``, ``--list`` or
  ``--cfg job`` is run as written). A synopsis (a ``<placeholder>``, an ``a|b`` choice or an
  ``[optional]`` part) can only show that the command exists: it is run with ``--help``.
  So these checks catch a renamed command, key, option or run config, but not a command that
  parses and then fails while training; ``scripts/`` and the end-to-end tests run those.
  ``bash scripts/<name>`` commands are checked to name an existing script.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rankwise import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MODULES = {"rankwise.main": "run", "rankwise.evaluate": "evaluate", "rankwise.grid": "grid",
           "rankwise.bench": "bench", "rankwise": None}
BENCH_KINDS = ("overhead", "inference", "train")


def without_code(text: str) -> str:
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", without_code(page.read_text()), re.MULTILINE)}


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert ("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && "
            ".venv/bin/pip install -e '.[dev]'") in text
    assert "```bash\n.venv/bin/python -m pytest\n```" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    broken = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked (no network)
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor}")
    assert broken == []


CITATION = re.compile(r"(?:docs/)?([\w-]+\.md)#([\w-]+)")
SECTION_NUMBER = re.compile(r"\.md,? §\s?\d")


def cited_anchors(text: str) -> list[tuple[str, str]]:
    return CITATION.findall(text)


def test_code_and_docs_cite_sections_by_name():
    """Code, README and docs cite docs/<page>.md#<name> (a heading that exists), never a
    section number that moves when a section is inserted."""
    files = [*PAGES, *sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "scripts").glob("*"))]
    numbered, missing = [], []
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        numbered += [f"{path.name}: {m.group(0)}" for m in SECTION_NUMBER.finditer(text)]
        for page, anchor in cited_anchors(text):
            dest = ROOT / "docs" / page
            if dest.exists() and anchor not in anchors(dest):
                missing.append(f"{path.name}: {page}#{anchor}")
    assert numbered == [] and missing == []


def test_the_citation_check_fails_where_it_should():
    assert SECTION_NUMBER.search("see methods.md §5") and not SECTION_NUMBER.search("paper §4.3")
    assert cited_anchors("docs/methods.md#spectral-gates, x") == [("methods.md", "spectral-gates")]
    assert "spectral-gates" in anchors(ROOT / "docs" / "methods.md")
    assert "5-the-spectral-family" not in anchors(ROOT / "docs" / "methods.md")


# --- commands ------------------------------------------------------------------------------------

def code_commands(text: str) -> list[str]:
    """The command lines of ``bash`` blocks (continuations joined) and the inline code spans
    that start with ``rankwise`` or ``python -m rankwise``."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh"):
            found += [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    spans = re.findall(r"`([^`\n]+)`", without_code(text))
    found += [s for s in spans if re.match(r"(rankwise |python -m rankwise)", s)]
    return found


def rankwise_argv(line: str) -> list[str] | None:
    """``['run', ...]`` for a rankwise command line (console or module form, under torchrun
    too), None for any other line."""
    words = shlex.split(line, comments=True)
    words = [w.replace(".venv/bin/", "") for w in words]
    if "-m" in words and words[0] in ("python", "python3", "torchrun"):
        i = words.index("-m")
        module, rest = words[i + 1], words[i + 2:]
        if module not in MODULES:
            return None
        return [MODULES[module], *rest] if MODULES[module] else rest
    if words and words[0] == "rankwise":
        return words[1:]
    return None


def is_synopsis(argv: list[str]) -> bool:
    """A usage line rather than a command: placeholders, choices, optional parts, or a command
    named without arguments (``rankwise evaluate`` in prose)."""
    named_only = all(w in ("run", "evaluate", "grid", "bench", *BENCH_KINDS) for w in argv)
    return named_only or any("<" in w or "|" in w or "..." in w or w.startswith("[")
                             or (w.endswith("]") and "=" not in w) for w in argv)


def documented_commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for line in code_commands(page.read_text()):
            out.append((page.name, line))
    return out


COMMANDS = documented_commands()


def test_the_pages_hold_commands_to_check():
    argvs = [rankwise_argv(line) for _, line in COMMANDS]
    assert sum(a is not None and not is_synopsis(a) for a in argvs) >= 15
    assert {a[0] for a in argvs if a} >= {"run", "evaluate", "grid", "bench"}


def check_concrete(argv: list[str], tmp_path: Path) -> None:
    """Parse and validate ``argv`` as its command does before any work (nothing trains)."""
    command, args = argv[0], argv[1:]
    if command == "run" or any(a in ("--help", "-h", "--list") or a.startswith("--cfg") for a in args):
        extra = [] if any(a.startswith(("--cfg", "--list", "--help", "-h")) for a in args) else ["--cfg", "job"]
        assert cli.main([command, *args, *extra]) == 0
    elif command == "evaluate":
        from rankwise.evaluate import parse_args

        parse_args(args)
    elif command == "grid":
        from rankwise.grid.cells import build_cells
        from rankwise.grid.cli import select_refs
        from rankwise.grid.config import parse_grid_args

        cfg, overrides = parse_grid_args(args)
        assert build_cells(select_refs(cfg), tmp_path, cfg.mode, cfg.seeds, overrides)
    elif command == "bench":
        check_bench(args[0], args[1:])
    else:
        raise AssertionError(f"unknown command {command!r}")


def check_bench(kind: str, args: list[str]) -> None:
    from rankwise.bench.__main__ import OVERHEAD_KEYS, split_bench_args
    from rankwise.config.loader import load_job

    if kind == "overhead":
        load_job([a for a in args if a.partition("=")[0] not in OVERHEAD_KEYS])
        return
    from rankwise.bench import inference, train

    options = {"inference": inference.InferenceBenchOptions, "train": train.TrainBenchOptions}[kind]
    jobs, _ = split_bench_args(args, options)
    assert jobs


def help_examples() -> list[str]:
    from rankwise.bench.__main__ import bench_help, kind_help, overhead_help
    from rankwise.cli_help import EVALUATE_HELP
    from rankwise.grid.cli import grid_help
    from rankwise.main import run_help

    helps = [run_help(), EVALUATE_HELP, grid_help(), bench_help(), overhead_help(),
             kind_help("inference"), kind_help("train")]
    return [example for h in helps for example in h.examples]


@pytest.mark.parametrize("line", help_examples())
def test_help_example_parses(line, tmp_path, monkeypatch, capsys):
    """The examples ``--help`` prints are concrete commands that parse (as above)."""
    argv = rankwise_argv(line)
    assert argv is not None and not is_synopsis(argv), line
    monkeypatch.chdir(tmp_path)
    check_concrete(argv, tmp_path)
    capsys.readouterr()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{p}:{line[:60]}" for p, line in COMMANDS])
def test_documented_command_parses(page, line, tmp_path, monkeypatch, capsys):
    argv = rankwise_argv(line)
    words = shlex.split(line, comments=True)
    if argv is None:
        if words[:1] == ["bash"] and words[1].startswith("scripts/"):
            assert (ROOT / words[1]).is_file(), f"{page}: {line}"
        return  # not a rankwise command: the install line, a shell script, a plain python script
    monkeypatch.chdir(tmp_path)  # a relative results_dir or runs_dir lands here (nothing should)
    monkeypatch.setenv("RANKWISE_DATA_DIR", str(tmp_path))
    if not argv or is_synopsis(argv):
        head = argv[:2] if argv[:1] == ["bench"] and argv[1:2] and argv[1] in BENCH_KINDS else argv[:1]
        if head and head[0] not in cli.COMMANDS:  # `rankwise <command>`: the top-level help
            head = []
        assert cli.main([*head, "--help"]) == 0, f"{page}: {line}"
    else:
        check_concrete(argv, tmp_path)
    capsys.readouterr()
    assert not (tmp_path / "results").exists() and not (tmp_path / "R").exists()
