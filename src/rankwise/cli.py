"""The ``rankwise`` console command: one entry point for the ``python -m`` forms.

    rankwise run run=<id|path.yaml> results_dir=R mode=trial|full [overrides]   # rankwise.main
    rankwise evaluate results_dir=R run_ids='[a,b]' [options]                   # rankwise.evaluate
    rankwise bench overhead|inference|train run=<id> [options]                  # rankwise.bench
    rankwise grid ...                                                           # rankwise.grid

Each subcommand hands the rest of the command line to that module's ``main(argv)`` and exits
with its code; ``python -m rankwise.main`` etc. keep working unchanged.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("rankwise.main", "train and evaluate one run (python -m rankwise.main)"),
    "evaluate": ("rankwise.evaluate", "compare finished runs (python -m rankwise.evaluate)"),
    "bench": ("rankwise.bench.__main__", "benchmarks: overhead, inference, train (python -m rankwise.bench)"),
    "grid": ("rankwise.grid", "run a grid of run configs (rankwise.grid)"),
}


def usage() -> str:
    lines = ["usage: rankwise <command> [arguments]", "", "commands:"]
    lines += [f"  {name:<9} {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "'rankwise <command> --help' shows a command's usage, arguments and examples;",
              "'rankwise run --list' lists the run configs. More: README.md, docs/."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from rankwise.config.typed import did_you_mean

        print(f"error: unknown command {command!r}{did_you_mean(command, COMMANDS)}\n{usage()}",
              file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # a dependency of the module is missing: show it as it is
        print(f"error: 'rankwise {command}' needs {module_name}, which this installation does "
              f"not have (update rankwise)", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if not callable(entry):
        print(f"error: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    code = entry(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
