"""``bench train``: statistics, padding, option errors and one small interleaved run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rankwise.bench import train


def test_summary_statistics_against_numpy():
    totals = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.4, 0.8, 0.6, 1.0]
    recs = [{"total": t, "cpu": 2 * t, "forward": t / 2, "backward": t / 4} for t in totals]
    row = train.summarise("x", recs, [32] * len(totals))
    assert row["step_time_s_median"] == pytest.approx(np.median(totals))
    assert row["step_time_s_p90"] == pytest.approx(sorted(totals)[8])  # nearest rank of 10
    assert row["examples_per_s"] == pytest.approx(320 / sum(totals))
    assert row["step_cpu_time_s_median"] == pytest.approx(2 * np.median(totals))
    assert "cpu" not in row["breakdown_s_median"]
    assert row["breakdown_s_median"]["forward"] == pytest.approx(np.median(totals) / 2)
    assert row["breakdown_share_of_mean"]["backward"] == pytest.approx(0.25)


def test_pad_batch_pads_masked():
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([1])}
    out = train.pad_batch(batch, 5, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert out["labels"] is batch["labels"]


def test_unknown_method_names_the_key():
    from rankwise.bench.__main__ import main

    assert main(["train", "run=minilm-sst2-lora", "methods=[lora,nope]"]) == 2


def test_small_interleaved_run_with_hf_trainer(tmp_path, fake_glue, capsys):
    from rankwise.bench.__main__ import main

    out = tmp_path / "bt"
    rc = main(["train", "run=minilm-sst2-lora", "model.name=tiny-bert", f"dataset.data_dir={fake_glue}",
               f"results_dir={tmp_path}", "methods=[full_ft,lora]", "steps=2", "warmup=1",
               "profile_steps=1", "profile_top=3", "pad_to=24", f"out={out}"])
    assert rc == 0
    report = json.loads((out / "train.json").read_text())
    rows = {r["label"]: r for r in report["results"]}
    assert set(rows) == {"full_ft", "lora", train.HF_LABEL}
    for r in rows.values():
        assert r["timed_steps"] == 2 and r["examples_per_s"] > 0
        assert r["step_time_s_median"] <= r["step_time_s_p90"]
    lora = rows["lora"]
    phases = lora["breakdown_s_median"]
    assert set(phases) == set(train.PHASES) and phases["forward"] > 0 and phases["backward"] > 0
    ops = lora["profile_top_ops"]
    assert len(ops) == 3 and ops[0]["self_ms_per_step"] >= ops[2]["self_ms_per_step"] > 0
    assert lora["params"]["trainable"] < rows["full_ft"]["params"]["trainable"]
    assert report["batches"]["lengths"] == [24, 24]
    assert report["step_time_ratio_to_reference"]["lora"] == 1.0
    assert (out / "step_time.png").exists() and (out / "step_time.pdf").exists()
    assert "hf_trainer_peft_lora" in capsys.readouterr().out


def test_every_method_keeps_the_runs_rank_alpha_and_dropout(tmp_path):
    """``bench train methods=[...]`` turns one run into any registered method: those that take
    adapter settings keep the run's rank, alpha and dropout (e.g. lora, dora, pissa)."""
    from rankwise.config.loader import load_job
    from rankwise.methods import AdapterSettings, adapter_settings_of, registered_methods

    job = load_job(["run=minilm-sst2-lora", f"results_dir={tmp_path}", "model.adapter.rank=5",
                    "model.adapter.lora_alpha=7", "model.adapter.dropout=0.05"])
    taking = [n for n, e in registered_methods().items() if e.takes_adapter_settings]
    assert {"lora", "dora", "pissa", "iw_lora", "adalora"} <= set(taking)
    for name in registered_methods():
        run = train.method_variant(job, name).run
        assert run.algorithm == name
        if name in taking:
            assert adapter_settings_of(run.model.adapter) == AdapterSettings(5, 7.0, 0.05), name
    options = train.TrainBenchOptions(methods=["lora", "dora", "pissa", "dora_bernoulli"])
    options.validate("bench")
    assert train.method_variant(job, "dora_bernoulli").run.model.adapter.dropout_sampler == "bernoulli"


def test_the_table_script_runs_parse(tmp_path):
    """The methods × tasks table's rows beyond LoRA and Full FT (DoRA, PiSSA): the LoRA run
    with another ``model.adapter.type``, as scripts/glue_table_cpu.sh runs them."""
    import re
    from pathlib import Path

    from rankwise.config.loader import load_job

    script = (Path(__file__).resolve().parents[1] / "scripts" / "glue_table_cpu.sh").read_text()
    methods = re.search(r"for method in ([\w\s-]+); do", script).group(1).split()
    extra = [m for m in methods if m not in ("lora", "full-ft")]
    assert len(extra) >= 2
    for kind in extra:
        job = load_job(["run=minilm-sst2-lora", f"results_dir={tmp_path}", f"model.adapter.type={kind}",
                        "method=comparative-1"])
        assert job.run.algorithm == kind and job.run.model.adapter.rank == 8
