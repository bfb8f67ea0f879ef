"""Inference measurements: latency statistics, adapter FLOPs against FlopCounterMode, the
post-training measurement pass of a run, and ``bench inference`` end to end on tiny models."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import draw_gate_parameters

from rankwise.config.schema import parse_run_config
from rankwise.errors import ConfigError
from rankwise.measure.adapter_flops import (
    forward_cost,
    lora_target_costs,
    measured_flops,
)
from rankwise.measure.after_training import COST_KEYS, HEADLINE_KEYS, TIMING_KEYS
from rankwise.measure.inputs import token_stream_batch
from rankwise.measure.latency import LatencyStats, measure_latency, measure_latency_cycled
from rankwise.methods import build_method
from rankwise.methods.spectral import spectral_layers
from rankwise.methods.targets import resolve_target_modules


# --- latency ------------------------------------------------------------------------------------
def test_latency_statistics_from_an_injected_clock():
    durations = [0.001, 0.002, 0.003, 0.100]  # seconds of the 4 timed calls
    events: list[str] = []
    state = {"now": 0.0, "calls": 0}

    def fn():
        state["calls"] += 1
        events.append("fn")
        if state["calls"] > 2:  # the 2 warm-up calls take no clock time and are not timed
            state["now"] += durations[state["calls"] - 3]

    def clock():
        events.append("clock")
        return state["now"]

    stats = measure_latency(fn, warmup=2, repeats=4, clock=clock,
                            synchronize=lambda: events.append("sync"))
    assert state["calls"] == 6
    # computed by hand: mean 26.5 ms; median (2 + 3) / 2; p99 at rank 0.99·3 = 2.97 between
    # 3 ms and 100 ms: 3 + 0.97 · 97 = 97.09 ms
    assert stats.n == 4
    assert stats.mean_ms == pytest.approx(26.5)
    assert stats.p50_ms == pytest.approx(2.5)
    assert stats.p99_ms == pytest.approx(97.09)
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 100.0))
    # every timed call: synchronise, read clock, call, synchronise, read clock
    timed = events[events.index("clock"):]
    assert timed == ["clock", "fn", "sync", "clock"] + ["sync", "clock", "fn", "sync", "clock"] * 3
    assert events[:4] == ["fn", "fn", "sync", "sync"]


def test_cycled_latency_times_each_input_in_turn_with_an_injected_clock():
    durations = [0.010, 0.020, 0.030]  # seconds per call of input 0, 1, 2
    calls: list[int] = []
    state = {"now": 0.0}

    def make(i):
        def fn():
            calls.append(i)
            state["now"] += durations[i]
        return fn

    stats = measure_latency_cycled([make(i) for i in range(3)], warmup=2, timed=100,
                                   clock=lambda: state["now"])
    assert calls[:2] == [0, 1]  # warm-up, untimed
    timed = calls[2:]
    assert timed == [(2 + k) % 3 for k in range(100)]
    assert stats.n == 100
    ms = np.array([durations[i] * 1e3 for i in timed])
    # by hand: 34 calls of input 2 (30 ms), 33 each of inputs 0 and 1 -> mean 20.1 ms
    assert stats.mean_ms == pytest.approx(ms.mean()) == pytest.approx((33 * 10 + 33 * 20 + 34 * 30) / 100)
    assert stats.p50_ms == pytest.approx(20.0)
    assert stats.p99_ms == pytest.approx(30.0)
    with pytest.raises(ValueError):
        measure_latency_cycled([], warmup=0, timed=1)


def test_latency_statistics_need_samples():
    with pytest.raises(ValueError):
        LatencyStats.from_seconds([])
    with pytest.raises(ValueError):
        measure_latency(lambda: None, warmup=0, repeats=0)


def test_token_stream_batch_fills_full_rows_without_padding():
    batch = token_stream_batch([[2, 7, 3], [2, 8, 9, 3]], batch_size=2, length=5)
    assert batch["input_ids"].tolist() == [[2, 7, 3, 2, 8], [9, 3, 2, 7, 3]]
    assert batch["attention_mask"].all()


# --- FLOPs against FlopCounterMode ------------------------------------------------------------
def wrapped(adapter: dict, backbone):
    cfg = parse_run_config({"run_id": "t", "method": "baseline",
                            "model": {"name": "tiny-bert", "adapter": adapter}})
    method = build_method(cfg)
    model = method.wrap(backbone, resolve_target_modules(backbone)).eval()
    return method, model


def unpadded(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def extra_flops_counted(model, reference, inputs) -> float:
    """(FLOPs of the adapted model − FLOPs of the frozen backbone) per example, counted."""
    with torch.no_grad():
        adapted = measured_flops(model, lambda: model(**inputs))
        base = measured_flops(reference, lambda: reference(**inputs))
    return (adapted - base) / inputs["input_ids"].shape[0]


@pytest.mark.parametrize(("adapter", "rank"), [
    ({"type": "lora", "rank": 4, "dropout": 0.0}, 4),
    ({"type": "adalora", "target_r": 2, "init_r": 6}, 6),  # compute rank is init_r
])
def test_lora_family_analytic_flops_match_flop_counter(adapter, rank, tiny_bert):
    backbone, _ = tiny_bert
    reference = copy.deepcopy(backbone).eval()
    method, model = wrapped(adapter, backbone)
    costs = lora_target_costs(model)
    assert len(costs) == 12 and {c.rank for c in costs.values()} == {rank}
    # tiny BERT: q, k, v, attention-output 32→32; intermediate 32→64; output 64→32; 2 layers
    per_token = 2 * 2 * rank * (4 * 64 + 96 + 96)
    inputs = unpadded()
    with torch.no_grad():
        cost = forward_cost(model, method, lambda: model(**inputs), inputs["attention_mask"])
    assert cost.source == "analytic" and cost.per_token_flops == per_token
    assert cost.adapter_flops == [12 * per_token, 12 * per_token]
    assert extra_flops_counted(model, reference, inputs) == cost.extra_flops_per_example
    if adapter["type"] == "adalora":  # masking triplets (E_i = 0) does not shrink compute
        with torch.no_grad():
            for name, module in model.named_modules():
                if hasattr(module, "lora_E"):
                    module.lora_E["default"][: rank - 2].zero_()
        assert extra_flops_counted(model, reference, inputs) == cost.extra_flops_per_example
    merged = copy.deepcopy(model).merge_and_unload().eval()
    merged_cost = forward_cost(merged, None, lambda: None, inputs["attention_mask"])
    assert merged_cost.source == "none" and merged_cost.extra_flops_per_example == 0
    assert extra_flops_counted(merged, reference, inputs) == 0


@pytest.mark.parametrize("kind", ["spectral", "bhsp", "cbsp", "tabs"])
def test_spectral_realised_flops_match_flop_counter(kind, tiny_bert):
    backbone, _ = tiny_bert
    reference = copy.deepcopy(backbone).eval()
    method, model = wrapped({"type": kind, "R": 4} | ({} if kind == "spectral" else {"budget": 2}),
                            backbone)
    draw_gate_parameters(model, seed=1, std=1.5)
    inputs = unpadded()
    with torch.no_grad():
        cost = forward_cost(model, method, lambda: model(**inputs), inputs["attention_mask"])
    assert cost.source == "realised" and cost.valid_tokens == [12, 12]
    assert 0 < cost.adapter_flops_per_example
    assert extra_flops_counted(model, reference, inputs) == cost.extra_flops_per_example
    assert (cost.histogram is None) == (kind == "spectral")
    assert (cost.budget_violations is None) == (kind == "spectral")


@pytest.mark.parametrize("projection", [True, False])
def test_budget_violations_are_zero_with_projection_on(projection, tiny_bert):
    backbone, _ = tiny_bert
    method, model = wrapped({"type": "tabs", "R": 4, "budget": 2, "budget_tokens": 3,
                             "projection": projection},
                            backbone)
    draw_gate_parameters(model, seed=0, std=2.0)  # far more than 3 pairs per sequence want to open
    inputs = unpadded(batch=3, length=64)
    with torch.no_grad():
        cost = forward_cost(model, method, lambda: model(**inputs), inputs["attention_mask"])
    if projection:
        assert cost.budget_violations == 0
        assert max(cost.adapter_flops) <= 3 * sum(l.cost_per_pair for l in spectral_layers(model).values())
    else:
        assert cost.budget_violations > 0


def test_measurement_config_is_validated():
    base = {"run_id": "t", "method": "baseline", "model": {"name": "tiny-bert"}}
    for key, value in (("repeats", 0), ("warmup", -1), ("batch_size", 0), ("lengths", [16, 0]),
                       ("lengths", []), ("figures", "yes"), ("timed_batches", 0)):
        run = copy.deepcopy(base) | {"training": {"inference_measurement": {key: value}}}
        with pytest.raises(ConfigError) as info:
            parse_run_config(run)
        assert info.value.key.startswith(f"training.inference_measurement.{key}")
    cfg = parse_run_config(base | {"training": {"inference_measurement": {"lengths": [8, 16]}}})
    assert cfg.training.inference_measurement.lengths == [8, 16]


# --- post-training measurement of real (tiny) runs --------------------------------------------
def run_file(tmp_path, run_id: str, adapter: dict) -> str:
    from rankwise.config.loader import packaged_configs

    d = yaml.safe_load((packaged_configs() / "runs" / "minilm-sst2-lora.yaml").read_text())
    d["run_id"] = run_id
    d["model"] = {"name": "tiny-bert", "adapter": adapter}
    d["dataset"].pop("max_train_samples")
    d["training"].update(epochs=1, log_every_n_steps=1)
    path = tmp_path / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


RUNS = {"tiny-lora": {"type": "lora", "rank": 8, "lora_alpha": 16},
        "tiny-tabs": {"type": "tabs", "R": 4, "budget": 2}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fake_glue):
    """A 1-epoch full-mode run of LoRA and of TABS on tiny BERT (checkpoints kept)."""
    from rankwise.main import main

    tmp = tmp_path_factory.mktemp("measure")
    results = tmp / "results"
    files = {}
    for run_id, adapter in RUNS.items():
        files[run_id] = run_file(tmp, run_id, adapter)
        assert main([f"run={files[run_id]}", f"results_dir={results}", "mode=full",
                     f"dataset.data_dir={fake_glue}"]) == 0
    return results, files


def eval_lengths(fake_glue) -> list[int]:
    import pandas as pd

    from rankwise.models import load_backbone

    _, tokenizer = load_backbone("tiny-bert", 2)
    rows = pd.read_parquet(fake_glue / "sst2" / "validation-00000-of-00001.parquet")
    return [len(ids) for ids in tokenizer(list(rows["sentence"]), truncation=True,
                                          max_length=64)["input_ids"]]


@pytest.mark.parametrize("run_id", list(RUNS))
def test_post_training_measurement_writes_the_documented_keys(run_id, trained, fake_glue):
    results, _ = trained
    metrics = json.loads((results / run_id / "metrics.json").read_text())
    final = metrics["final"]
    budgeted = run_id == "tiny-tabs"
    expected = set(HEADLINE_KEYS) - (set() if budgeted else {"budget_violations"})
    assert expected <= set(final), expected - set(final)
    assert ("budget_violations" in final) == budgeted
    assert 0 < final["latency_ms_p50"] <= final["latency_ms_p99"]
    assert final["latency_ms_mean"] > 0
    assert final["trainable_params_incl_controllers"] == metrics["params"]["trainable"]
    if budgeted:
        assert final["budget_violations"] == 0
        assert final["adapter_mflops_per_example"] == pytest.approx(
            final["validation_spectral_adapter_flops_per_example"] / 1e6)
        assert final["controller_mflops_per_example"] > 0
    else:  # analytic: Σ_k 2·r·(d_in + d_out) per token × mean real length of the eval set
        per_token = 2 * 2 * 8 * (4 * 64 + 96 + 96)
        assert final["adapter_mflops_per_example"] == pytest.approx(
            per_token * np.mean(eval_lengths(fake_glue)) / 1e6)
        assert final["controller_mflops_per_example"] == 0
    seed_dir = results / run_id / "seed42"
    report = json.loads((seed_dir / "inference.json").read_text())
    assert [(s["batch_size"], s["length"]) for s in report["shapes"]] == [(32, 32), (32, 64)]
    assert report["headline"] == {k: final[k] for k in report["headline"]}
    # the headline latency: 100 timed passes over the evaluation batches as evaluated
    timed = report["latency"]
    assert final["latency_n_timed"] == timed["n_timed"] == timed["latency_ms"]["n"] == 100
    n_eval = len(eval_lengths(fake_glue))
    assert timed["distinct_batches"] == math.ceil(n_eval / 32) and timed["warmup"] == 3
    lengths = eval_lengths(fake_glue)  # dynamic padding: each batch as long as its longest row
    assert timed["padded_lengths"] == [max(lengths[i:i + 32]) for i in range(0, n_eval, 32)]
    assert final["latency_ms_p99"] == timed["latency_ms"]["p99_ms"]
    assert final["position_mflops_per_forward"] == 0  # BERT: no shared position rows
    if budgeted:  # the training-time open rate next to the evaluation one
        assert final["open_gates_per_token"] == final["validation_spectral_open_gates_per_token"]
        assert 0 < final["train_expected_open_gates_per_token"] <= 4
        history = [json.loads(line) for line in (seed_dir / "history.jsonl").read_text().splitlines()]
        steps = [r for r in history if r.get("type") != "eval"]
        assert steps and all(0 < r["train_expected_open_gates_per_token"] <= 4 for r in steps)
        assert all(0 <= r["train_sampled_open_gates_per_token"] <= 4 for r in steps)
    else:
        assert not {"open_gates_per_token", "train_expected_open_gates_per_token"} & set(final)
    for shape in report["shapes"]:
        assert set(shape["latency_ms"]) >= {"mean_ms", "p50_ms", "p99_ms", "n"}
        assert shape["latency_ms"]["n"] == 5
        assert shape["examples"] == 32
    figures = results / run_id  # per-run figures: <run_id>_<topic>_seed<N> at the top
    assert (figures / f"{run_id}_flops_vs_length_seed42.png").stat().st_size > 0
    assert (figures / f"{run_id}_flops_vs_length_seed42.pdf").stat().st_size > 0
    assert (figures / f"{run_id}_gate_histogram_seed42.png").exists() == budgeted
    assert not list(seed_dir.glob("*.png"))
    if budgeted:
        assert report["budget_violations"]["total"] == 0
        assert sum(report["gate_histogram"]["counts"]) > 0
        # the measurement pass left the method's evaluation statistics alone
        gates = json.loads((seed_dir / "gates.json").read_text())
        assert gates["last_evaluation"]["histogram"] == report["gate_histogram"]["counts"]


@pytest.mark.parametrize(("adapter", "per_token"), [
    (None, 0),  # full fine-tuning: no adapter compute
    ({"type": "adalora", "target_r": 2, "init_r": 3}, 2 * 2 * 3 * (4 * 64 + 96 + 96)),
])
def test_post_training_measurement_of_full_ft_and_adalora(adapter, per_token, tmp_path, fake_glue):
    from rankwise.main import main

    path = run_file(tmp_path, "tiny-other", adapter)
    assert main([f"run={path}", f"results_dir={tmp_path / 'r'}", "mode=trial",
                 f"dataset.data_dir={fake_glue}", "training.inference_measurement.lengths=[16]"]) == 0
    metrics = json.loads((tmp_path / "r" / "tiny-other" / "metrics.json").read_text())
    final = metrics["final"]
    assert set(HEADLINE_KEYS) - {"budget_violations"} <= set(final)
    assert "budget_violations" not in final
    assert final["adapter_mflops_per_example"] == pytest.approx(
        per_token * np.mean(eval_lengths(fake_glue)) / 1e6)  # trial: 2 batches of 32 ≥ 40 rows
    report = json.loads((tmp_path / "r" / "tiny-other" / "seed42" / "inference.json").read_text())
    assert [(s["batch_size"], s["length"], s["latency_ms"]["n"]) for s in report["shapes"]] == [
        (32, 16, 3)]  # trial mode caps the timed passes at 3 per length
    assert final["latency_n_timed"] == report["latency"]["latency_ms"]["n"] == 10  # and 10 batches
    assert report["latency"]["distinct_batches"] <= 2  # the trial's evaluation batches
    assert report["evaluation"]["source"] == ("none" if adapter is None else "analytic")
    assert (tmp_path / "r" / "tiny-other" / "tiny-other_flops_vs_length_seed42.png").exists() == (
        adapter is not None)


def test_measurement_can_be_disabled(tmp_path, fake_glue):
    from rankwise.main import main

    path = run_file(tmp_path, "tiny-off", RUNS["tiny-lora"])
    assert main([f"run={path}", f"results_dir={tmp_path / 'r'}", "mode=trial",
                 f"dataset.data_dir={fake_glue}", "training.inference_measurement.enabled=false"]) == 0
    final = json.loads((tmp_path / "r" / "tiny-off" / "metrics.json").read_text())["final"]
    assert not {*TIMING_KEYS, "latency_n_timed"} & set(final)
    assert set(COST_KEYS) <= set(final)  # costs need no forward pass: always reported
    assert not (tmp_path / "r" / "tiny-off" / "seed42" / "inference.json").exists()


# --- bench inference --------------------------------------------------------------------------
def bench(*args) -> int:
    from rankwise.bench.__main__ import main

    return main(["inference", *args])


BENCH_KEYS = {"benchmark", "runs", "options", "reference", "variants", "position_limit", "skipped",
              "results", "ratios", "notes", "provenance", "seconds"}
ROW_KEYS = {"variant", "algorithm", "merged", "batch_size", "length", "latency_ms",
            "adapter_flops_per_example", "controller_flops_per_example", "extra_flops_per_example",
            "backbone_flops_per_example", "total_flops_per_example", "budget_violations",
            "open_gates_per_token", "flop_counter", "source", "examples", "spectral_inference_path",
            "open_pair_flops_per_example", "position_flops_per_forward", "per_forward_flops",
            "forward_flops", "sources"}


def test_bench_inference_on_trained_runs(trained, tmp_path):
    results, files = trained
    out = tmp_path / "bench"
    assert bench(f"run={files['tiny-tabs']}", f"run={files['tiny-lora']}", f"results_dir={results}",
                 "weights=trained", "lengths=[8,32,1024]", "batch_sizes=[1,2]", "max_tokens=32",
                 "warmup=1", "repeats=2", f"out={out}") == 0
    report = json.loads((out / "inference.json").read_text())
    assert set(report) == BENCH_KEYS
    labels = ["tiny-tabs", "tiny-lora", "tiny-lora+merged"]
    assert list(report["variants"]) == labels
    assert all(v["weights"]["source"] == "trained" for v in report["variants"].values())
    assert report["reference"] == "tiny-tabs"
    assert {(s["batch_size"], s["length"]) for s in report["skipped"]} == {
        (2, 32), (1, 1024), (2, 1024)}  # max_tokens, then tiny BERT's 512 positions
    shapes = {(r["batch_size"], r["length"]) for r in report["results"]}
    assert shapes == {(1, 8), (2, 8), (1, 32)}
    for row in report["results"]:
        assert set(row) == ROW_KEYS
        assert row["latency_ms"]["n"] == 2
        assert row["total_flops_per_example"] == row["backbone_flops_per_example"] + row["extra_flops_per_example"]
        if row["batch_size"] == 1:
            assert row["flop_counter"]["agrees"], row
        else:
            assert row["flop_counter"] is None
        if row["variant"] == "tiny-tabs":
            assert row["budget_violations"] == 0
        if row["variant"] == "tiny-lora+merged":
            assert row["extra_flops_per_example"] == 0
    assert set(report["ratios"]) == {"tiny-tabs/tiny-lora", "tiny-tabs/tiny-lora+merged"}
    merged = report["ratios"]["tiny-tabs/tiny-lora+merged"]
    assert len(merged) == 3 and all(r["extra_flops"] is None and r["total_flops"] > 1 for r in merged)
    for name in ("flops_vs_length", "latency_vs_length"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 0


def test_bench_inference_adapters_on_a_relative_position_model(tmp_path):
    out = tmp_path / "bench"
    assert bench("run=minilm-sst2-lora", "adapters=[tabs,cbsp,bhsp,lora]", "model.name=tiny-deberta",
                 "lengths=[16,600]", "batch_sizes=[1]", "warmup=0", "repeats=1", "spectral_path=both",
                 "reference=tabs", "lora_merge=unmerged", "device=cpu", f"out={out}") == 0
    report = json.loads((out / "inference.json").read_text())
    assert list(report["variants"]) == ["tabs", "tabs+dense", "cbsp", "cbsp+dense", "bhsp",
                                        "bhsp+dense", "lora"]
    assert report["variants"]["tabs+dense"]["spectral_inference_path"] == "dense"
    assert report["position_limit"] is None and report["skipped"] == []  # relative positions only
    assert all(v["weights"]["source"] == "fresh" for v in report["variants"].values())
    rows = {(r["variant"], r["length"]): r for r in report["results"]}
    assert rows[("bhsp", 600)]["open_gates_per_token"] == 8  # fresh BHSP: ⌊b⌋ = 8 of R = 16 open
    assert rows[("tabs", 600)]["budget_violations"] == 0
    assert rows[("tabs", 600)]["open_gates_per_token"] <= 8
    for length in (16, 600):
        for kind in ("tabs", "cbsp", "bhsp"):
            sparse, dense = rows[(kind, length)], rows[(f"{kind}+dense", length)]
            assert sparse["flop_counter"]["agrees"] and dense["flop_counter"]["agrees"]
            # same gates; the sparse path runs the open pairs, the dense one all R per token
            assert sparse["open_pair_flops_per_example"] == dense["open_pair_flops_per_example"]
            assert sparse["adapter_flops_per_example"] == sparse["open_pair_flops_per_example"]
            assert dense["adapter_flops_per_example"] == dense["extra_flops_per_example"] - dense[
                "controller_flops_per_example"] > sparse["adapter_flops_per_example"]
            assert 0 < sparse["position_flops_per_forward"] < dense["position_flops_per_forward"]
        # every method adapts DeBERTa's shared position rows (counted per forward); the flop
        # counter sees extra per example + those rows / batch
        assert rows[("lora", length)]["flop_counter"]["agrees"]
        assert rows[("lora", length)]["position_flops_per_forward"] > 0
    assert rows[("lora", 16)]["open_pair_flops_per_example"] is None


@pytest.mark.parametrize(("args", "key"), [
    (["lengths=[0]"], "lengths.0"),
    (["repeats=0"], "repeats"),
    (["reference=nope"], "reference"),
    (["adapters=[lora,nope]"], "adapters.1"),
    (["lora_merge=sometimes"], "lora_merge"),
])
def test_bench_inference_option_errors_name_the_key(args, key, capsys, tmp_path):
    code = bench("run=minilm-sst2-lora", "model.name=tiny-bert", "lengths=[8]", "repeats=1",
                 f"out={tmp_path}", *args)
    assert code == 2
    assert f"'{key}'" in capsys.readouterr().err
    assert not (tmp_path / "inference.json").exists()


def test_bench_inference_needs_a_run(capsys):
    assert bench("lengths=[8]") == 2
    assert "run=" in capsys.readouterr().err
