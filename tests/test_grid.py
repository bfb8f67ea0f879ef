"""The experiment grid (``python -m rankwise.grid``): cell selection, the local pool, kill and
resume, two grids on one folder, submitit's local executor, Ray, retries and failures.

Cells are two shipped CPU-twin run ids (LoRA r=8 and Full FT on SST-2) on the tiny random BERT and
the fake GLUE mirror, 16 training examples, so every cell is one short ``rankwise.main`` process.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rankwise.config.loader import packaged_configs
from rankwise.grid import compare, main
from rankwise.grid.cells import Cell, parse_run_name, select_experiment
from rankwise.grid.launchers import Resources, local_resources, usable_cores
from rankwise.grid.run import Grid
from rankwise.grid.state import GridState
from rankwise.grid.worker import CellResult, same_config
from rankwise.main import main as run_main

LORA, FULL = "cpu-comparative-1-MiniLM-L6--GLUE-SST-2", "cpu-baseline-MiniLM-L6--GLUE-SST-2"
FAKE_EVALUATE = [sys.executable, str(Path(__file__).with_name("grid_fake_evaluate.py"))]
SHIPPED = sorted(p.stem for p in (packaged_configs() / "runs").glob("*.yaml"))


def tiny(fake_glue) -> list[str]:
    return ["model.name=tiny-bert", f"dataset.data_dir={fake_glue}", "training.inference_measurement.enabled=false",
            "dataset.max_train_samples=16", "dataset.max_eval_samples=8", "training.batch_size=8"]


def grid_args(results, fake_glue, *extra, runs=(LORA, FULL)) -> list[str]:
    """The twins without their searches (one cell per seed), unless ``extra`` sets one."""
    return [f"runs=[{','.join(map(str, runs))}]", f"results_dir={results}", "seeds=[1,2]", "cpus_per_run=1",
            *tiny(fake_glue), "optuna.n_trials=0", *extra]


def metrics(results, run_id) -> dict:
    return json.loads((Path(results) / run_id / "metrics.json").read_text())


def seed_metrics(results, run_id) -> dict:
    """Per-seed task metrics (no timings): what must not depend on how the grid ran."""
    m = metrics(results, run_id)
    return {seed: {k: v for k, v in final.items() if k.startswith("validation_")}
            for seed, final in m["per_seed"].items()}


def attempt_logs(results, run_id, part="") -> list[Path]:
    return sorted((Path(results) / "grid" / "logs" / run_id).glob(f"{part}*.err"))


def grid_json(results) -> dict:
    return json.loads((Path(results) / "grid.json").read_text())


@pytest.fixture
def fake_evaluate(monkeypatch):
    monkeypatch.setattr(compare, "EVALUATE_COMMAND", FAKE_EVALUATE)


# --- cell selection ---------------------------------------------------------------------------


def test_experiment_1_cpu_selects_the_shipped_twins_of_the_task():
    picked = [n.run_id for n in select_experiment(SHIPPED, 1, "cpu", ["sst-2"], None)]
    on_disk = {s for s in SHIPPED if s.startswith("cpu-") and not s.startswith("cpu-tabs-")
               and s.endswith("-MiniLM-L6--GLUE-SST-2")}
    assert set(picked) == on_disk and len(picked) == len(on_disk) >= 4
    assert picked[0] == "cpu-proposed-MiniLM-L6--GLUE-SST-2"  # proposed first, then comparatives


def test_experiment_2_full_is_every_tabs_deberta_config():
    picked = {n.run_id for n in select_experiment(SHIPPED, 2, "full", None, None)}
    assert picked == {s for s in SHIPPED if s.startswith("tabs-") and "-DeBERTaV3-base-86-M--" in s}
    tasks = {parse_run_name(r).task for r in picked}
    assert {"MNLI", "SST-2", "ListOps", "STS-B"} <= tasks


def test_roles_and_tasks_come_from_file_names():
    added = ["cpu-ablation-uniform-l2-MiniLM-L6--GLUE-RTE", "cpu-tabs-proposed-MiniLM-L6--ListOps-len512"]
    roles = [n.role for n in select_experiment(SHIPPED + added, 1, "cpu", ["RTE"], None)]
    assert "ablation-uniform-l2" in roles and roles[-1] == "ablation-uniform-l2"
    stress = select_experiment(SHIPPED + added, 2, "cpu", ["ListOps-len512"], ["proposed"])
    assert [n.run_id for n in stress] == [added[1]]
    assert parse_run_name("minilm-sst2-lora") is None


@pytest.mark.parametrize("args, key", [
    (["experiment=3", "scale=cpu"], "experiment"),
    (["experiment=1"], "scale"),
    (["experiment=1", "scale=cpu", "tasks=[MNLI]"], "tasks.0"),
    (["experiment=1", "scale=cpu", "roles=[proposd]"], "roles.0"),
    (["experiment=1", "scale=cpu", "wrkers=2"], "wrkers"),
    (["runs=[minilm-sst2-lora]", "run=x"], "run"),
    (["runs=[minilm-sst2-lora]"], "results_dir"),
    (["experiment=1", "scale=cpu", "training.epochs=0"], "training.epochs"),
])
def test_bad_arguments_exit_2_naming_the_key_and_write_nothing(tmp_path, capsys, args, key):
    results = tmp_path / "r"
    extra = [f"results_dir={results}"] if not any(a.startswith("runs=") for a in args) or key != "results_dir" else []
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{key}'" in err[0], err
    assert not results.exists()


def test_local_pool_never_oversubscribes(tmp_path, capsys, monkeypatch):
    cores = usable_cores()
    assert main([f"runs=[{LORA}]", f"results_dir={tmp_path / 'r'}", f"workers={len(cores) + 1}"]) == 2
    assert "'workers'" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    res = local_resources(len(cores), None, None)
    slot_cores = [c for slot in res.slots for c in slot["cores"]]
    assert sorted(slot_cores) == cores  # disjoint shares covering the usable cores
    assert all(slot["env"]["OMP_NUM_THREADS"] == "1" and slot["env"]["CUDA_VISIBLE_DEVICES"] == ""
               for slot in res.slots)


def test_gpu_slots_split_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    res = local_resources(None, 1, 2)
    assert res.workers == 2 and [s["env"]["CUDA_VISIBLE_DEVICES"] for s in res.slots] == ["4,5", "6,7"]
    from rankwise.errors import ConfigError

    with pytest.raises(ConfigError, match="workers"):
        local_resources(3, 1, 2)
    cell = Cell("r", "RTE", "proposed", ["run=r", "results_dir=R"], {}, "full")
    assert cell.command(gpus=2)[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]


def test_same_config_applies_a_search_s_best_parameters():
    config = {"run_id": "r", "training": {"learning_rate": 1e-4, "epochs": 2}}
    after_search = {"run_id": "r", "training": {"learning_rate": 3e-3, "epochs": 2}}
    search = {"best_overrides": {"training.learning_rate": 3e-3}}
    assert same_config({"mode": "full", "config": after_search, "search": search}, config, "full")
    assert not same_config({"mode": "full", "config": after_search}, config, "full")
    assert not same_config({"mode": "trial", "config": config}, config, "full")


def test_slurm_keys_reach_the_sbatch_script(tmp_path, monkeypatch):
    """No Slurm here: stand-in srun/sbatch let submitit build its executor; nothing is submitted.
    The check is submitit's own rendering of the job script."""
    from rankwise.grid.config import parse_grid_args
    from rankwise.grid.launchers import make_launcher

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg, _ = parse_grid_args([f"runs=[{LORA}]", f"results_dir={tmp_path}", "launcher=slurm", "slurm.partition=gpu",
                              "slurm.time=720", "slurm.array_parallelism=16", "slurm.account=proj",
                              "slurm.mem_gb=64", "gpus_per_run=2", "cpus_per_run=8"])
    launcher = make_launcher(cfg, tmp_path / "grid")
    script = launcher.executor._executor._make_submission_file_text("python -c pass", "uid")
    for line in ("--partition=gpu", "--time=720", "--gpus-per-node=2", "--cpus-per-task=8", "--account=proj",
                 "--mem=64GB", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in script, line
    assert launcher.executor._executor.parameters["array_parallelism"] == 16
    monkeypatch.setenv("PATH", "/nonexistent")
    from rankwise.errors import ConfigError

    with pytest.raises(ConfigError, match="sbatch"):
        make_launcher(cfg, tmp_path / "grid")


# --- retries, waiting, failures (a scripted launcher; no training) ----------------------------


class ScriptedLauncher:
    """Answers each submission with the next scripted result for that cell (``<run>/seed1``);
    cells without a script (the merges) complete."""

    name, capacity = "scripted", 2

    def __init__(self, script):
        self.script, self.resources, self.submitted = script, Resources(2, 1, 0), []

    def submit(self, specs):
        ids = [f"{s.run_id}/{'merge' if s.kind == 'merge' else f'seed{s.index}'}" for s in specs]
        self.submitted += ids
        return [_Done(self.script[cid].pop(0) if cid in self.script else CellResult(s.run_id, "complete", 0))
                for cid, s in zip(ids, specs)]

    def job_id(self, handle):
        return None

    def stop(self):
        pass

    def close(self):
        pass


class _Done:
    def __init__(self, result):
        self.value = result

    def done(self):
        return True

    def result(self):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def scripted_grid(tmp_path, script, retries=1):
    runs = dict.fromkeys(cid.split("/")[0] for cid in script)
    cells = [Cell(rid, "T", "proposed", [f"run={rid}"], {"run_id": rid}, "full") for rid in runs]
    launcher = ScriptedLauncher(script)
    state = GridState(tmp_path / "grid.json", "tok", [])
    grid = Grid(cells, launcher, state, tmp_path, "tok", retries, compare=False, trial=False)
    grid.scan()
    return grid, launcher, state


def test_failures_are_retried_up_to_the_limit_unless_a_retry_cannot_help(tmp_path):
    script = {"killed/seed1": [CellResult("killed", "failed", -9, "Killed"), CellResult("killed", "complete", 0)],
              "bad-data/seed1": [CellResult("bad-data", "failed", 3, "error: split 'x' not found")],
              "lost/seed1": [RuntimeError("worker died"), RuntimeError("worker died again")]}
    grid, launcher, state = scripted_grid(tmp_path, script, retries=1)
    while grid.busy():
        grid.step()
    state.save()
    assert grid.run_final == {"killed": "complete", "bad-data": "failed", "lost": "failed"}
    assert grid.final == {"killed/seed1": "complete", "killed/merge": "complete", "bad-data/seed1": "failed",
                          "bad-data/merge": "failed", "lost/seed1": "failed", "lost/merge": "failed"}
    assert launcher.submitted.count("killed/seed1") == 2 and launcher.submitted.count("bad-data/seed1") == 1
    assert launcher.submitted.count("lost/seed1") == 2
    assert "bad-data/merge" not in launcher.submitted  # it waited for a seed that failed
    cells = grid_json(tmp_path)["cells"]
    assert [a["status"] for a in cells["killed/seed1"]["attempts"]] == ["failed", "complete"]
    assert cells["bad-data/seed1"]["exit_code"] == 3 and "split 'x'" in cells["bad-data/seed1"]["error"]
    assert cells["bad-data/merge"]["note"] == "not run: seed1 failed"
    assert cells["lost/seed1"]["error"].startswith("RuntimeError: worker died again")


def test_a_cell_locked_by_another_grid_waits_and_is_not_trained_again(tmp_path):
    from filelock import FileLock

    grid, launcher, _ = scripted_grid(tmp_path, {"held/seed1": [], "free/seed1": [CellResult("free", "complete", 0)]})
    other = FileLock(grid.lock_path("held/seed1"), timeout=0)
    other.acquire()  # another grid's worker runs seed 1 of "held"
    grid.step()
    assert grid.state.cells["held/seed1"]["status"] == "waiting" and "held/seed1" not in launcher.submitted
    (tmp_path / "held" / "seed1").mkdir(parents=True)  # ... and finishes it
    (tmp_path / "held" / "seed1" / "result.json").write_text(json.dumps(
        {"mode": "full", "run_config": {"run_id": "held"}, "config": {"run_id": "held"}}))
    other.release()
    while grid.busy():
        grid.step()
    assert grid.run_final == {"held": "complete", "free": "complete"}
    assert grid.state.cells["held/seed1"]["note"] == "completed by another grid"
    assert sorted(launcher.submitted) == ["free/merge", "free/seed1", "held/merge"]


# --- real cells ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fake_glue):
    """An uninterrupted grid: 2 methods × 2 seeds on a local pool of 2 workers."""
    results = tmp_path_factory.mktemp("grid-reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare, "EVALUATE_COMMAND", FAKE_EVALUATE)
        code = main(grid_args(results, fake_glue, "workers=2"))
    return results, code


def test_local_grid_with_two_workers_completes_and_compares(reference):
    results, code = reference
    assert code == 0
    cells = grid_json(results)["cells"]
    for rid in (LORA, FULL):
        m = metrics(results, rid)
        assert m["status"] == "complete" and m["seeds"] == [1, 2] and m["mode"] == "full" and m["seed_cells"]
        assert m["provenance"]["device"]["torch_threads"] == 1  # the worker's share: one core
        for part in ("seed1", "seed2", "merge"):
            assert cells[f"{rid}/{part}"]["status"] == "complete" and len(cells[f"{rid}/{part}"]["attempts"]) == 1
        assert len(attempt_logs(results, rid)) == 3
    # one run's two seeds trained side by side, each its own cell
    a, b = (cells[f"{LORA}/seed{s}"]["attempts"][0] for s in (1, 2))
    assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]
    for out in (results / "comparison" / "SST-2", results / "comparison"):
        report = json.loads((out / "aggregated_metrics.json").read_text())
        assert report["run_ids"] == [LORA, FULL] and "allow_trial=true" not in report["argv"]
    # one task: its comparison is the experiment's Holm family itself (no second pass)
    assert json.loads((results / "comparison" / "SST-2" / "aggregated_metrics.json").read_text())[
        "holm_family"] is None
    assert {k: v["status"] for k, v in grid_json(results)["comparisons"].items()} == {"SST-2": "complete",
                                                                                      "all": "complete"}


def test_grid_predictions_are_those_of_one_process_training_every_seed(reference, fake_glue, tmp_path):
    """A seed trained in its own cell predicts byte for byte what ``rankwise.main`` training
    every seed in one process predicts, at the same threads."""
    import torch

    results, _ = reference
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_main([f"run={LORA}", f"results_dir={tmp_path}", "training.seeds=[1,2]", *tiny(fake_glue)]) == 0
    finally:
        torch.set_num_threads(threads)
    for seed in (1, 2):
        path = Path("predictions") / "validation" / f"seed{seed}.jsonl"
        assert (results / LORA / path).read_bytes() == (tmp_path / LORA / path).read_bytes()


def test_rerunning_a_complete_grid_trains_nothing(reference, fake_glue, fake_evaluate, capsys):
    results, _ = reference
    before = {rid: (results / rid / "metrics.json").read_bytes() for rid in (LORA, FULL)}
    assert main(grid_args(results, fake_glue, "workers=2")) == 0
    out = capsys.readouterr().out
    assert out.count("already complete") >= 6 and f"summary: {results / 'comparison' / 'summary.md'}" in out
    for rid in (LORA, FULL):
        assert (results / rid / "metrics.json").read_bytes() == before[rid]
        assert len(attempt_logs(results, rid)) == 3


def test_real_evaluate_compares_the_grid(reference, fake_glue, capsys, monkeypatch):
    results, _ = reference
    shutil.rmtree(results / "comparison")  # the stand-in's outputs would count as up to date
    monkeypatch.setattr(compare, "EVALUATE_COMMAND", [*compare.EVALUATE_COMMAND, "figures=false"])
    assert main(grid_args(results, fake_glue, "workers=2")) == 0
    reports = []
    for out in (results / "comparison" / "SST-2", results / "comparison"):
        report = json.loads((out / "aggregated_metrics.json").read_text())
        assert report["run_ids"] == [LORA, FULL] and (out / "summary.md").is_file()
        reports.append(report)
    # one Holm family for the experiment: the task's output carries the overall adjusted p
    task_pairs, all_pairs = ({tuple(t["runs"]): (t["p_adjusted"], t.get("n_tests_corrected"))
                              for t in r["pairwise"]} for r in reports)
    assert task_pairs == all_pairs


def test_sigkill_mid_grid_then_rerun_finishes_without_retraining(tmp_path, fake_glue, reference):
    results = tmp_path / "r"
    args = grid_args(results, fake_glue, "workers=1", "compare=false")
    with open(tmp_path / "grid.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rankwise.grid", *args], stdout=log, stderr=log,
                                start_new_session=True)

    def mid_seed() -> tuple[str, int] | None:
        """A seed past its first checkpoint and not finished, once another seed has finished."""
        finished = list(results.glob("*/seed*/result.json"))
        for ckpt in results.glob("*/seed*/checkpoints/step-*.pt"):
            seed_dir = ckpt.parent.parent
            if finished and not (seed_dir / "result.json").exists():
                return seed_dir.parent.name, int(seed_dir.name[len("seed"):])
        return None

    deadline = time.time() + 300
    while (killed := mid_seed()) is None:
        assert proc.poll() is None, (tmp_path / "grid.log").read_text()[-3000:]
        assert time.time() < deadline, "no seed past its first checkpoint in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the grid, its workers and their runs
    proc.wait()
    done = {p.parent.parent.name + "/" + p.parent.name: p.read_bytes() for p in results.glob("*/seed*/result.json")}
    assert done and f"{killed[0]}/seed{killed[1]}" not in done

    assert main(args) == 0
    for cid, before in done.items():  # a complete seed is never trained again
        assert (results / cid / "result.json").read_bytes() == before
        rid, part = cid.split("/")
        assert len(attempt_logs(results, rid, part)) == 1
    logs = attempt_logs(results, killed[0], f"seed{killed[1]}")
    assert len(logs) == 2 and "resumed from step-" in logs[-1].read_text()  # the killed seed, resumed
    # grid.json tells the truth after the kill: the killed grid and its attempt are "lost"
    state = grid_json(results)
    assert [g["status"] for g in state["grids"]] == ["lost", "finished"]
    assert [a["status"] for a in state["cells"][f"{killed[0]}/seed{killed[1]}"]["attempts"]] == ["lost", "complete"]
    ref_results, _ = reference
    for rid in (LORA, FULL):
        assert metrics(results, rid)["status"] == "complete"
        assert seed_metrics(results, rid) == seed_metrics(ref_results, rid)
        for seed in (1, 2):
            path = Path("predictions") / "validation" / f"seed{seed}.jsonl"
            assert (results / rid / path).read_bytes() == (ref_results / rid / path).read_bytes()


@pytest.mark.long  # several processes; CI's second step (pytest -m long)
def test_two_grids_started_together_train_each_cell_once(tmp_path, fake_glue):
    results = tmp_path / "r"
    args = grid_args(results, fake_glue, "workers=1", "compare=false", "mode=trial")
    with open(tmp_path / "other.log", "w") as log:
        other = subprocess.Popen([sys.executable, "-m", "rankwise.grid", *args], stdout=log, stderr=log)
    code = main(args)
    assert other.wait(timeout=300) == 0, (tmp_path / "other.log").read_text()[-3000:]
    assert code == 0
    cells = grid_json(results)["cells"]
    for rid in (LORA, FULL):  # mode=trial: the first seed only
        assert metrics(results, rid)["status"] == "complete"
        assert len(attempt_logs(results, rid)) == 2  # seed1 and merge, each once
        for part in ("seed1", "merge"):
            assert len(cells[f"{rid}/{part}"]["attempts"]) == 1 and cells[f"{rid}/{part}"]["status"] == "complete"


def test_submitit_local_executor_runs_cells_and_contains_a_failure(tmp_path, fake_glue, fake_evaluate, capsys):
    import yaml

    bad = yaml.safe_load((packaged_configs() / "runs" / f"{LORA}.yaml").read_text())
    bad["run_id"] = "cpu-ablation-missing-split-MiniLM-L6--GLUE-RTE"
    # a valid config whose data is not in the mirror: it fails when its cell loads data (exit 3)
    bad["dataset"]["subset"] = "mrpc"
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    results = tmp_path / "r"
    code = main(grid_args(results, fake_glue, "launcher=slurm", "slurm.cluster=local", "slurm.time=10",
                          "workers=2", "mode=trial", runs=(LORA, bad_path)))
    out = capsys.readouterr().out
    assert code == 1
    cells = grid_json(results)["cells"]
    assert cells[f"{LORA}/merge"]["status"] == "complete" and metrics(results, LORA)["mode"] == "trial"
    failed = cells[f"{bad['run_id']}/seed1"]
    assert failed["status"] == "failed" and failed["exit_code"] == 3 and failed["tries"] == 1
    assert "glue/mrpc not found" in failed["error"]
    assert f"retry alone: python -m rankwise.main run={bad_path}" in out and "seed_only=1" in out
    assert cells[f"{bad['run_id']}/merge"]["status"] == "failed"
    assert all(c["job_id"] and c["job_id"] != "None" for c in cells.values() if c.get("tries"))  # submitit job ids
    assert list((results / "grid" / "submitit").glob("*_result.pkl"))
    report = json.loads((results / "comparison" / "SST-2" / "aggregated_metrics.json").read_text())
    assert report["run_ids"] == [LORA] and "allow_trial=true" in report["argv"]


@pytest.mark.slow  # starting a local Ray instance takes minutes on 2 cores
def test_ray_launcher_runs_a_cell_on_a_local_ray_instance(tmp_path, fake_glue):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    results = tmp_path / "r"
    code = main(grid_args(results, fake_glue, "launcher=ray", "mode=trial", "compare=false", runs=(LORA,)))
    assert code == 0
    assert metrics(results, LORA)["status"] == "complete"
    assert metrics(results, LORA)["provenance"]["device"]["torch_threads"] == 1
    assert len(grid_json(results)["cells"][f"{LORA}/seed1"]["attempts"]) == 1


def test_error_line_is_the_message_after_a_progress_bar(tmp_path):
    from rankwise.grid.worker import last_line

    err = tmp_path / "try1.err"
    err.write_text("INFO start\nrun seed 1:   0%|          | 0/4 [00:00<?, ?step/s]\rrun seed 1:  25%|##  | 1/4 "
                   "[00:01<00:04, 1.2step/s]error: data error at split 'validation'\n\n")
    assert last_line(err) == "error: data error at split 'validation'"
    err.write_text("Traceback (most recent call last):\nValueError: a | b\n")
    assert last_line(err) == "ValueError: a | b"


def test_grid_eta_schedules_queued_cells_on_free_slots():
    from rankwise.grid.progress import grid_eta

    # 2 slots: one runs (70 s left), two queued of 100 s: 0→100 on the free slot, 70→170 on the other
    assert grid_eta([70.0], [100.0, 100.0], 2) == 170.0
    assert grid_eta([70.0], [100.0, 100.0], float("inf")) == 100.0  # Slurm: everything at once
    assert grid_eta([30.0], [None], 1) == 60.0  # no estimate yet: the mean of the known ones
    assert grid_eta([None], [], 1) is None and grid_eta([], [], 1) == 0.0


@pytest.mark.long  # 4 trial processes, 2 seeds, a merge; CI's second step (pytest -m long)
def test_a_search_runs_its_trials_as_cells_two_at_a_time(tmp_path, fake_glue, fake_evaluate):
    """4 trials on 2 workers: each trial its own cell (max_trials=1) on the run's one study, two
    at a time; the seeds start when the study is done and train its best configuration."""
    import optuna

    results = tmp_path / "r"
    search = ["optuna.n_trials=4", "optuna.search_space.batch_size.choices=[8,16]",
              "optuna.selection_split=0.25", "optuna.heartbeat_interval=1", "optuna.grace_period=5"]
    assert main(grid_args(results, fake_glue, "workers=2", "compare=false", *search, runs=(LORA,))) == 0
    cells = grid_json(results)["cells"]
    trials = sorted(cid for cid in cells if cid.startswith(f"{LORA}/trial"))
    assert trials == [f"{LORA}/trial{i}" for i in range(1, 5)]
    spans = sorted((cells[c]["attempts"][0]["started_at"], cells[c]["attempts"][0]["ended_at"]) for c in trials)
    overlaps = [a[1] > b[0] for a, b in itertools.pairwise(spans)]
    assert sum(overlaps) >= 2  # side by side, two at a time
    assert all(max(e for _, e in spans) <= cells[f"{LORA}/seed{s}"]["attempts"][0]["started_at"] for s in (1, 2))
    study = optuna.load_study(study_name=LORA, storage=f"sqlite:///{results / LORA / 'optuna' / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 4 and {t.state for t in finished} <= {optuna.trial.TrialState.COMPLETE,
                                                                   optuna.trial.TrialState.PRUNED}
    m = metrics(results, LORA)
    assert m["status"] == "complete" and m["seeds"] == [1, 2] and m["search"]["n_finished"] == 4
    assert m["config"]["training"]["batch_size"] == study.best_params["batch_size"]
    assert m["config"]["training"]["learning_rate"] == study.best_params["learning_rate"]


def test_experiment_1_cells_skip_the_measurement_its_comparison_does_not_report(tmp_path):
    from rankwise.grid.cells import build_cells

    exp1 = "cpu-proposed-MiniLM-L6--GLUE-SST-2"
    exp2 = next(s for s in SHIPPED if s.startswith("cpu-tabs-proposed-"))
    def measures(cell) -> bool:  # the config as written: no key means the default, measured
        return cell.config["training"].get("inference_measurement", {}).get("enabled", True)

    cells = {c.run_id: c for c in build_cells([exp1, exp2], tmp_path, "full", None, [])}
    assert not measures(cells[exp1]) and "training.inference_measurement.enabled=false" in cells[exp1].args
    assert measures(cells[exp2]) and cells[exp2].estimate["measure"]
    assert measures(build_cells([exp1], tmp_path, "full", None, [], measure="all")[0])
    # a single run keeps its defaults: the flag is the grid's alone
    from rankwise.config.loader import load_job

    assert load_job([f"run={exp1}"]).run.training.inference_measurement.enabled is True


def test_plan_prints_every_cell_with_its_estimate_and_runs_nothing(tmp_path, fake_glue, capsys):
    results = tmp_path / "r"
    assert main(grid_args(results, fake_glue, "plan=true", "workers=2")) == 0
    out = capsys.readouterr().out
    for rid in (LORA, FULL):
        for part in ("seed1", "seed2", "merge"):
            line = next(x for x in out.splitlines() if x.strip().startswith(f"{rid}/{part}"))
            assert line.split()[-1] != "?"  # every cell has an estimate (the probe's step times)
        assert not (results / rid).exists()
    assert "plan: 6 cell(s)" in out and "on 2 worker(s)" in out and "nothing was run" in out
    probe = json.loads((results / "grid" / "probe.json").read_text())["result"]
    assert set(probe["runs"]) == {LORA, FULL} and all(r["s_per_step"] > 0 for r in probe["runs"].values())


def test_simulated_schedule_waits_for_the_search_and_takes_the_longest_seed_first():
    from rankwise.grid.cells import Part
    from rankwise.grid.plan import simulate

    a = [Part("a", "trial", 1), Part("a", "trial", 2), Part("a", "seed", 1), Part("a", "merge", 0)]
    b = [Part("b", "seed", 1), Part("b", "seed", 2), Part("b", "merge", 0)]
    seconds = {"a/trial1": 10, "a/trial2": 10, "a/seed1": 30, "a/merge": 1,
               "b/seed1": 20, "b/seed2": 20, "b/merge": 1}
    # 2 workers: trials 0-10 on both, then a/seed1 (longest) and b/seed1 from 10, b/seed2 30-50,
    # a's merge at 40, b's merge at 50-51
    assert simulate(a + b, seconds, 2) == 51
    assert simulate(a + b, seconds, 1) == sum(seconds.values())


def test_a_running_seed_s_eta_is_its_own_steps_left_times_its_step_time(tmp_path):
    from rankwise.grid.cells import Cell, Part
    from rankwise.grid.plan import Estimator

    est = {"epochs": 1, "max_steps": None, "batch_size": 10, "eval_batch_size": 10, "max_train_samples": 1000,
           "max_eval_samples": 0, "max_seq_length": 64, "dataset": "glue", "subset": "sst2", "data_dir": None,
           "max_batches": None, "measure": False, "timed_batches": 0, "n_lengths": 0, "repeats": 0, "method": "lora"}
    cell = Cell("r", "T", "proposed", [], {"run_id": "r"}, "full", seeds=[1, 2], estimate=est)
    probe = {"s_per_step": 1.0, "s_per_eval_batch": 0.5, "load_s": 5.0}
    estimator = Estimator({"r": cell}, tmp_path, probe)
    seed1 = Part("r", "seed", 1)
    assert estimator.seconds(seed1) == 5.0 + 100 * 1.0  # before it runs: the probe's step time
    (tmp_path / "r" / "seed1").mkdir(parents=True)
    (tmp_path / "r" / "seed1" / "progress.json").write_text(json.dumps(
        {"step": 40, "total_steps": 100, "s_per_step": 2.0, "updated_at": time.time()}))
    assert estimator.remaining(seed1, elapsed=90.0) == 60 * 2.0  # its own rate from its first steps
    assert estimator.seconds(Part("r", "seed", 2)) == 5.0 + 100 * 2.0  # the queued seed learns from it


def test_several_tasks_are_compared_again_in_the_experiment_s_family(tmp_path, fake_evaluate):
    """Two tasks: each task's comparison runs in the family of the comparison of all runs; one
    task: the overall comparison is the task's (the same runs, the same family), written once and
    copied into the task's folder."""
    def finished_grid(tasks):
        cells = [Cell(f"r-{t}-{i}", t, "proposed", [], {"run_id": f"r-{t}-{i}"}, "full") for t in tasks for i in (1, 2)]
        for c in cells:
            (tmp_path / c.run_id).mkdir(parents=True, exist_ok=True)
            (tmp_path / c.run_id / "metrics.json").write_text(json.dumps({"status": "complete", "mode": "full"}))
        grid = Grid(cells, ScriptedLauncher({}), GridState(tmp_path / "grid.json", "tok", []), tmp_path, "tok",
                    1, compare=True, trial=False)
        grid.run_final = {c.run_id: "complete" for c in cells}
        return grid

    def family_of(task):
        return json.loads((tmp_path / "comparison" / task / "aggregated_metrics.json").read_text())["holm_family"]

    assert finished_grid(["A", "B"]).compare_all().result["status"] == "complete"
    overall = str(tmp_path / "comparison" / "aggregated_metrics.json")
    assert family_of("A") == overall and family_of("B") == overall
    shutil.rmtree(tmp_path / "comparison")
    shutil.rmtree(tmp_path / "grid" / "logs")
    grid = finished_grid(["A"])
    assert grid.compare_all().result["status"] == "complete" and family_of("A") is None
    assert grid.state.comparisons["A"]["status"] == "complete"
    for name in ("aggregated_metrics.json", "summary.md"):
        assert (tmp_path / "comparison" / "A" / name).read_bytes() == (tmp_path / "comparison" / name).read_bytes()
    logs = sorted(p.name for p in (grid.grid_dir / "logs").glob("comparison-*.log"))
    assert logs == ["comparison-all.log"]  # one evaluate call


def test_probes_run_side_by_side_with_their_slot_s_threads_and_name_a_broken_key(tmp_path, fake_glue):
    """Probe processes fork from the grid's preloaded server, then take their slot: its cores
    and its thread count (torch was imported before the slot was known)."""
    from rankwise.grid.launchers import thread_env, usable_cores
    from rankwise.grid.probe import run_probes

    cores = usable_cores()
    args = [f"run={LORA}", f"results_dir={tmp_path}", "mode=full", *tiny(fake_glue)]
    slots = [{"cores": cores[:1], "env": thread_env(1)}, {"cores": cores[-2:], "env": thread_env(len(cores[-2:]))}]
    ok, other, broken = run_probes([(args, slots[0]), (args, slots[1]), ([*args, "training.epochz=1"], slots[0])])
    assert ok["threads"] == 1 and ok["cores"] == cores[:1] and ok["s_per_step"] > 0 and ok["s_per_eval_batch"] > 0
    assert other["threads"] == len(cores[-2:]) and other["s_per_step"] > 0
    assert "training.epochz" in broken["error"] and "s_per_step" not in broken
    assert not list(tmp_path.iterdir())  # a probe writes nothing into the results folder


def test_a_layout_probe_is_kept_per_machine_and_run_config(tmp_path):
    from rankwise.grid.cli import probe_key, read_probe, remember_probe

    path = tmp_path / "grid-probes.json"
    key = probe_key(["run=x", "results_dir=/a", "training.epochs=1"], [0, 1])
    assert key == probe_key(["run=x", "results_dir=/elsewhere", "training.epochs=1"], [0, 1])
    assert read_probe(path, key) is None
    remember_probe(path, key, {"chosen": {"workers": 2, "threads": 1}})
    remember_probe(path, probe_key(["run=y"], [0, 1]), {"chosen": {"workers": 1, "threads": 2}})
    assert read_probe(path, key) == {"chosen": {"workers": 2, "threads": 1}}
    assert read_probe(path, probe_key(["run=x", "training.epochs=2"], [0, 1])) is None  # another run
    assert read_probe(path, probe_key(["run=x", "training.epochs=1"], [0])) is None  # other cores
