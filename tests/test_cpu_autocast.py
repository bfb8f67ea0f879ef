"""CPU autocast as a run sees it, and the parts of each method kept in float32.

- ``training.cpu_autocast``: a CPU run of an ``fp16: true`` config records ``precision:
  float32`` without the switch and ``fp16`` with it (metrics.json and the summary's table).
- fp16 overflow through the real loop, nothing injected: a regression head's gradient at the
  default loss scale (2^16) overflows float16, the GradScaler skips and backs off, the run
  completes and metrics.json counts the skips.
- The spectral sparse and dense paths agree under autocast (outputs and gradients, bf16 and
  fp16, short and long inputs).
- What breaks without each float32 part: the gate sample's law, the controller's ranking
  ties, IW-LoRA's penalty in fp16, AdaLoRA's orthogonality penalty near I.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import draw_gate_parameters
from test_mixed_precision import _one_thread  # noqa: F401 (fixture)

FP16_MAX = torch.finfo(torch.float16).max


# --- the switch and the record ------------------------------------------------------------------
@pytest.mark.parametrize("switch", [False, True])
def test_cpu_run_of_an_fp16_config_records_the_precision_it_used(switch, tmp_path, fake_glue):
    from rankwise.main import main
    from rankwise.summary import metrics_section

    run = {"run_id": "fp16-on-cpu", "method": "baseline",
           "model": {"name": "tiny-bert", "adapter": {"type": "lora", "rank": 4}},
           "dataset": {"name": "glue", "subset": "sst2", "max_seq_length": 32,
                       "data_dir": str(fake_glue)},
           "training": {"epochs": 1, "batch_size": 16, "fp16": True, "cpu_autocast": switch,
                        "save_strategy": "no", "inference_measurement": {"enabled": False}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    assert main([f"run={path}", f"results_dir={tmp_path}", "mode=trial", "device=cpu"]) == 0
    metrics = json.loads((tmp_path / "fp16-on-cpu" / "metrics.json").read_text())
    assert metrics["config"]["training"]["fp16"] is True and metrics["precision_requested"] == "fp16"
    assert metrics["precision"] == ("fp16" if switch else "float32")
    assert metrics["autocast_device"] == ("cpu" if switch else None)
    report = {"by_task": {"sst2": {"primary_metric": "validation_accuracy"}},
              "tasks": {"fp16-on-cpu": "sst2"}}
    header, _, row = metrics_section(report, [metrics])[2:5]
    assert header.split(" | ")[-1] == "precision |" and row.endswith(f"| {metrics['precision']} |")


def test_cpu_autocast_needs_a_half_precision():
    from rankwise.config.schema import parse_run_config
    from rankwise.errors import ConfigError

    with pytest.raises(ConfigError, match="training.cpu_autocast.*needs training.fp16 or training.bf16"):
        parse_run_config({"run_id": "t", "method": "baseline", "model": {"name": "tiny-bert"},
                          "training": {"cpu_autocast": True}})


def write_fake_stsb(root):
    """STS-B-shaped parquet files (64 train, 16 validation rows), similarity 0-5 in the text."""
    import numpy as np
    import pandas as pd
    from conftest import WORDS

    rng = np.random.default_rng(5)
    for split, n in (("train", 64), ("validation", 16)):
        rows = []
        for i in range(n):
            score = float(rng.integers(0, 11)) / 2
            cue = ["bad", "movie", "good"][min(2, int(score // 2))]
            pair = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))) + f" {cue}" for _ in "ab"]
            rows.append({"sentence1": pair[0], "sentence2": pair[1], "label": score, "idx": i})
        path = root / "stsb" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(path)
    return root


# --- fp16 overflow, for real ------------------------------------------------------------------------
def test_fp16_overflow_is_skipped_counted_and_the_run_completes(tmp_path):
    """STS-B (regression, labels 0-5) on tiny BERT in fp16 at the GradScaler's default scale:
    ∂(scaled MSE)/∂logit = 2^16 · 2 (ŷ − y) / batch reaches ~8e4 for a label of 5 and ŷ ≈ 0,
    beyond float16's 65504, so the first steps' gradients are inf (computed here from the
    float32 logits, independently of the scaler). The scaler skips them and halves its scale
    until the gradients fit; the skipped steps advance nothing and are counted in metrics.json,
    and the run trains to a finite loss."""
    from rankwise.config.loader import load_job
    from rankwise.main import prepare_run_dir
    from rankwise.runner import execute
    from rankwise.runtime import model_inputs
    from rankwise.training.loop import Trainer

    glue = write_fake_stsb(tmp_path / "glue")
    job = load_job(["run=minilm-sst2-lora", f"results_dir={tmp_path / 'results'}", "model.name=tiny-bert",
                    f"dataset.data_dir={glue}", "dataset.subset=stsb", "dataset.max_seq_length=32",
                    "training.batch_size=8", "training.epochs=1", "training.fp16=true",
                    "training.cpu_autocast=true", "training.save_strategy=no", "device=cpu",
                    "training.log_every_n_steps=1", "training.inference_measurement.enabled=false",
                    "training.seeds=[0]", "optuna.metric_name=validation_pearson"])
    probe = Trainer(job, 0, tmp_path / "probe")
    batch = next(probe.epoch_batches(0))[0]
    probe.model.eval()
    with torch.no_grad():
        pred = probe.model(**model_inputs(batch, probe.device)).logits.squeeze(-1)
    grad_at_logits = 2.0**16 * 2 * (pred - batch["labels"]).abs() / len(pred)
    assert float(grad_at_logits.max()) > FP16_MAX  # the reason the first step must overflow

    execute(job, prepare_run_dir)
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    history = (job.run_dir / "seed0" / "history.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, history) if "loss" in r]
    skipped = metrics["amp_skipped_steps"]
    assert metrics["precision"] == "fp16" and metrics["status"] == "complete"
    assert skipped >= 1, "the overflow was not skipped"
    assert steps == list(range(1, 8 - skipped + 1))  # 8 batches, the skipped ones not counted
    assert math.isfinite(metrics["final"]["validation_loss"])


# --- spectral sparse = dense under autocast ---------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("length", [9, 200])
def test_spectral_sparse_and_dense_paths_agree_under_autocast(precision, length, tiny_bert):
    """TABS on tiny BERT in evaluation mode (binary gates, some open, some shut): the CSR
    path (float32 kernels) and the dense-masked path (autocast's dtype) give the same logits
    and P_U, P_V gradients within half precision's rounding; the float32 dense path is the
    reference both are held to. fp16 gradients are taken at the GradScaler's default scale
    (2^16), as in training: unscaled, these (~1e-7) would flush to zero in float16."""
    from test_method_contract import build

    from rankwise.bench.inference import set_spectral_path

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    backbone, _ = tiny_bert
    _, model = build("tabs", "tiny-bert", backbone)
    draw_gate_parameters(model, seed=1, std=1.5)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for n, p in model.named_parameters():
            if "P_U" in n or "P_V" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0

    scale = 2.0**16 if precision == "fp16" else 1.0  # as the GradScaler scales fp16 backwards

    def run(path: str, amp: bool):
        set_spectral_path(model, path)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            out = model(input_ids=ids, attention_mask=mask).logits.float()
        (scale * out.square().sum()).backward()
        return out.detach(), torch.cat([p.grad.flatten() / scale for n, p in model.named_parameters()
                                        if p.grad is not None and ("P_U" in n or "P_V" in n)])

    (o_ref, g_ref), (o_s, g_s), (o_d, g_d) = run("dense", False), run("sparse", True), run("dense", True)
    atol = {"bf16": 5e-3, "fp16": 1e-3}[precision]  # measured ≤ 1/4 of these
    rtol = {"bf16": 0.05, "fp16": 0.01}[precision]
    for out, grad in ((o_s, g_s), (o_d, g_d)):
        torch.testing.assert_close(out, o_ref, rtol=0, atol=atol)
        assert (grad - g_ref).norm() <= rtol * g_ref.norm()
    torch.testing.assert_close(o_s, o_d, rtol=0, atol=atol)
    assert (g_s - g_d).norm() <= rtol * g_ref.norm()


# --- what breaks without the float32 parts ----------------------------------------------------------
def half_precision_sample(gate, logits: torch.Tensor, generator) -> torch.Tensor:
    """HardConcreteGate.sample as it would be in the logits' half dtype (what gates.py avoids)."""
    u = torch.rand(logits.shape, dtype=logits.dtype, generator=generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / gate.beta)
    return (s * (gate.zeta - gate.gamma) + gate.gamma).clamp(0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_sampled_in_half_precision_never_reopens_a_shut_gate(dtype):
    """At log α = −10 the closed form gives P(g ≠ 0) = 2.2e-4 (59 of 2^18 samples); the float32
    sample keeps that law (the budget penalty and the training open rate rely on it). In half
    precision u has 8 (bf16) or 11 (fp16) bits, the logistic noise stops near 5.5 or 7.6, and
    the gate never opens."""
    from mask_stats import assert_binomial

    from rankwise.methods.spectral.gates import HardConcreteGate

    gate, n = HardConcreteGate(), 2**18
    logits = torch.full((n,), -10.0, dtype=dtype)
    p = float(gate.prob_open(torch.tensor(-10.0)))
    kept = gate.sample(logits, generator=torch.Generator().manual_seed(0))
    assert_binomial(int((kept > 0).sum()), n, p)
    half = half_precision_sample(gate, logits, torch.Generator().manual_seed(0))
    assert int((half > 0).sum()) == 0 < n * p - 5 * math.sqrt(n * p)


def test_controller_logits_in_float32_do_not_tie_under_bf16():
    """TABS's token controller over 512 tokens × 8 directions under bf16 autocast returns
    float32 logits without ties (as in float32); the same MLP in bf16 ties hundreds of them,
    and the budget projection's topk would break those ties by position."""
    from rankwise.methods.spectral.controllers import TokenController

    torch.manual_seed(0)
    controller = TokenController(d_in=32, hidden=8, rank=8)
    x = torch.randn(1, 512, 32)
    valid = torch.ones(1, 512, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = controller(x, valid)
        mlp = controller.mlp
        half = mlp.w2(torch.relu(mlp.w1(x)))  # what autocast would do to the MLP
    reference = controller(x, valid)
    assert logits.dtype == torch.float32 and half.dtype == torch.bfloat16
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
    ties = {name: t.numel() - t.unique().numel() for name, t in (("float32", logits), ("bf16", half))}
    assert ties["bf16"] > 10 * max(ties["float32"], 10), ties


def test_iw_lora_penalty_survives_fp16_for_a_young_b():
    """||scale · B A||_F² with B entries ~1e-5 (B after its first steps from 0): under fp16
    autocast the Gram products underflow and the penalty computed naively is exactly 0;
    ``delta_sq_norm`` (float32 inside autocast) matches float64."""
    from rankwise.methods.iw_lora import delta_sq_norm

    g = torch.Generator().manual_seed(0)
    a, b = 0.2 * torch.randn(4, 32, generator=g), 1e-5 * torch.randn(32, 4, generator=g)
    reference = float(delta_sq_norm(a.double(), b.double(), 2.0))
    with torch.autocast("cpu", dtype=torch.float16):
        naive = 4.0 * ((b.T @ b) * (a @ a.T)).sum()
        kept = delta_sq_norm(a, b, 2.0)
    assert float(naive) == 0.0 < reference
    assert kept.dtype == torch.float32 and float(kept) == pytest.approx(reference, rel=1e-5)


def test_adalora_orthogonality_penalty_near_identity_under_bf16(tiny_bert):
    """Nearly orthogonal factors (orthonormal + 1e-4 perturbations): the penalty in bf16 rounds
    the deviation to steps of 2^-7; ``orthogonality_penalty`` under autocast equals its
    float32 value."""
    from test_method_contract import build

    from rankwise.methods.adalora import orthogonality_penalty

    backbone, _ = tiny_bert
    _, model = build("adalora", "tiny-bert", backbone)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                q, _ = torch.linalg.qr(torch.randn(max(p.shape), min(p.shape), generator=g))
                q = q if p.shape[0] >= p.shape[1] else q.T
                p.copy_(q + 1e-4 * torch.randn(p.shape, generator=g))
    reference = float(orthogonality_penalty(model).detach())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kept = orthogonality_penalty(model)
        naive = []
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                gram = p @ p.T if "lora_A" in n else p.T @ p
                naive.append(torch.linalg.matrix_norm(gram.float() - torch.eye(gram.shape[0])))
    naive_value = float(torch.stack(naive).mean())
    assert kept.dtype == torch.float32 and float(kept) == pytest.approx(reference, rel=1e-5)
    assert abs(naive_value - reference) > 0.2 * reference, (naive_value, reference)
