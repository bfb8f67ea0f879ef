"""The mixed-precision contract: every registered method × {bf16, fp16} × {tiny BERT, tiny
DeBERTa} trains through the real loop (:class:`~rankwise.training.loop.Trainer`: autocast,
GradScaler, unscale, clip, step, evaluation, checkpoint) under autocast, in the default suite.

The device is ``RANKWISE_TEST_DEVICE`` (default ``cpu``: torch's CPU autocast, switched on by
``training.cpu_autocast``; ``cuda``: the same tests on a GPU, as ``scripts/gpu_check.sh`` runs
them). Each case is checked against an independent reference, the float32 run of the same
method from the same state: same seed, the same perturbed parameters (so every adapter and
gate controller is away from its zero/identity init) and the same random numbers for dropout
and gate samples. Per case:

- the model's logits (evaluation and training mode) stay within ``LOGIT_ATOL`` of float32's;
- the loss terms, regularisers included, are float32 and within ``TERM_RTOL`` of float32's,
  even when the regulariser is computed inside the autocast block;
- the gradients of every adapter, controller and head parameter are finite and within
  ``GRAD_RTOL`` (relative to their norm) of float32's;
- a few steps lower the training objective (task loss + regularisers, same gate samples) on
  the batch they train on;
- the sampled gates keep the HardConcrete law the budget penalty assumes, when sampled from
  logits in the dtype autocast gives the gate source (gated spectral methods);
- the validation split evaluates under autocast to a finite loss near float32's;
- a checkpoint (GradScaler state included) resumes to the same model, and the resumed run's
  next step equals the uninterrupted run's.

Tolerances: the largest deviations from float32 measured over the 36 cases (on logits of
magnitude ≲ 0.04) are, bf16 / fp16: logits 3.4e-4 / 3.8e-5; loss terms and regularisers
3.7e-4 / 1.9e-5 relative; gradients 7.2e-3 / 1.6e-3 relative to their norm; the validation
loss after training 3.0e-3 (either). Each bound below leaves a margin of 5× or more.
Everything is seeded, so a case passes or fails the same way every time.

``RANKWISE_TEST_QUICK=1`` (``gpu_check.sh --quick``) keeps LoRA on tiny BERT only.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from mask_stats import assert_binomial
from test_method_contract import TOY, method_name, row  # noqa: F401 (fixture)

from rankwise.config.loader import load_job
from rankwise.methods import registered_methods
from rankwise.methods.base import is_head_parameter
from rankwise.runtime import model_inputs
from rankwise.training.loop import Trainer

DEVICE = os.environ.get("RANKWISE_TEST_DEVICE", "cpu")
QUICK = os.environ.get("RANKWISE_TEST_QUICK") == "1"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# bounds on |amp − float32| (bf16 keeps 8 significant bits, fp16 11); measured maxima above
LOGIT_ATOL = {"bf16": 2e-3, "fp16": 3e-4}
TERM_RTOL = {"bf16": 2e-3, "fp16": 2e-4}
GRAD_RTOL = {"bf16": 0.04, "fp16": 0.01}  # ||g_amp − g_32|| / ||g_32|| over all trained parameters
VALIDATION_LOSS_ATOL = 0.015
STEPS = 2  # optimizer steps on one batch after the compared first step
LR = 1e-2
METHODS = ["lora"] if QUICK else [*registered_methods(), TOY]
BACKBONES = ["tiny-bert"] if QUICK else ["tiny-bert", "tiny-deberta"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on matrices 32 wide a parallel region costs more than it saves, and
    on a CPU shared with other processes its threads wait for each other (measured: a tiny-BERT
    bf16 step 3-10× slower on two threads than on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_JOBS: dict[str, object] = {}  # precision -> Job (composing one costs more than a tiny step)
_DATA: dict[str, object] = {}  # backbone -> its tokenised TaskData, shared by every case


def make_trainer(folder, glue, method: str, alias: str, precision: str) -> Trainer:
    """A Trainer of ``method`` (a row of the contract matrix) on ``alias``, batch 8, constant
    learning rate, in ``precision`` (float32, bf16 or fp16; on the CPU through cpu_autocast),
    writing its checkpoints under ``folder``."""
    if precision not in _JOBS:
        over = ["run=minilm-sst2-lora", f"results_dir={folder}", f"dataset.data_dir={glue}",
                "dataset.max_train_samples=16", "dataset.max_eval_samples=16",
                "dataset.max_seq_length=32", "training.batch_size=8", "training.eval_batch_size=16", f"training.learning_rate={LR}",
                "training.warmup_ratio=null", "training.lr_scheduler=constant", f"device={DEVICE}",
                "training.inference_measurement.enabled=false", "training.save_total_limit=1"]
        if precision != "float32":
            over += [f"training.{precision}=true", "training.cpu_autocast=true"]
        _JOBS[precision] = load_job(over)
    job = _JOBS[precision]
    run = copy.deepcopy(job.run_dict)
    run["model"] = {"name": alias, "adapter": None, **row(method)}
    torch.manual_seed(0)
    trainer = Trainer(job.with_run(run), 0, folder / "seed0", data=_DATA.get(alias))
    _DATA.setdefault(alias, trainer.data)
    return trainer


def set_state(trainer: Trainer, batch) -> None:
    """The compared state: every trained parameter moved by seeded noise (LoRA's B and the
    spectral P_U, P_V leave zero), gate controllers drawn so that some gates open and some
    stay shut, the method calibrated (IW-LoRA) and prepared."""
    from conftest import draw_gate_parameters

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in trainer.model.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.device))
    draw_gate_parameters(trainer.model, seed=1, std=1.5)
    trainer.method.calibrate(trainer.model, [batch], trainer.loss_fn)
    trainer.calibrated = True
    trainer.method.prepare_training(trainer.model, trainer.total_steps)
    trainer.model.train()


def logits(trainer: Trainer, batch, train: bool, seed: int = 11) -> torch.Tensor:
    trainer.model.train(train)
    torch.manual_seed(seed)  # the same dropout masks and gate samples in every precision
    with torch.no_grad(), trainer._autocast():
        out = trainer.model(**model_inputs(batch, trainer.device)).logits.float()
    trainer.model.train()
    return out


def trained_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The gradients as the optimiser sees them (divided by the fp16 loss scale)."""
    scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else 1.0
    return {n: p.grad.detach().float() / scale for n, p in trainer.model.named_parameters()
            if p.requires_grad and p.grad is not None}


def gate_logit_dtype(trainer: Trainer, batch) -> torch.dtype | None:
    """The dtype of the gate logits the first gated layer's source returns under autocast in a
    training forward (None: no gated layer)."""
    from rankwise.methods.spectral import spectral_layers

    sources = [la.gate_source for la in spectral_layers(trainer.model).values() if la.gate_source is not None]
    if not sources:
        return None
    seen = []
    handle = sources[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        logits(trainer, batch, train=True)
    finally:
        handle.remove()
    return seen[0]


def trace(trainer: Trainer, batch) -> dict:
    """What the contract compares: logits in both modes, the first step's loss terms (the
    regularisers also computed inside the autocast block) and gradients, the losses of the
    following steps, and the validation metrics."""
    set_state(trainer, batch)
    out = {"eval_logits": logits(trainer, batch, train=False)}
    with trainer._autocast():  # the regularisers as a loss written inside this block would be
        torch.manual_seed(11)
        out["train_logits"] = trainer.model(**model_inputs(batch, trainer.device)).logits.detach().float()
        out["regs_in_autocast"] = {k: v.detach() for k, v in
                                   trainer.method.regularization_losses(trainer.model).items()}
    torch.manual_seed(11)
    out["terms"] = trainer.forward_backward(batch)
    out["grads"] = trained_grads(trainer)
    assert trainer._optimizer_step() or trainer.amp_dtype == torch.float16
    trainer.global_step += 1
    for _ in range(STEPS):  # the same gate samples every step: one objective to descend
        torch.manual_seed(11)
        trainer.train_step(batch)
    torch.manual_seed(11)
    out["terms_after"] = trainer.forward_backward(batch)  # the objective after the steps
    trainer.optimizer.zero_grad(set_to_none=True)
    out["metrics"] = trainer.evaluate_splits()[0]
    return out


_FLOAT32: dict[tuple[str, str], dict] = {}


@pytest.fixture
def float32_trace(tmp_path_factory, fake_glue):
    """The float32 reference of (method, backbone), traced once for both precisions."""

    def get(method: str, alias: str) -> dict:
        if (method, alias) not in _FLOAT32:
            folder = tmp_path_factory.mktemp(f"float32-{method}-{alias}")
            trainer = make_trainer(folder, fake_glue, method, alias, "float32")
            assert trainer.amp_dtype is None and not trainer.scaler.is_enabled()
            _FLOAT32[(method, alias)] = trace(trainer, first_batch(trainer))
        return _FLOAT32[(method, alias)]

    return get


def first_batch(trainer: Trainer):
    """One whole training batch of 8 rows (not cut into length buckets)."""
    return next(trainer.calibration_batches())


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("alias", BACKBONES)
@pytest.mark.parametrize("method_name", METHODS, indirect=True)
def test_mixed_precision_contract(method_name, alias, precision, tmp_path, fake_glue, float32_trace):  # noqa: F811
    reference = float32_trace(method_name, alias)
    trainer = make_trainer(tmp_path, fake_glue, method_name, alias, precision)
    assert trainer.amp_dtype == DTYPES[precision]
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    batch = first_batch(trainer)
    amp = trace(trainer, batch)
    atol, rtol = LOGIT_ATOL[precision], TERM_RTOL[precision]

    # the same state gives the same function, in evaluation and in training mode
    torch.testing.assert_close(amp["eval_logits"], reference["eval_logits"], rtol=0, atol=atol)
    torch.testing.assert_close(amp["train_logits"], reference["train_logits"], rtol=0, atol=atol)

    # loss terms and regularisers: float32, and float32's values (also inside autocast)
    assert set(amp["terms"]) == set(reference["terms"])
    for name, value in [*amp["terms"].items(), *amp["regs_in_autocast"].items()]:
        assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
    for name, value in amp["terms"].items():
        assert float(value) == pytest.approx(float(reference["terms"][name]), rel=rtol, abs=1e-7), name
    for name, value in amp["regs_in_autocast"].items():
        want = float(reference["regs_in_autocast"][name])
        assert float(value) == pytest.approx(want, rel=rtol, abs=1e-7), name

    # gradients of adapters, controllers and the head: finite, and float32's
    grads, ref_grads = amp["grads"], reference["grads"]
    assert set(grads) == set(ref_grads)
    assert any(not is_head_parameter(n) for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items()
                                                                  if not torch.isfinite(g).all()]
    diff = torch.cat([(grads[n] - ref_grads[n]).flatten() for n in grads]).norm()
    norm = torch.cat([ref_grads[n].flatten() for n in grads]).norm()
    assert diff <= GRAD_RTOL[precision] * norm, (float(diff), float(norm))

    # a few steps learn the batch; nothing overflowed in these small models
    before, after = float(sum(amp["terms"].values())), float(sum(amp["terms_after"].values()))
    assert math.isfinite(after) and after < before, (before, after)
    assert trainer.amp_skipped_steps == 0 and trainer.global_step == STEPS + 1

    # gate samples from logits of autocast's dtype follow the law the budget penalty assumes
    dtype = gate_logit_dtype(trainer, batch)
    if dtype is not None:
        assert_gate_law(trainer, dtype)

    # evaluation under autocast
    metrics, ref_metrics = amp["metrics"], reference["metrics"]
    assert math.isfinite(metrics["validation_loss"]) and 0 <= metrics["validation_accuracy"] <= 1
    assert metrics["validation_loss"] == pytest.approx(ref_metrics["validation_loss"],
                                                       abs=VALIDATION_LOSS_ATOL)

    assert_resumes_exactly(trainer, tmp_path, fake_glue, method_name, alias, precision, batch)


def assert_gate_law(trainer: Trainer, dtype: torch.dtype) -> None:
    """P(g ≠ 0) of samples drawn by the model's own gate from logits in ``dtype`` matches the
    closed form of gates.py at a shut, a balanced and an open logit (2^18 samples each)."""
    from rankwise.methods.spectral import spectral_layers

    gate = next(la.gate for la in spectral_layers(trainer.model).values() if la.gate is not None)
    n = 2**18
    for logit in (-10.0, -8.0, 0.0, 3.0):
        with trainer._autocast():  # where the layer samples them
            samples = gate.sample(torch.full((n,), logit, dtype=dtype, device=trainer.device),
                                  generator=torch.Generator(trainer.device).manual_seed(0))
        expected = float(gate.prob_open(torch.tensor(logit)))
        assert_binomial(int((samples > 0).sum()), n, expected)
        assert samples.dtype == torch.float32


def assert_resumes_exactly(trainer, tmp_path, glue, method, alias, precision, batch) -> None:
    """Save, build a fresh Trainer, resume: the same step, loss scale and outputs, and its next
    step lands on the uninterrupted run's parameters."""
    trainer.save()
    resumed = make_trainer(tmp_path, glue, method, alias, precision)
    assert resumed.try_resume()
    resumed.method.prepare_training(resumed.model, resumed.total_steps)
    assert resumed.global_step == trainer.global_step
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale()
    exact = 0.0 if DEVICE == "cpu" else 1e-6  # CUDA's atomics may reorder a backward's sums
    torch.testing.assert_close(logits(resumed, batch, train=False), logits(trainer, batch, train=False),
                               rtol=0, atol=exact)
    for t in (trainer, resumed):
        torch.manual_seed(5)
        t.train_step(batch)
    ours = dict(resumed.model.named_parameters())
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ours[name], rtol=0, atol=exact, msg=name)
