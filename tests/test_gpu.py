"""The GPU path: mixed-precision training steps of every method, the spectral family's sparse
vs dense kernels, GradScaler's skipped steps and a 2-process NCCL run.

Marked ``gpu`` (deselected by default; ``pytest -m gpu``). They run on ``cuda`` unless
``RANKWISE_TEST_DEVICE=cpu``, which ``scripts/gpu_check.sh --device cpu`` sets so the same
tests run (in float32) on a machine without a GPU; a default-suite test runs that fallback
(tests/test_gpu_check_script.py). The bf16/fp16 contract of every method runs in the default
suite on CPU autocast (tests/test_mixed_precision.py), and gpu_check.sh runs it on CUDA too.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rankwise.methods import AdapterSettings, cost_reference, model_section, registered_methods

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("RANKWISE_TEST_DEVICE", "cuda")
QUICK = os.environ.get("RANKWISE_TEST_QUICK") == "1"
MODELS = ["tiny-bert"] if QUICK else ["tiny-bert", "tiny-deberta"]
# every registered method: rank 4, alpha 8 where it takes the adapter settings, else its defaults;
# AdaLoRA allocates from the first step
SETTINGS = AdapterSettings(rank=4, lora_alpha=8.0, dropout=0.1)
ADAPTER_EXTRA = {"adalora": {"tinit": 0, "tfinal": 1, "deltaT": 1}}
METHODS = [cost_reference()[0]] if QUICK else list(registered_methods())
PRECISIONS = ["bf16", "fp16"] if DEVICE == "cuda" else ["fp32"]


@pytest.fixture(autouse=True)
def _need_device():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (RANKWISE_TEST_DEVICE=cpu runs the CPU fallback)")


def make_trainer(tmp_path: Path, glue: Path, model: str, method: str, precision: str, lr: float = 1e-3):
    from rankwise.config.loader import load_job
    from rankwise.training.loop import Trainer

    over = [f"run=minilm-sst2-lora", f"results_dir={tmp_path}", f"model.name={model}",
            f"dataset.data_dir={glue}", "dataset.subset=sst2", "dataset.max_train_samples=64",
            "training.batch_size=16", f"training.learning_rate={lr}", f"device={DEVICE}",
            "training.warmup_ratio=0.0", "training.lr_scheduler=constant"]
    if precision in ("bf16", "fp16"):
        over.append(f"training.{precision}=true")
    job = load_job(over)
    d = dict(job.run_dict)
    d["model"] = model_section(method, SETTINGS, d["model"])
    if d["model"]["adapter"] is not None:
        d["model"]["adapter"].update(ADAPTER_EXTRA.get(d["model"]["adapter"]["type"], {}))
    job = job.with_run(d)
    torch.manual_seed(0)
    tr = Trainer(job, 0, tmp_path / f"{model}-{method}-{precision}")
    batch = next(tr.calibration_batches())
    tr.method.calibrate(tr.model, [batch], tr.loss_fn)  # importance weights; a no-op elsewhere
    tr.method.prepare_training(tr.model, 10)
    return tr, batch


def eval_loss(tr, batch) -> float:
    tr.model.eval()
    with torch.no_grad():
        loss = float(tr.loss_fn(tr.model, batch))
    tr.model.train()
    return loss


def train_on(tr, batch, steps: int) -> list[float]:
    tr.model.train()
    return [float(sum(tr.train_step(batch).values())) for _ in range(steps)]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_mixed_precision_step_is_finite_learns_and_matches_float32(tmp_path, fake_glue, model, method,
                                                                   precision):
    tr, batch = make_trainer(tmp_path, fake_glue, model, method, precision)
    if precision != "fp32":
        assert tr.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    before = eval_loss(tr, batch)
    losses = train_on(tr, batch, 8)  # fp16: the GradScaler may skip the first steps
    after = eval_loss(tr, batch)
    assert all(math.isfinite(x) for x in [before, after, *losses])
    assert after < before, (before, after)
    if precision == "fp32":
        return
    ref, ref_batch = make_trainer(tmp_path / "fp32", fake_glue, model, method, "fp32")
    ref_before = eval_loss(ref, ref_batch)
    train_on(ref, ref_batch, 8)
    ref_after = eval_loss(ref, ref_batch)
    tol = 0.02 if precision == "fp16" else 0.05  # bf16 keeps 8 mantissa bits
    assert before == pytest.approx(ref_before, rel=tol, abs=tol)
    assert after == pytest.approx(ref_after, rel=4 * tol, abs=4 * tol)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["tabs"] if QUICK else ["tabs", "cbsp", "bhsp"])
def test_sparse_and_dense_spectral_paths_agree(tmp_path, fake_glue, model, method):
    """The CSR (SDDMM + SpMM) path against the dense-masked path: outputs and the gradients
    of the spectral parameters, same gates (evaluation mode)."""
    from rankwise.bench.inference import set_spectral_path
    from rankwise.runtime import model_inputs

    tr, batch = make_trainer(tmp_path, fake_glue, model, method, "fp32")
    tr.model.eval()
    inputs = model_inputs(batch, tr.device)
    results = {}
    for path in ("sparse", "dense"):
        set_spectral_path(tr.model, path)
        tr.model.zero_grad(set_to_none=True)
        out = tr.model(**inputs).logits
        out.float().square().sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters()
                 if p.grad is not None and ("P_U" in n or "P_V" in n)}
        results[path] = (out.detach(), grads)
    (o_s, g_s), (o_d, g_d) = results["sparse"], results["dense"]
    torch.testing.assert_close(o_s, o_d, rtol=1e-4, atol=1e-5)
    assert g_s and set(g_s) == set(g_d)
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-3, atol=1e-5, msg=name)


def test_gradscaler_skips_an_overflowing_step(tmp_path, fake_glue):
    """fp16: an inf gradient skips the optimiser step (weights unchanged) and halves the scale;
    the next finite step updates the weights."""
    if DEVICE != "cuda":
        pytest.skip("GradScaler is enabled only for fp16 on CUDA")
    tr, batch = make_trainer(tmp_path, fake_glue, "tiny-bert", "lora", "fp16")
    params = [p for p in tr.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    scale = tr.scaler.get_scale()
    tr.forward_backward(batch)
    params[0].grad.view(-1)[0] = float("inf")
    try:
        tr._optimizer_step()
    except Exception as exc:  # the loop may report the skipped step; it must not update
        pytest.fail(f"an overflowing fp16 step must be skipped, not raise: {exc}")
    assert all(torch.equal(p, s) for p, s in zip(params, start))
    assert tr.scaler.get_scale() == scale * 0.5
    tr.train_step(batch)
    assert any(not torch.equal(p, s) for p, s in zip(params, start))


def test_two_nccl_processes_train(tmp_path, fake_glue):
    if DEVICE != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    args = ["run=minilm-sst2-lora", f"results_dir={tmp_path}", "model.name=tiny-bert",
            f"dataset.data_dir={fake_glue}", "dataset.subset=sst2", "training.epochs=1",
            "training.batch_size=16", "device=cuda", "training.bf16=true",
            "training.inference_measurement.enabled=false"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "rankwise.main", *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "minilm-sst2-lora" / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert metrics.get("processes") == 2
    assert math.isfinite(metrics["final"]["validation_accuracy"])
