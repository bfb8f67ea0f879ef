"""docs/config.md is what ``python -m rankwise.config.reference`` generates from the schema, and
every key in it has a meaning (a ``#:`` doc comment on its dataclass field)."""

import subprocess
import sys
from pathlib import Path

from rankwise.config.reference import REGENERATE, all_sections, field_doc

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_committed_config_reference_is_what_the_schema_generates():
    # a fresh process: a toy method another test registers must not leak into the output
    proc = subprocess.run([sys.executable, "-m", "rankwise.config.reference"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert DOC.read_text() == proc.stdout, f"docs/config.md is stale; regenerate with: {REGENERATE}"


def test_every_key_has_a_meaning():
    undocumented = [row.key for section in all_sections() for row in section.rows if not row.doc]
    assert undocumented == [], "add a '#:' comment above each of these fields"


def test_field_docs_come_from_doc_comments_only():
    from dataclasses import dataclass

    @dataclass
    class Made:
        #: the meaning,
        #: on two lines
        a: int = 1
        b: int = 2  #: trailing
        # a plain note, not a doc
        c: int = 3

    assert field_doc(Made, "a") == "the meaning, on two lines"
    assert field_doc(Made, "b") == "trailing"
    assert field_doc(Made, "c") == ""
