"""``python -m rankwise.bench overhead run=<id> [steps=20] [warmup=3] [out=bench.json] [overrides]``

Benchmark arguments (``steps``, ``warmup``, ``out``, ``calibration_batches``) are taken out;
everything else is a run/job override as for ``rankwise.main``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rankwise.errors import RankwiseError

BENCH_KEYS = {"steps": int, "warmup": int, "out": str, "calibration_batches": int}


def main(argv: list[str] | None = None) -> int:
    from rankwise.main import setup_logging

    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("overhead",):
        print("usage: python -m rankwise.bench overhead run=<id> [steps=N] [warmup=N] [out=FILE] "
              "[overrides...]", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    opts, overrides = {}, []
    for arg in rest:
        key, _, value = arg.partition("=")
        if key in BENCH_KEYS:
            opts[key] = BENCH_KEYS[key](value)
        else:
            overrides.append(arg)
    try:
        from rankwise.config.loader import load_job

        job = load_job(overrides)
        from rankwise.bench import overhead

        report = overhead.run(job, steps=opts.get("steps", 20), warmup=opts.get("warmup", 3),
                              calibration_batches=opts.get("calibration_batches"))
    except RankwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    out = Path(opts.get("out", f"bench-{command}.json"))
    out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: report[k] for k in ("ratio_to_lora_mean", "calibration_share_mnli_sized_run")},
                     indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
