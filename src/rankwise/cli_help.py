"""``--help`` / ``-h`` and unknown flags, the same way for every command.

Every rankwise command takes Hydra-grammar ``key=value`` arguments, which never start with
``-``; an argument that does is a flag. :func:`answer_flags` prints a command's help (exit 0)
when asked for it, and refuses any flag the command does not take with one line naming it
(exit 2), before the command parses anything. Each command keeps its :class:`CommandHelp`
beside its parser; the comparison's lives here (:data:`EVALUATE_HELP`) so that
``rankwise.evaluate`` stays about comparisons.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

HELP_FLAGS = ("-h", "--help")
WIDTH = 100  # of the help text
ARGUMENT_WIDTH = 22  # a longer argument gets its own line


@dataclass(frozen=True)
class CommandHelp:
    """What ``rankwise <command> --help`` prints: usage lines, the arguments with their
    defaults, a few examples and where to read more."""

    command: str  # e.g. "rankwise run"
    usage: tuple[str, ...]  # the part after the command, one line per form
    summary: str
    arguments: tuple[tuple[str, str], ...]  # (argument, default and meaning)
    examples: tuple[str, ...]
    more: str  # where to read more (repository paths)

    def text(self) -> str:
        width = min(max((len(a) for a, _ in self.arguments), default=0), ARGUMENT_WIDTH) + 2
        pad = " " * len("usage: ")
        lines = [f"usage: {self.command} {self.usage[0]}"]
        lines += [f"{pad}{self.command} {form}" for form in self.usage[1:]]
        lines += ["", textwrap.fill(self.summary, WIDTH), "", "arguments:"]
        hang = " " * (width + 2)
        for arg, about in self.arguments:
            if len(arg) >= width:  # too long to share a line with its meaning
                lines.append(f"  {arg}")
            first = f"  {arg:<{width}}" if len(arg) < width else hang
            lines.append(textwrap.fill(about, WIDTH, initial_indent=first, subsequent_indent=hang))
        lines += ["", "examples:"] + [f"  {example}" for example in self.examples]
        lines += ["", textwrap.fill(f"more: {self.more}", WIDTH, subsequent_indent="  ")]
        return "\n".join(lines)


def key_argument(row) -> tuple[str, str]:
    """A config key (a ``rankwise.config.reference.KeyRow``) as ``--help`` lists it:
    ``mode=trial|full``, ``(default full) <meaning>``."""
    value = "|".join(row.allowed.split(", ")) if row.allowed else "VALUE"
    default = "(required)" if row.default == "required" else f"(default {row.default})"
    return f"{row.key}={value}", f"{default} {row.doc}"


def flag_name(arg: str) -> str | None:
    """The flag ``arg`` is (``--cfg`` of ``--cfg=job`` too), or None for a ``key=value``."""
    if not arg.startswith("-") or arg == "-":
        return None
    return arg.split("=", 1)[0]


def answer_flags(argv: list[str], command_help: CommandHelp | Callable[[], CommandHelp],
                 takes: tuple[str, ...] = ()) -> int | None:
    """0 after printing the help when ``argv`` asks for it; 2 after one line on stderr when it
    holds a flag that is neither a help flag nor one of ``takes``; None otherwise.
    ``command_help`` may be a function that builds it, called only when a flag is given."""
    flags = [f for f in map(flag_name, argv) if f is not None]
    if not flags:
        return None
    if callable(command_help):
        command_help = command_help()
    if any(f in HELP_FLAGS for f in flags):
        print(command_help.text())
        return 0
    for flag in flags:
        if flag not in takes:
            refuse_flag(flag, command_help.command, takes)
            return 2
    return None


def refuse_flag(flag: str, command: str, takes: tuple[str, ...] = ()) -> None:
    """The one line an unknown flag gets."""
    from rankwise.config.typed import did_you_mean

    hint = did_you_mean(flag, (*HELP_FLAGS, *takes))
    print(f"error: unknown flag {flag!r}{hint} (arguments are key=value; "
          f"'{command} --help' lists them)", file=sys.stderr)


EVALUATE_HELP = CommandHelp(
    command="rankwise evaluate",
    usage=(("results_dir=DIR run_ids='[id1,id2,...]' [out_dir=DIR] [allow_incomplete=true] "
            "[allow_trial=true] [holm_family=FILE] [figures=false]"),),
    summary="Compare finished runs of one or several tasks: aggregated_metrics.json, summary.md "
            "and figures, with a verdict for every proposed run against each other run of its "
            "task (python -m rankwise.evaluate takes the same arguments).",
    arguments=(
        ("results_dir=DIR", "required: the folder holding the runs' <run_id>/ folders"),
        ("run_ids=[...]", "required: the run ids to compare (a non-empty list)"),
        ("out_dir=DIR", "default <results_dir>/comparison: where the comparison is written"),
        ("allow_incomplete=BOOL", "default false: include runs whose status is not complete"),
        ("allow_trial=BOOL", "default false: include mode=trial runs and runs that record no "
                             "mode (marked †, Holm-adjusted in a family of their own)"),
        ("holm_family=FILE", "default none (the call is its own family): an experiment-wide "
                             "comparison's aggregated_metrics.json whose adjusted p-values the "
                             "call takes (a grid passes it)"),
        ("figures=BOOL", "default true: false writes the JSON and summary.md only"),
    ),
    examples=(
        "rankwise evaluate results_dir=results run_ids='[minilm-sst2-full-ft,minilm-sst2-lora]'",
        "rankwise evaluate results_dir=R run_ids='[a,b]' out_dir=R/compare-ab allow_trial=true",
    ),
    more="docs/outputs.md (what is written), docs/verdicts.md (how runs are compared)",
)
