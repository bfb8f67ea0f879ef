"""A short timed probe of a grid's own model: seconds per training step and per evaluation
batch of one run config, in this process, at the threads it was given.

``python -m rankwise.grid.probe <rankwise.main arguments>`` builds the run's Trainer on the
first ``(WARMUP + STEPS) × batch_size`` training rows (the method calibrated, as the run does),
times ``STEPS`` optimizer steps after ``WARMUP`` untimed ones and ``EVAL_BATCHES`` evaluation
forwards, and prints one JSON line. The grid runs :func:`probe` under each layout it considers
(e.g. one process with 2 threads, two with 1 thread each, side by side), in processes forked
from the server its pool workers fork from, and keeps the layout with the
most steps per second over all workers (:func:`choose_layout`); the step times feed the cells'
time estimates (:mod:`rankwise.grid.plan`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WARMUP, STEPS, EVAL_BATCHES = 1, 3, 2


def probe(argv: list[str]) -> dict[str, Any]:
    import torch

    from rankwise.config.loader import load_job
    from rankwise.data.loading import batches, eval_order, row_lengths
    from rankwise.training.loop import Trainer, model_inputs

    t0 = time.perf_counter()
    job = load_job(argv)
    rows = (WARMUP + STEPS) * job.run.training.batch_size * job.run.training.gradient_accumulation_steps
    with tempfile.TemporaryDirectory() as tmp:
        job = load_job([*argv, f"results_dir={tmp}", f"dataset.max_train_samples={rows}",
                        f"dataset.max_eval_samples={EVAL_BATCHES * (job.run.training.eval_batch_size or job.run.training.batch_size)}"])
        seed = job.limits.seeds(job.run)[0]
        trainer = Trainer(job, seed, Path(tmp) / f"seed{seed}")
        load_s = time.perf_counter() - t0
        trainer._calibrate()
        trainer.method.prepare_training(trainer.model, trainer.total_steps)
        trainer.model.train()
        times = []
        for i, parts in enumerate(trainer.epoch_batches(0)):
            start = time.perf_counter()
            trainer.forward_backward(parts)
            trainer._optimizer_step()
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
            if len(times) == STEPS:
                break
        trainer.model.eval()
        split = trainer.data.evals[0].data
        eval_bs = job.run.training.eval_batch_size or job.run.training.batch_size
        eval_times = []
        with torch.inference_mode():
            for batch in batches(split, eval_order(row_lengths(split)), eval_bs, trainer.collate, limit=EVAL_BATCHES):
                start = time.perf_counter()
                with trainer._autocast():
                    trainer.model(**model_inputs(batch, trainer.device))
                eval_times.append(time.perf_counter() - start)
    return {"s_per_step": sum(times) / len(times), "s_per_eval_batch": sum(eval_times) / max(1, len(eval_times)),
            "load_s": load_s, "threads": torch.get_num_threads()}


def _probe_in_slot(args: list[str], slot: dict[str, Any], conn) -> None:
    """A probe process (forked from the grid's preloaded server): the slot's cores and threads,
    then :func:`probe`; the result, or the error, goes back through ``conn``."""
    from rankwise.grid.worker import take_slot

    take_slot(slot)
    _quiet()
    devnull = os.open(os.devnull, os.O_WRONLY)  # the run's bars and messages: the result says what failed
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        result = probe(args)
    except BaseException as exc:  # noqa: BLE001  reported, as a failed layout
        result = {"error": (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]}
    conn.send(result)
    conn.close()


def run_probes(jobs: list[tuple[list[str], dict[str, Any]]], timeout_s: float = 600) -> list[dict[str, Any]]:
    """Each (run arguments, slot) probed in its own process on the slot's cores with its thread
    counts, all side by side; each result carries its slot's cores, or ``error``. The processes
    fork from the server the grid's pool workers fork from (:func:`~rankwise.grid.worker.preloaded_context`),
    so a probe pays no imports."""
    from rankwise.grid.worker import preloaded_context

    ctx = preloaded_context()
    started = []
    for args, slot in jobs:
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_probe_in_slot, args=(args, slot, send), daemon=True)
        proc.start()
        send.close()
        started.append((slot, proc, receive))
    deadline = time.monotonic() + timeout_s
    out = []
    for slot, proc, receive in started:
        result = None
        try:
            if receive.poll(max(0.0, deadline - time.monotonic())):
                result = receive.recv()
        except EOFError:  # the process died before it answered
            pass
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if result is None:
            result = {"error": f"the probe timed out after {timeout_s:.0f} s" if proc.exitcode in (None, -9)
                      else f"the probe exited with code {proc.exitcode}"}
        out.append({**result, "cores": slot.get("cores")})
    return out


def layouts(n_cores: int, max_workers: int) -> list[tuple[int, int]]:
    """(workers, threads each) that use every core, at most ``max_workers`` workers."""
    return [(w, n_cores // w) for w in range(1, n_cores + 1)
            if n_cores % w == 0 and w <= max(1, max_workers)]


def choose_layout(args: list[str], cores: list[int], max_workers: int) -> dict[str, Any]:
    """Probe every layout of ``cores`` (workers × threads) on the run ``args``; the chosen one
    has the most training steps per second over all its workers."""
    from rankwise.grid.launchers import thread_env

    tried = []
    for workers, threads in layouts(len(cores), max_workers):
        slots = [{"cores": cores[w * threads:(w + 1) * threads], "env": thread_env(threads)}
                 for w in range(workers)]
        results = run_probes([(args, slot) for slot in slots])
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            tried.append({"workers": workers, "threads": threads, "error": errors[0]})
            continue
        step = sum(r["s_per_step"] for r in results) / len(results)
        tried.append({"workers": workers, "threads": threads, "s_per_step": step,
                      "s_per_eval_batch": sum(r["s_per_eval_batch"] for r in results) / len(results),
                      "load_s": max(r["load_s"] for r in results), "steps_per_s": workers / step})
    ok = [t for t in tried if "steps_per_s" in t]
    if not ok:
        return {"layouts": tried, "chosen": None}
    best = max(ok, key=lambda t: t["steps_per_s"])
    return {"layouts": tried, "chosen": {"workers": best["workers"], "threads": best["threads"]},
            "s_per_step": best["s_per_step"], "s_per_eval_batch": best["s_per_eval_batch"],
            "load_s": best["load_s"]}


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet()
    print(json.dumps(probe(sys.argv[1:] if argv is None else argv)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
