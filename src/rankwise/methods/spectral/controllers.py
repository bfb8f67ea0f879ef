"""Gate sources: where a spectral layer's gate logits come from (a strategy per variant).

Every source maps a layer input ``x`` (B, T, d_in) and its non-padding mask (B, T) to gate
logits of shape (B, T, R) — token-level — or (B, 1, R) — one set of gates per sequence, shared
by all its tokens. They are plugged into the one :class:`SpectralLinear` layer:

=====================  =============================================  ==============
source                 logits                                          used by
=====================  =============================================  ==============
``StaticGateLogits``   log α ∈ R^R, trainable, input-independent        BHSP
``SequenceController`` W2 · ReLU(W1 · mean_{t valid} x_t)               CBSP
``TokenController``    W2 · ReLU(W1 · x_t) for every token t            TABS
=====================  =============================================  ==============

(The ungated Spectral Adapter has no source: g ≡ 1.) The controller follows methods.md#spectral-gates:
W1 ∈ R^{h×d_in}, W2 ∈ R^{R×h}, no biases, default h = R.

``controller: per_layer`` (CBSP/TABS; the seed's code) has one :class:`LayerController` per
transformer layer instead of one per target: it reads the layer's input hidden state (d → h →
R, default h = d/4) and every target of that layer gates with its logits, computed once per
layer forward. Each target holds a :class:`SharedLayerGates` view of it; the controller itself
is registered once, on its transformer layer (``<layer>.gate_source``), and its FLOPs are
counted once per layer (on the layer's first target).

``detach_input`` (default on; config key ``controller_input: detached | attached``) stops
gradients at the controller's input: the controller still reads the layer input, but neither
the task loss nor the budget penalty reaches earlier layers through it. methods.md does not say
which; attached, the penalty's gradient reaches every earlier adapter through the controllers
of later targets, and at λ = 0.05 it trains those adapters to shut later gates instead of
solving the task (measured on MiniLM / SST-2: TABS and CBSP stay at chance attached).

``flops(valid_tokens)`` counts the controller's matrix-multiply FLOPs per sequence
(2 per multiply-add, as ``torch.utils.flop_counter`` counts them): the token controller runs
on the T_valid real tokens, the sequence controller once on the pooled mean (the mean itself
is additions, which FLOP counters of matmuls do not count either).
"""

from __future__ import annotations

import torch
from torch import nn


class StaticGateLogits(nn.Module):
    """One trainable log α per direction of this target (BHSP): (B, 1, R), the same for all."""

    shares_gates_across_tokens = True
    # Static gates are a property of the weight: one sample per forward serves every row the
    # layer sees in that forward (all sequences and DeBERTa's position rows), as a merged
    # weight W + Σ_i g_i ΔW_i would (``SpectralLinear.compute_gates``).
    input_independent = True

    def __init__(self, rank: int, init_log_alpha: float):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((rank,), float(init_log_alpha)))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # (R,) -> (B, 1, R). A copy, not a view: under no_grad a view of a parameter still
        # reports requires_grad without a grad_fn, which FlopCounterMode's module tracker
        # rejects; the copy is B·R numbers.
        return self.log_alpha.view(1, 1, -1).expand(x.shape[0], 1, -1).clone()

    def flops(self, valid_tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(valid_tokens, dtype=torch.long)


class ControllerMLP(nn.Module):
    """logits = W2 · ReLU(W1 · z) + c, W1 ∈ R^{h×d_in}, W2 ∈ R^{R×h}, bias-free
    (methods.md#spectral-gates); the constant c (``init_offset``, not trained, default 0) sets
    where the gates start (log α ≈ c at initialisation), apart from the adapter's.

    Always in float32, autocast or not (the controller is h·(d_in + R) multiply-adds per row,
    small beside the layer it gates). Two things break in half precision: the budget
    projection ranks these logits, and bf16's 8 significant bits tie many (token, direction)
    pairs, which ``topk`` then breaks by position; and the budget penalty's gradient reaches
    them as λ · 2 · excess · ∂P/∂logit, which for an excess of tens of pairs times fp16's loss
    scale (2^16) overflows float16, so the GradScaler skips steps and lowers the scale of the
    whole model for the controllers' sake (tests/test_cpu_autocast.py shows the ties, the fp16
    cases of tests/test_mixed_precision.py the overflow).
    """

    def __init__(self, d_in: int, hidden: int, rank: int, init_offset: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(d_in, hidden, bias=False)
        self.w2 = nn.Linear(hidden, rank, bias=False)
        self.init_offset = float(init_offset)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, enabled=False):
            out = self.w2(torch.relu(self.w1(z.float())))  # (..., d_in) -> (..., R), float32
            return out + self.init_offset if self.init_offset else out

    def flops_per_input(self) -> int:
        """Matmul FLOPs for one input row: 2·(d_in·h + h·R)."""
        d_in, hidden, rank = self.w1.in_features, self.w1.out_features, self.w2.out_features
        return 2 * (d_in * hidden + hidden * rank)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, d) → (B, d): the mean over each row's valid tokens; an all-padding row pools to 0."""
    weights = valid.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class SequenceController(nn.Module):
    """CBSP: R logits per sequence from the mean of x_t over its non-padding tokens."""

    shares_gates_across_tokens = True
    input_independent = False

    def __init__(self, d_in: int, hidden: int, rank: int, detach_input: bool = True,
                 init_offset: float = 0.0):
        super().__init__()
        self.mlp = ControllerMLP(d_in, hidden, rank, init_offset)
        self.detach_input = detach_input

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.mlp(masked_mean(x.detach() if self.detach_input else x, valid)).unsqueeze(1)  # (B, 1, R)

    def flops(self, valid_tokens: torch.Tensor) -> torch.Tensor:
        return torch.full_like(valid_tokens, self.mlp.flops_per_input(), dtype=torch.long)


class TokenController(nn.Module):
    """TABS: R logits for every token, logits_t = W2 · ReLU(W1 · x_t)."""

    shares_gates_across_tokens = False
    input_independent = False

    def __init__(self, d_in: int, hidden: int, rank: int, detach_input: bool = True,
                 init_offset: float = 0.0):
        super().__init__()
        self.mlp = ControllerMLP(d_in, hidden, rank, init_offset)
        self.detach_input = detach_input

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # (B, T, R); padding rows are masked by the layer
        return self.mlp(x.detach() if self.detach_input else x)

    def flops(self, valid_tokens: torch.Tensor) -> torch.Tensor:
        return valid_tokens.long() * self.mlp.flops_per_input()


class LayerController(nn.Module):
    """One controller per transformer layer (``controller: per_layer``): R logits per token
    (``token``) or per sequence (``sequence``, the masked mean) from the layer's input hidden
    state, which a forward pre-hook on the layer hands over (:meth:`remember_input`). The
    logits of a layer forward are computed by the first target that asks and reused by the
    others; DeBERTa's relative-position rows (not tokens: ``context.in_non_token_call``) get
    the controller applied to the rows themselves, as a per-target controller would."""

    def __init__(self, d_model: int, hidden: int, rank: int, granularity: str, context,
                 detach_input: bool = True, init_offset: float = 0.0):
        super().__init__()
        self.mlp = ControllerMLP(d_model, hidden, rank, init_offset)
        self.granularity = granularity
        self.detach_input = detach_input
        self.context = context  # the model's ForwardContext, shared with its spectral layers
        self._input: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None

    def remember_input(self, hidden_states: torch.Tensor | None) -> None:
        self._input, self._logits = hidden_states, None

    def _logits_of(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.detach_input:
            x = x.detach()
        if self.granularity == "token":
            return self.mlp(x)
        return self.mlp(masked_mean(x, valid)).unsqueeze(1)

    def logits(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.context.in_non_token_call:
            return self._logits_of(x, valid)
        if self._input is None:
            raise RuntimeError("controller: per_layer needs its layer's input: the target was called "
                               "outside its transformer layer's forward")
        if self._input.shape[:2] != x.shape[:2]:
            raise RuntimeError(f"controller: per_layer read a layer input of shape {tuple(self._input.shape)} "
                               f"for a target input of shape {tuple(x.shape)}")
        if self._logits is None:
            self._logits = self._logits_of(self._input, valid)
        return self._logits

    def flops(self, valid_tokens: torch.Tensor) -> torch.Tensor:
        per_input = self.mlp.flops_per_input()
        if self.granularity == "token":
            return valid_tokens.long() * per_input
        return torch.full_like(valid_tokens, per_input, dtype=torch.long)


class SharedLayerGates(nn.Module):
    """A target's gate source under ``controller: per_layer``: its layer's controller's logits.
    Holds no parameters (the controller is registered on its layer); ``counts_flops``: this is
    the layer's first target, which carries the controller's FLOPs for the layer's token rows
    (position rows are projected per target, so each counts its own)."""

    input_independent = False

    def __init__(self, controller: LayerController, counts_flops: bool):
        super().__init__()
        object.__setattr__(self, "controller", controller)  # not a submodule: registered once
        self.counts_flops = counts_flops
        self.shares_gates_across_tokens = controller.granularity == "sequence"

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.controller.logits(x, valid)

    def flops(self, valid_tokens: torch.Tensor) -> torch.Tensor:
        if self.counts_flops or self.controller.context.in_non_token_call:
            return self.controller.flops(valid_tokens)
        return torch.zeros_like(valid_tokens, dtype=torch.long)


GateSource = StaticGateLogits | SequenceController | TokenController | SharedLayerGates


class LayerInputHook:
    """Forward pre-hook (with kwargs) and forward hook of a transformer layer: hands the layer's
    input hidden state to its :class:`LayerController`, and drops it after the layer. An object
    holding the controller, not a closure, so that ``copy.deepcopy`` of the model binds the
    copy's hook to the copy's controller."""

    def __init__(self, controller: LayerController):
        self.controller = controller

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.controller.remember_input(hidden if isinstance(hidden, torch.Tensor) else None)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self.controller.remember_input(None)


def transformer_layer_of(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The transformer layer a target module belongs to: its nearest ancestor that is an
    element of an ``nn.ModuleList`` (``encoder.layer.3`` for ``encoder.layer.3.attention.self.query``)."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:end - 1])
        if isinstance(modules.get(parent) if parent else None, nn.ModuleList):
            return ".".join(parts[:end])
    return None


def controller_width(spec: int | str, d_in: int, rank: int) -> int:
    """Hidden width h of a controller: an int, ``"R"`` (default) or ``"d_in/4"``."""
    if isinstance(spec, int):
        return spec
    if spec == "R":
        return rank
    if spec == "d_in/4":
        return max(1, d_in // 4)
    raise ValueError(f"controller width must be an int, 'R' or 'd_in/4', got {spec!r}")
