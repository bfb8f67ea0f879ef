#!/usr/bin/env bash
# The GPU check: the gpu-marked tests, bench train and bench inference, merged into one JSON.
#
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--quick] [--out DIR]
#
# --device cuda (default): pytest -m gpu tests/test_gpu.py (bf16/fp16 steps of every method on
#   tiny BERT and DeBERTa, sparse vs dense spectral kernels, GradScaler skips, 2-process NCCL
#   when two GPUs exist) and tests/test_mixed_precision.py (the default suite's mixed-precision
#   contract matrix, there on CPU autocast, here on the GPU); bench train on long-deberta in bf16 (Full FT, LoRA, IW-LoRA, AdaLoRA,
#   HF Trainer + peft; batch 32, length 128); bench inference on long-deberta (TABS, CBSP, LoRA;
#   sparse and dense spectral paths; lengths 128-4096).
# --device cpu: the same steps on the CPU in float32 (the fallback that keeps this script
#   working without a GPU), the contract matrix on CPU autocast; --quick: tiny-bert, a few steps and shapes (what the default test
#   suite runs).
# Writes DIR/gpu_check.json (default gpu-check/) with the device, the test outcomes and the two
# benchmarks' headline numbers (full reports in DIR/bench-train/ and DIR/bench-inference/).
# GLUE SST-2 comes from $RANKWISE_DATA_DIR, else ../shared/data/glue; without either a small
# generated SST-2-shaped set is used (timing only). Exit status: non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=cuda; QUICK=0; OUT=gpu-check
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu] [--quick] [--out DIR]" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "error: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
mkdir -p "$OUT"
rm -f "$OUT/gpu_check.json"
if [ -z "${RANKWISE_DATA_DIR:-}" ]; then
  if [ -d ../shared/data/glue/sst2 ]; then export RANKWISE_DATA_DIR=../shared/data/glue
  else
    export RANKWISE_DATA_DIR="$OUT/generated-glue"
    "$PY" - "$RANKWISE_DATA_DIR" <<'PYEOF'
import sys, pathlib, numpy as np, pandas as pd
words = "the a movie film is was good bad great awful not very and but it plot acting story".split()
rng = np.random.default_rng(0)
for split, n in (("train", 2000), ("validation", 256)):
    rows = [{"sentence": " ".join(rng.choice(words, size=int(rng.integers(8, 120)))),
             "label": int(rng.integers(2)), "idx": i} for i in range(n)]
    path = pathlib.Path(sys.argv[1]) / "sst2" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
PYEOF
  fi
fi

if [ "$QUICK" = 1 ]; then
  MODEL=tiny-bert; PREC=""; TRAIN_OPTS=(steps=1 warmup=0 profile_steps=0 'methods=[lora]' hf_trainer=false pad_to=32)
  INF_OPTS=('adapters=[tabs,lora]' 'lengths=[16]' 'batch_sizes=[1]' repeats=1 warmup=0 lora_merge=unmerged)
  export RANKWISE_TEST_QUICK=1
else
  MODEL=long-deberta; PREC=""
  [ "$DEVICE" = cuda ] && PREC=training.bf16=true
  TRAIN_OPTS=(steps=20 warmup=3 profile_steps=2 'methods=[full_ft,lora,iw_lora,adalora]' hf_trainer=true pad_to=128)
  INF_OPTS=('adapters=[tabs,cbsp,lora]' 'lengths=[128,256,512,1024,2048,4096]' 'batch_sizes=[1,8]'
            spectral_path=both repeats=5 warmup=2)
  [ "$DEVICE" = cpu ] && INF_OPTS=('adapters=[tabs,cbsp,lora]' 'lengths=[128,512]' 'batch_sizes=[1]' spectral_path=both)
fi

gpu_tests() {
  RANKWISE_TEST_DEVICE=$DEVICE "$PY" -m pytest -m "gpu or not slow" tests/test_gpu.py \
    tests/test_mixed_precision.py -q -p no:cacheprovider \
    --junitxml="$OUT/pytest-gpu.xml" > "$OUT/pytest-gpu.log" 2>&1
}
bench_train() {
  "$PY" -m rankwise.bench train run=minilm-sst2-lora model.name=$MODEL device=$DEVICE $PREC \
    dataset.max_train_samples=2000 "${TRAIN_OPTS[@]}" out="$OUT/bench-train" > "$OUT/bench-train.log" 2>&1
}
bench_inference() {
  "$PY" -m rankwise.bench inference run=minilm-sst2-lora model.name=$MODEL device=$DEVICE $PREC \
    "${INF_OPTS[@]}" out="$OUT/bench-inference" > "$OUT/bench-inference.log" 2>&1
}
status=0
if [ "$QUICK" = 1 ]; then
  # --quick checks that each step runs, not how fast: the three steps run side by side.
  gpu_tests & p1=$!; bench_train & p2=$!; bench_inference & p3=$!
  for p in $p1 $p2 $p3; do wait "$p" || status=1; done
else
  # Timed steps run one at a time, so no step's timings share the device with another's.
  gpu_tests || status=1
  bench_train || status=1
  bench_inference || status=1
fi
tail -3 "$OUT/pytest-gpu.log"
tail -8 "$OUT/bench-train.log"
tail -3 "$OUT/bench-inference.log"

"$PY" - "$OUT" "$DEVICE" "$QUICK" "$status" <<'PYEOF'
import json, sys, pathlib, xml.etree.ElementTree as ET
out, device, quick, status = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
report = {"device_requested": device, "quick": quick, "status": "ok" if status == 0 else "failed"}
try:
    suite = ET.parse(out / "pytest-gpu.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        tests.append({"test": case.get("name"), "outcome": outcome, "time_s": float(case.get("time", 0))})
    report["pytest"] = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    report["pytest"]["tests"] = tests
except (OSError, ET.ParseError) as exc:
    report["pytest"] = {"error": f"no junit report: {exc}"}
try:
    train = json.loads((out / "bench-train" / "train.json").read_text())
    report["bench_train"] = {
        "device": train["provenance"]["device"], "batches": train["batches"], "reference": train["reference"],
        "results": [{k: r[k] for k in ("label", "examples_per_s", "step_time_s_median", "step_time_s_p90",
                                       "peak_memory_mb", "breakdown_s_median", "optimizer")}
                    for r in train["results"]],
        "step_time_ratio_to_reference": train["step_time_ratio_to_reference"]}
except (OSError, KeyError, ValueError) as exc:
    report["bench_train"] = {"error": str(exc)}
try:
    inf = json.loads((out / "bench-inference" / "inference.json").read_text())
    report["bench_inference"] = {
        "results": [{**{k: r.get(k) for k in ("variant", "batch_size", "length",
                                              "adapter_flops_per_example")},
                     "latency_ms": r.get("latency_ms")} for r in inf["results"]],
        "ratios": inf.get("ratios"), "skipped": inf.get("skipped")}
except (OSError, KeyError, ValueError) as exc:
    report["bench_inference"] = {"error": str(exc)}
tmp = out / "gpu_check.json.tmp"
tmp.write_text(json.dumps(report, indent=2, default=str))
tmp.replace(out / "gpu_check.json")
print(f"wrote {out / 'gpu_check.json'} (status {report['status']})")
PYEOF
exit $status
