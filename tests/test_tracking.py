"""W&B as a results channel, offline (no network): the run is identified by the run id, holds
the resolved config, every final metric, the step logs and the run's status. Skips without
the optional ``wandb`` package (``pip install -e '.[wandb]'``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb

from rankwise.main import main

RUN = "comparative-1-DeBERTaV3-base-86-M--GLUE-MNLI"
BLOCK = 32768  # the .wandb file is a LevelDB-style log of protobuf Records in 32 KiB blocks


def read_records(path: Path) -> list[pb.Record]:
    """Decode a ``run-<id>.wandb`` file: a 7-byte header, then chunks (crc32, length, type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, partial = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            records.append(chunk)
        elif kind == 2:  # FIRST
            partial = chunk
        elif kind == 3:  # MIDDLE
            partial += chunk
        elif kind == 4:  # LAST
            records.append(partial + chunk)
        elif kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
    return [pb.Record.FromString(c) for c in records]


def offline_run(run_dir: Path) -> dict:
    """Run id, config, merged summary, history rows and exit code of the last offline run."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}"
    out = {"run_id": None, "config": {}, "summary": {}, "history": [], "exit_code": None}
    for rec in read_records(files[-1]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            out["resume"] = rec.run.resumed
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "summary":
            out["summary"].update({u.key: json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def args(results: Path, glue: Path, *extra: str) -> list[str]:
    return [f"run={RUN}", f"results_dir={results}", "mode=full", "model.name=tiny-bert",
            f"dataset.data_dir={glue}", "dataset.subset=rte", "dataset.splits.validation=validation",
            "training.fp16=false", "optuna.n_trials=0", "training.epochs=1",
            "training.batch_size=32", "training.log_every_n_steps=1",
            "training.inference_measurement.lengths=[16]", "wandb.mode=offline", *extra]


@pytest.fixture
def no_network(monkeypatch):
    # Any attempt to reach a server would fail at once (nothing listens on port 9).
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_offline_run_holds_id_config_final_metrics_history_and_status(tmp_path, fake_glue, no_network):
    assert main(args(tmp_path, fake_glue)) == 0
    run_dir = tmp_path / RUN
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run = offline_run(run_dir)
    assert run["run_id"] == RUN
    config = run["config"]
    assert config["training"] == metrics["config"]["training"]
    assert config["dataset"] == metrics["config"]["dataset"]
    assert config["job"]["mode"] == "full" and config["job"]["wandb"]["mode"] == "offline"
    summary = run["summary"]
    assert summary["status"] == "complete"
    numeric = {k: v for k, v in metrics["final"].items() if isinstance(v, (int, float))}
    assert numeric and {k: summary[k] for k in numeric} == pytest.approx(numeric)
    losses = [row["seed42/loss"] for row in run["history"] if "seed42/loss" in row]
    steps = [json.loads(line) for line in (run_dir / "seed42" / "history.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([s["loss"] for s in steps if "loss" in s])
    assert run["exit_code"] == 0

    # the same run id again continues the same W&B run (resume="allow")
    assert main(args(tmp_path, fake_glue, "resume=false")) == 0
    again = offline_run(run_dir)
    assert again["run_id"] == RUN and again["summary"]["status"] == "complete"


def test_failed_run_is_marked_failed_in_wandb(tmp_path, fake_glue, no_network):
    code = main(args(tmp_path, fake_glue, "training.learning_rate=1e30", "training.optimizer=sgd",
                     "training.max_grad_norm=null"))
    assert code == 5
    run = offline_run(tmp_path / RUN)
    assert run["summary"]["status"] == "failed" and "non-finite" in run["summary"]["error"]
    assert run["exit_code"] == 1
