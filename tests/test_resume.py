"""Runs that survive: SIGKILL mid-run then resume is bit-identical; torn checkpoints; status."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rankwise.measure.after_training import TIMING_KEYS
from rankwise.training import checkpoint as ckpt

RUN = "comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI"

# Slows each optimizer step a little so the test can kill the process mid-run; numerics unchanged.
SLOW_MAIN = (
    "import sys, time\n"
    "from rankwise.training.loop import Trainer\n"
    "orig = Trainer._optimizer_step\n"
    "def slow(self):\n"
    "    time.sleep(0.15)\n"
    "    return orig(self)\n"
    "Trainer._optimizer_step = slow\n"
    "from rankwise.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def args(results, glue):
    return [f"run={RUN}", f"results_dir={results}", "mode=full", "model.name=tiny-bert",
            f"dataset.data_dir={glue}", "dataset.subset=rte", "dataset.splits.validation=validation",
            "training.epochs=2", "training.batch_size=8", "training.warmup_steps=2",
            "training.save_every_n_steps=1", "training.log_every_n_steps=1",
            "training.fp16=false", "optuna.n_trials=0"]


def without_timings(final: dict) -> dict:
    """Final metrics less the measured latencies (wall-clock, never bit-identical)."""
    assert set(TIMING_KEYS) <= set(final)
    return {k: v for k, v in final.items() if k not in TIMING_KEYS}


def final_weights(run_dir: Path):
    _, state = ckpt.latest_valid_checkpoint(run_dir / "seed42" / "checkpoints")
    return state["model"], state["global_step"]


def run_main(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rankwise.main", *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def kill_resume_and_compare(run_dir: Path, plain_dir: Path, argv: list[str], kill_after: int,
                            total_steps: int, slow: bool, timeout: int = 300) -> int:
    """SIGKILL a run once a checkpoint at >= ``kill_after`` steps exists, re-run the same command
    and compare final metrics and weights bit-for-bit with the uninterrupted run in ``plain_dir``.
    Returns the step the killed run had reached."""
    cmd = [sys.executable, "-c", SLOW_MAIN, *argv] if slow else [sys.executable, "-m", "rankwise.main", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = run_dir / "seed42" / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline and not any(int(p.stem.split("-")[1]) >= kill_after
                                             for p in ckpt.list_checkpoints(ckdir)):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.stem.split("-")[1]) for p in ckpt.list_checkpoints(ckdir))
    assert kill_after <= killed_at < total_steps, killed_at
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"

    resumed = run_main(argv, timeout)
    assert "resuming incomplete run" in resumed.stderr
    a = json.loads((plain_dir / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert b["status"] == "complete"
    assert without_timings(a["final"]) == without_timings(b["final"])
    wa, sa = final_weights(plain_dir)
    wb, sb = final_weights(run_dir)
    assert sa == sb == total_steps
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    return killed_at


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fake_glue):
    out = tmp_path_factory.mktemp("plain")
    run_main(args(out, fake_glue))
    return out / RUN


def test_sigkill_then_resume_is_bit_identical(tmp_path, fake_glue, uninterrupted):
    out = tmp_path / "killed"
    kill_resume_and_compare(out / RUN, uninterrupted, args(out, fake_glue), kill_after=5, total_steps=24,
                            slow=True)


@pytest.mark.slow
def test_sigkill_then_resume_minilm_sst2_200_steps(tmp_path, glue_dir):
    """The same check on the packaged MiniLM and real SST-2: 3,200 examples, batch 16, 200 steps,
    a checkpoint every 20 steps, killed after step 100 (about 4 minutes on 2 CPU cores)."""
    def argv(out):
        return ["run=minilm-sst2-lora", f"results_dir={out}", "mode=full", f"dataset.data_dir={glue_dir}",
                "dataset.max_train_samples=3200", "dataset.max_eval_samples=400", "training.epochs=1",
                "training.batch_size=16", "training.save_strategy=steps", "training.save_every_n_steps=20",
                "training.evaluation_strategy=epoch"]

    plain = tmp_path / "plain"
    run_main(argv(plain), timeout=1200)
    killed = tmp_path / "killed"
    step = kill_resume_and_compare(killed / "minilm-sst2-lora", plain / "minilm-sst2-lora", argv(killed),
                                   kill_after=100, total_steps=200, slow=False, timeout=1200)
    print(f"killed at step {step}; resumed run bit-identical to the uninterrupted one")


def test_torn_checkpoint_falls_back_to_previous(tmp_path):
    d = tmp_path / "checkpoints"
    ckpt.save_checkpoint(d, 1, {"x": torch.ones(3)}, keep_last=3)
    ckpt.save_checkpoint(d, 2, {"x": torch.full((3,), 2.0)}, keep_last=3)
    newest = d / "step-2.pt"
    newest.write_bytes(newest.read_bytes()[:-20])  # torn write
    path, payload = ckpt.latest_valid_checkpoint(d)
    assert path.name == "step-1.pt" and torch.equal(payload["x"], torch.ones(3))


def test_keep_last_k(tmp_path):
    d = tmp_path / "c"
    for s in range(1, 6):
        ckpt.save_checkpoint(d, s, {"s": s}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(d)] == ["step-4.pt", "step-5.pt"]


def test_determinism_twice_in_a_row(tmp_path, fake_glue, uninterrupted):
    out = tmp_path / "again"
    run_main([*args(out, fake_glue), "training.deterministic=true"])
    a = json.loads((uninterrupted / "metrics.json").read_text())["final"]
    b = json.loads((out / RUN / "metrics.json").read_text())["final"]
    assert without_timings(a) == without_timings(b)


@pytest.mark.long  # several processes; CI's second step (pytest -m long)
def test_sigterm_stops_at_step_boundary_and_marks_interrupted(tmp_path, fake_glue, uninterrupted):
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MAIN, *args(out, fake_glue)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckdir = out / RUN / "seed42" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.list_checkpoints(ckdir):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "checkpoint saved" in stderr.strip().splitlines()[-1]
    metrics = json.loads((out / RUN / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    run_main([*args(out, fake_glue), "resume=true"])
    final = json.loads((out / RUN / "metrics.json").read_text())
    assert final["status"] == "complete"
    assert without_timings(final["final"]) == without_timings(
        json.loads((uninterrupted / "metrics.json").read_text())["final"])
