"""A stand-in for ``python -m rankwise.evaluate`` in grid tests: the grid's contract with it.

Accepts ``results_dir=``, ``run_ids=[...]``, ``out_dir=``, ``allow_trial=true`` and
``holm_family=`` (recorded as ``holm_family``, as the evaluator does); refuses a run
that is not complete or (without allow_trial=true) ran in trial mode, exit 2, as the evaluator
does; writes ``<out_dir>/aggregated_metrics.json`` (``run_ids``, the arguments) and ``summary.md``.
"""

import json
import sys
from pathlib import Path


def main(argv):
    args = dict(a.split("=", 1) for a in argv)
    results, out = Path(args["results_dir"]), Path(args["out_dir"])
    run_ids = json.loads(args["run_ids"])
    for run_id in run_ids:
        metrics = json.loads((results / run_id / "metrics.json").read_text())
        if metrics["status"] != "complete":
            print(f"error: run '{run_id}' is not complete", file=sys.stderr)
            return 2
        if metrics["mode"] == "trial" and args.get("allow_trial") != "true":
            print(f"error: run '{run_id}' ran in trial mode (allow_trial=true)", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregated_metrics.json").write_text(json.dumps({"run_ids": run_ids, "argv": argv,
                                                                    "holm_family": args.get("holm_family")}))
    (out / "summary.md").write_text("\n".join(run_ids) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
