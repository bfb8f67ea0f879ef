"""Inference measurements of trained (or freshly built) models, for every method.

- ``latency``: warm-up, then timed forward passes (CUDA-synchronised); mean / p50 / p99.
- ``adapter_flops``: extra FLOPs per example — analytic for the LoRA family, realised from the
  open gates for the spectral family, 0 for full fine-tuning and merged LoRA — and
  ``FlopCounterMode`` counts of whole models to cross-check them.
- ``inputs``: fixed-shape (batch, length) inputs without padding.
- ``after_training``: the measurement pass each run makes after training
  (``seed<seed>/inference.json``, figures, headline scalars in ``metrics.json``).
- ``figures``: FLOPs-per-example vs length, latency vs length, open-gate histogram.

``python -m rankwise.bench inference`` (``rankwise.bench.inference``) sweeps lengths and batch
sizes for several runs side by side with the same pieces.
"""
