"""Benchmarks.

``python -m rankwise.bench overhead run=<id> [steps=20] [warmup=3] [out=bench.json] [overrides]``
    Per-step cost of LoRA, IW-LoRA and every other rank-r method (``overhead.py``).
``python -m rankwise.bench inference run=<id|yaml> [run=...] [lengths=[...]] [batch_sizes=[...]]
[max_tokens=N] [warmup=N] [repeats=N] [lora_merge=both|merged|unmerged] [weights=auto|trained|fresh]
[spectral_path=config|sparse|dense|both] [reference=LABEL] [adapters=[...]] [input_seed=N]
[out=DIR] [overrides]``
    Latency and adapter FLOPs vs sequence length for several runs side by side (``inference.py``).
``python -m rankwise.bench train run=<id|yaml> [run=...] [methods=[full_ft,lora,iw_lora,adalora]]
[steps=N] [warmup=N] [hf_trainer=true|false] [profile_steps=N] [pad_to=N] [reference=LABEL]
[out=DIR] [overrides]``
    Training-step speed, phase breakdown and profile of several methods (and an HF Trainer +
    peft LoRA) interleaved on the same batches (``train.py``).

Benchmark arguments are taken out; everything else is a run/job override as for
``rankwise.main``, applied to every run (e.g. ``model.name=long-bert device=cpu``).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from rankwise.errors import RankwiseError

OVERHEAD_KEYS = {"steps": int, "warmup": int, "out": str, "calibration_batches": int}
USAGE = (
    "usage: python -m rankwise.bench overhead run=<id> [steps=N] [warmup=N] [out=FILE] [overrides...]\n"
    "       python -m rankwise.bench inference run=<id|yaml> [run=...] [lengths=[128,...,4096]] "
    "[batch_sizes=[1,8]] [max_tokens=N] [warmup=N] [repeats=N] [lora_merge=both|merged|unmerged] "
    "[weights=auto|trained|fresh] [spectral_path=config|sparse|dense|both] [reference=LABEL] "
    "[adapters=[tabs,cbsp,lora]] [out=DIR] "
    "[overrides...]\n"
    "       python -m rankwise.bench train run=<id|yaml> [run=...] [methods=[full_ft,lora,iw_lora,adalora]] "
    "[steps=N] [warmup=N] [hf_trainer=true|false] [profile_steps=N] [pad_to=N] [reference=LABEL] "
    "[out=DIR] [overrides...]"
)


def overhead_main(rest: list[str]) -> int:
    opts, overrides = {}, []
    for arg in rest:
        key, _, value = arg.partition("=")
        if key in OVERHEAD_KEYS:
            opts[key] = OVERHEAD_KEYS[key](value)
        else:
            overrides.append(arg)
    from rankwise.config.loader import load_job

    job = load_job(overrides)
    from rankwise.bench import overhead

    report = overhead.run(job, steps=opts.get("steps", 20), warmup=opts.get("warmup", 3),
                          calibration_batches=opts.get("calibration_batches"))
    out = Path(opts.get("out", "bench-overhead.json"))
    out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: report[k] for k in ("ratio_to_lora_mean", "calibration_share_mnli_sized_run")},
                     indent=2))
    print(f"wrote {out}")
    return 0


def split_bench_args(rest: list[str], options_cls) -> tuple[list, object]:
    """``run=`` arguments (one job each), the bench's own options (fields of ``options_cls``)
    and every other ``key=value`` applied to each run."""
    import dataclasses

    from rankwise.config.loader import load_job, parse_overrides
    from rankwise.config.typed import from_mapping
    from rankwise.errors import ConfigError

    bench_keys = {f.name for f in dataclasses.fields(options_cls)}
    runs, bench, overrides = [], {}, []
    for arg, (key, value, _) in zip(rest, parse_overrides(rest)):
        if key == "run":
            runs.append(str(value))
        elif key in bench_keys:
            bench[key] = value
        else:
            overrides.append(arg)
    if not runs:
        raise ConfigError("run", "required: run=<run_id|path.yaml> (repeat run= for more runs)")
    options = from_mapping(options_cls, bench, "")
    return [load_job([f"run={r}", *overrides]) for r in runs], options


def inference_main(rest: list[str]) -> int:
    from rankwise.bench import inference

    jobs, options = split_bench_args(rest, inference.InferenceBenchOptions)
    report = inference.run(jobs, options)
    written = inference.write_outputs(report, Path(options.out))
    for line in inference.summary_lines(report):
        print(line)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def train_main(rest: list[str]) -> int:
    from rankwise.bench import train

    jobs, options = split_bench_args(rest, train.TrainBenchOptions)
    report = train.run(train.labelled_jobs(jobs, options), options)
    written = train.write_outputs(report, Path(options.out))
    for line in train.summary_lines(report):
        print(line)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


MORE = "docs/benchmarks.md, docs/inference.md (inference measurements), docs/config.md (run keys)"
OVERRIDES = ("key.path=VALUE", ("any run-config or job key, applied to every run "
                               "(model.name=long-bert, device=cpu)"))


def options_arguments(options_cls) -> tuple[tuple[str, str], ...]:
    """A bench's options as ``--help`` lists them (defaults and meanings from the dataclass)."""
    from rankwise.cli_help import key_argument
    from rankwise.config.reference import sections

    return tuple(key_argument(row) for section in sections(options_cls, "") for row in section.rows)


def bench_help():
    """``rankwise bench --help``: the three benchmarks."""
    from rankwise.cli_help import CommandHelp

    return CommandHelp(
        command="rankwise bench", usage=(("overhead|inference|train run=<id|path.yaml> [options] "
                                         "[overrides]"),),
        summary="Benchmarks of the methods' costs: 'rankwise bench <kind> --help' lists a kind's "
                "options. python -m rankwise.bench takes the same arguments.",
        arguments=(("overhead", ("per-step cost of LoRA, IW-LoRA and every other rank-r "
                                "method and the IW calibration's share of a run")),
                   ("inference", ("latency and adapter FLOPs vs sequence length of several "
                                 "models side by side")),
                   ("train", ("training-step speed, phase breakdown and profile of several "
                             "methods (and an HF Trainer + peft LoRA) on the same batches"))),
        examples=("rankwise bench overhead run=minilm-sst2-lora steps=5",
                  "rankwise bench train run=minilm-sst2-lora steps=20 pad_to=64",
                  ("rankwise bench inference run=minilm-sst2-lora adapters='[tabs,lora]' "
                  "model.name=long-bert")),
        more=MORE)


def overhead_help():
    from rankwise.cli_help import CommandHelp

    return CommandHelp(
        command="rankwise bench overhead",
        usage=(("run=<id|path.yaml> [steps=N] [warmup=N] [calibration_batches=N] [out=FILE] "
               "[overrides]"),),
        summary="Mean step time of LoRA, IW-LoRA and AdaLoRA built from one run, on identical "
                "interleaved batches, and the IW calibration's share of a run's wall time.",
        arguments=(("run=<id|path.yaml>", "(required) the run config the variants are built from"),
                   ("steps=N", "(default 20) timed steps per variant"),
                   ("warmup=N", "(default 3) untimed steps per variant first"),
                   ("calibration_batches=N", ("(default: the run's sensitivity_warmup_steps) IW "
                                              "calibration batches")),
                   ("out=FILE", "(default bench-overhead.json) the report"), OVERRIDES),
        examples=("rankwise bench overhead run=minilm-sst2-lora steps=5 out=overhead.json",),
        more=MORE)


def kind_help(kind: str):
    """``rankwise bench inference|train --help``."""
    from rankwise.cli_help import CommandHelp

    module = importlib.import_module(f"rankwise.bench.{kind}")
    options_cls = {"inference": "InferenceBenchOptions", "train": "TrainBenchOptions"}[kind]
    return CommandHelp(
        command=f"rankwise bench {kind}",
        usage=("run=<id|path.yaml> [run=...] [options] [overrides]",),
        summary=SUMMARIES[kind], examples=EXAMPLES[kind], more=MORE,
        arguments=(("run=<id|path.yaml>", "(required; repeat for several runs) a run config"),
                   *options_arguments(getattr(module, options_cls)), OVERRIDES))


SUMMARIES = {
    "inference": "Latency and adapter FLOPs vs sequence length of several models side by side in "
                 "one process: several run=, or one run= with adapters=[...].",
    "train": "Training-step speed, phase breakdown and profile of several methods side by side in "
             "one process, interleaved on the same batches: one run= with methods=[...], or "
             "several run=.",
}
EXAMPLES = {
    "inference": (("rankwise bench inference run=minilm-sst2-lora adapters='[tabs,cbsp,lora]' "
                  "model.name=long-bert lengths='[128,256]' batch_sizes='[1]' out=bench-inf"),
                  ("rankwise bench inference run=cpu-tabs-proposed-MiniLM-L6--SST-2 "
                   "run=cpu-tabs-comparative-1-MiniLM-L6--SST-2 results_dir=R weights=trained")),
    "train": ("rankwise bench train run=minilm-sst2-lora pad_to=64 steps=20 warmup=2",
              "rankwise bench train run=minilm-sst2-lora 'methods=[lora,iw_lora]' hf_trainer=false"),
}


def answer_bench_flags(argv: list[str]) -> int | None:
    """``--help`` for bench or one kind, one line for an unknown flag; None: run the bench."""
    from rankwise.cli_help import answer_flags

    kinds = {"overhead": overhead_help, "inference": lambda: kind_help("inference"),
             "train": lambda: kind_help("train")}
    if argv and argv[0] in kinds:
        return answer_flags(argv[1:], kinds[argv[0]])
    return answer_flags(argv, bench_help)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if (answered := answer_bench_flags(argv)) is not None:
        return answered
    from rankwise.main import setup_logging

    setup_logging()
    commands = {"overhead": overhead_main, "inference": inference_main, "train": train_main}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
