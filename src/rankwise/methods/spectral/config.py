"""Config dataclasses of the spectral family (``model.adapter`` block), one per ``type``.

Each validates its own ranges (ConfigError names the dotted key, e.g. ``model.adapter.R``)
and translates itself into a :class:`SpectralRecipe`: which gate source, budget, projection
and penalty the one :class:`~rankwise.methods.spectral.layer.SpectralLinear` layer gets.

Budgets use methods.md's b: for CBSP/TABS open directions per real token (B_max = b·T_valid
token-direction pairs per target and sequence), for BHSP expected open directions per target
(summed over targets ≤ b·|K|).

``penalty_units`` chooses the unit of the squared-hinge budget penalty. The default is the
formula as written in methods.md (excess counted in pairs / gates). Because the excess in pairs
grows with T_valid (e.g. 5 directions over budget × 128 tokens = 640, squared ≈ 4·10^5 per
target), ``per_token`` (CBSP/TABS: excess / T_valid) and ``per_target`` (BHSP: excess / |K|)
measure it in directions instead, keeping the penalty on the scale of the task loss.

``controller`` (CBSP/TABS): one controller per target (default, methods.md) or per transformer
layer (``per_layer``, the seed's, hidden d/4 by default; see ``controllers.py``).

``controller_input`` (CBSP/TABS): ``detached`` (default) stops gradients at the controller's
input, so the budget penalty shapes the gates and not the hidden states earlier adapters
produce; ``attached`` lets them flow (see ``controllers.py`` for why the default).

``budget_on`` and ``eval_gates`` (gated types): what the budget counts per gate (P(g ≠ 0),
E[g] or the seed's ĝ) and the evaluation gate; ``eval_gates: auto`` takes the rule consistent
with the budget (see ``gates.py``), so the capacity a run trains with is the capacity it is
evaluated with. ``budget_control: lagrangian`` learns the penalty's multiplier by dual ascent;
``target`` makes the budget a target that training is held to from both sides (see method.py);
``gate_learning_rate`` and the gates' initialisation (``init_log_alpha``,
``controller_init_bias``) are apart from the adapter's.

``inference_path`` picks how gated layers run at evaluation: ``sparse`` (default, methods.md:
only open (token, direction) pairs are computed) or ``dense`` (all pairs computed, closed ones
multiplied by 0; same outputs to 1e-5). Counted FLOPs are the realised ones either way; which
path is faster in wall time depends on sizes and hardware (see ``layer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from rankwise.config.typed import join, require
from rankwise.methods.targets import TARGETS_MOVED
from rankwise.methods.spectral.budget_projection import SequenceBudget
from rankwise.methods.spectral.gates import BudgetOn, EvalRule

ControllerWidth = int | Literal["R", "d_in/4"]
GateSourceKind = Literal["none", "static", "sequence", "token"]
PenaltyKind = Literal["none", "static_total", "per_sequence"]
InferencePath = Literal["sparse", "dense"]
ControllerInput = Literal["detached", "attached"]
ControllerScope = Literal["per_target", "per_layer"]
BudgetControl = Literal["penalty", "lagrangian", "target"]
GateClipping = Literal["apart", "joint"]
# The evaluation rule consistent with each budget quantity (gates.py): the one whose open count
# at evaluation tracks what the budget held in training.
CONSISTENT_RULE: dict[str, str] = {"prob_open": "prob_open", "gate_value": "sign", "louizos": "louizos"}


@dataclass(frozen=True)
class SpectralRecipe:
    """What every spectral layer of a run is built with (derived from a config)."""

    rank: int
    scale: float
    gate_source: GateSourceKind
    controller_hidden: ControllerWidth = "R"
    controller: ControllerScope = "per_target"
    detach_controller_input: bool = True
    init_log_alpha: float = 0.0
    budget: SequenceBudget | None = None  # per-sequence B_max (CBSP, TABS)
    average_budget: bool = False  # B_max holds on average over sequences (CBSP), not each one
    projection: bool = False
    penalty: PenaltyKind = "none"
    penalty_weight: float = 0.0
    normalised_penalty: bool = False
    static_budget_per_target: float | None = None  # BHSP's b
    inference_path: InferencePath = "sparse"
    eval_gates: EvalRule = "prob_open"
    budget_on: BudgetOn = "prob_open"
    budget_control: BudgetControl = "penalty"
    multiplier_lr: float = 0.01
    target_use: float = 0.9  # budget_control: target aims at this share of the budget
    gate_learning_rate: float | None = None  # None: the adapter's
    gate_clipping: GateClipping = "apart"
    controller_init_bias: float = 0.0  # controllers' output bias at initialisation (log α)


def _check_common(path: str, rank: int, scale: float) -> None:
    require(rank >= 1, join(path, "R"), f"must be >= 1, got {rank}")
    require(scale > 0, join(path, "scale"), f"must be > 0, got {scale}")


def _check_controller(path: str, width: ControllerWidth) -> None:
    if isinstance(width, int):
        require(width >= 1, join(path, "controller_hidden"),
                f"must be >= 1, 'R' or 'd_in/4', got {width}")


@dataclass
class SpectralAdapterConfig:
    """Spectral Adapter^A (ungated reference): g ≡ 1 on the top-R directions, R = r."""

    #: Selects the Spectral Adapter (no gates).
    type: Literal["spectral"] = "spectral"
    #: Top singular directions of each target that train.
    R: int = 8
    #: Scale of the spectral update.
    scale: float = 1.0
    REMOVED_KEYS: ClassVar[dict[str, str]] = TARGETS_MOVED

    def validate(self, path: str) -> None:
        _check_common(path, self.R, self.scale)

    def recipe(self) -> SpectralRecipe:
        return SpectralRecipe(rank=self.R, scale=self.scale, gate_source="none")


@dataclass
class _GatedConfig:
    """Fields every gated type shares: R directions, budget b, λ, evaluation gate and path."""

    #: Top singular directions of each target a gate can open.
    R: int = 16
    #: b: directions open per token (CBSP, TABS) or per target (BHSP); at most R.
    budget: float = 8.0
    #: λ, the weight of the budget penalty.
    penalty_weight: float = 0.05
    #: Scale of the spectral update.
    scale: float = 1.0
    #: Evaluation computes only the open (token, direction) pairs (`sparse`) or all of them,
    #: masked (`dense`; the same outputs).
    inference_path: InferencePath = "sparse"
    #: What the budget counts per gate: P(g ≠ 0) (`prob_open`), the expected gate value E[g]
    #: (`gate_value`) or the seed's Louizos estimate ĝ (`louizos`).
    budget_on: BudgetOn = "prob_open"
    #: Gates at evaluation, each followed by the budget projection where there is one:
    #: `auto` (the rule consistent with `budget_on`: prob_open → `prob_open`, or
    #: `expected_count` for BHSP's static gates; gate_value → `sign`; louizos → `louizos`),
    #: `sign` (1[logit > 0], the seed's code), `prob_open` (1[P(g ≠ 0) > ½]), `louizos` (ĝ,
    #: fractional) or `expected_count` (the round(Σ q) largest logits of each target, sequence
    #: or token, q what the budget counts), or `select`: each trial of the run's search scores
    #: every rule on its held-out selection slice and the best trial's best rule is the final
    #: run's (needs a search; `auto` while training).
    eval_gates: Literal["auto", "select", "sign", "prob_open", "louizos", "expected_count"] = "auto"
    #: `penalty`: λ · squared hinge of the budget excess; `lagrangian`: a multiplier μ ≥ 0
    #: learned by dual ascent on the budget constraint (meets the budget without guessing λ);
    #: `target`: the budget is a target, μ·c + ν·c² with c = use − `target_use`·b and both
    #: multipliers learned by ascent, μ free in sign, as structured L0 pruning holds a target
    #: sparsity (gates that shut below the target are pushed open again). Both learned forms
    #: keep one multiplier (pair) per target matrix for CBSP and TABS, one for BHSP's total.
    budget_control: BudgetControl = "penalty"
    #: Step size of the multipliers' ascent with `budget_control: lagrangian` or `target` (per
    #: optimizer step, on the excess in directions per token or per target).
    multiplier_lr: float = 0.01
    #: With `budget_control: target`, the share of the budget training aims at: a little under
    #: 1, so an evaluation that opens what training expected stays within the budget.
    target_use: float = 0.9
    #: Learning rate of the gates and controllers; null: `training.learning_rate`.
    gate_learning_rate: float | None = None
    #: `apart`: the gates' and controllers' gradient is clipped to `training.max_grad_norm` on
    #: its own, so a large budget term cannot shrink the adapter's step; `joint`: one norm over
    #: every parameter (HF Trainer's clipping).
    gate_clipping: GateClipping = "apart"
    REMOVED_KEYS: ClassVar[dict[str, str]] = TARGETS_MOVED

    budget_unit = "token"  # what b counts directions of, for the error message

    def validate(self, path: str) -> None:
        _check_common(path, self.R, self.scale)
        require(self.budget >= 0, join(path, "budget"), f"must be >= 0, got {self.budget}")
        require(self.budget <= self.R, join(path, "budget"),
                f"must be <= R = {self.R} (at most R directions can open per "
                f"{self.budget_unit}), got {self.budget}")
        require(self.penalty_weight >= 0, join(path, "penalty_weight"),
                f"must be >= 0, got {self.penalty_weight}")
        require(self.multiplier_lr > 0, join(path, "multiplier_lr"), f"must be > 0, got {self.multiplier_lr}")
        require(0 < self.target_use <= 1, join(path, "target_use"), f"must be in (0, 1], got {self.target_use}")
        if self.gate_learning_rate is not None:
            require(self.gate_learning_rate > 0, join(path, "gate_learning_rate"),
                    f"must be > 0 or null, got {self.gate_learning_rate}")

    # static gates meet a budget on Σ P with many gates near P ≈ 0.3, which 1[P > ½] shuts
    # (measured on BHSP): their consistent rule opens the expected count instead
    static_gates = False

    def _recipe(self, **kwargs) -> SpectralRecipe:
        automatic = self.eval_gates in ("auto", "select")
        rule = CONSISTENT_RULE[self.budget_on] if automatic else self.eval_gates
        if automatic and self.static_gates and self.budget_on == "prob_open":
            rule = "expected_count"
        return SpectralRecipe(
            rank=self.R, scale=self.scale, penalty_weight=self.penalty_weight,
            inference_path=self.inference_path, eval_gates=rule, budget_on=self.budget_on,
            budget_control=self.budget_control, multiplier_lr=self.multiplier_lr,
            target_use=self.target_use,
            gate_learning_rate=self.gate_learning_rate, gate_clipping=self.gate_clipping, **kwargs,
        )


@dataclass
class BHSPConfig(_GatedConfig):
    """BHSP: one static HardConcrete gate per (target, direction), trainable log α.

    Penalty λ · max(0, Σ_k Σ_i P(g_ki ≠ 0) − b·|K|)² (``penalty_units: per_target`` divides
    the excess by |K|). ``init_log_alpha`` = 1 starts with P(g ≠ 0) ≈ 0.93 and every gate open at
    evaluation, so each direction gets gradient before the penalty closes some.
    """

    #: Selects BHSP: one static gate per direction.
    type: Literal["bhsp"] = "bhsp"
    #: Count the penalty's excess in gates (`gates`) or in gates per target (`per_target`).
    penalty_units: Literal["gates", "per_target"] = "gates"
    #: Initial log α of every gate (1: P(g ≠ 0) ≈ 0.93, every gate open at evaluation).
    init_log_alpha: float = 1.0

    budget_unit = "target"
    static_gates = True

    def recipe(self) -> SpectralRecipe:
        return self._recipe(
            gate_source="static", init_log_alpha=self.init_log_alpha, penalty="static_total",
            normalised_penalty=self.penalty_units == "per_target",
            static_budget_per_target=self.budget,
        )


@dataclass
class _ControlledConfig(_GatedConfig):
    """Gated types whose gates come from a controller reading the layer input (CBSP, TABS)."""

    #: Count the penalty's excess in (token, direction) pairs (`pairs`, grows with T²) or in
    #: directions per token (`per_token`).
    penalty_units: Literal["pairs", "per_token"] = "pairs"
    #: One gate controller per target matrix (`per_target`, methods.md) or one per transformer
    #: layer (`per_layer`, the seed's code): it reads the layer's input hidden state and every
    #: target of the layer gates with its logits.
    controller: ControllerScope = "per_target"
    #: Hidden width of the gate controller: a number, `R` or `d_in/4` (d_in: the hidden size
    #: for `per_layer`); null: `R` per target, `d_in/4` per layer (the seed's).
    controller_hidden: ControllerWidth | None = None
    #: The controller reads its input `detached` (no gradient through it) or `attached`.
    controller_input: ControllerInput = "detached"
    #: The controller's output bias at initialisation, i.e. the gates' starting log α (0:
    #: P(g ≠ 0) ≈ 0.83).
    controller_init_bias: float = 0.0

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.controller_hidden is not None:
            _check_controller(path, self.controller_hidden)

    def _recipe(self, **kwargs) -> SpectralRecipe:
        default_width = "d_in/4" if self.controller == "per_layer" else "R"
        return super()._recipe(
            controller=self.controller,
            controller_hidden=default_width if self.controller_hidden is None else self.controller_hidden,
            detach_controller_input=self.controller_input == "detached",
            controller_init_bias=self.controller_init_bias,
            penalty="per_sequence", normalised_penalty=self.penalty_units == "per_token",
            **kwargs,
        )


@dataclass
class CBSPConfig(_ControlledConfig):
    """CBSP: sequence-level controller on the masked mean of x_t; tokens share gates.

    Average budget b directions per target and sequence (b·T_valid pairs), enforced by the
    penalty only: λ · Σ_k mean_seq(max(0, T_valid · Σ_i P(g_i ≠ 0) − b·T_valid))².
    """

    #: Selects CBSP: a sequence controller, tokens share gates, the budget by penalty only.
    type: Literal["cbsp"] = "cbsp"

    def recipe(self) -> SpectralRecipe:
        return self._recipe(gate_source="sequence", budget=SequenceBudget(per_token=self.budget),
                            average_budget=True, projection=False)


@dataclass
class TABSConfig(_ControlledConfig):
    """TABS: token controller, HardConcrete gates, hard per-sequence budget with projection.

    B_max = floor(b · T_valid) or the absolute ``budget_tokens``. Ablations:
    ``projection: false`` (penalty only) and ``gate_granularity: sequence`` (CBSP's gates;
    the projection then keeps the floor(B_max / T_valid) best directions).
    """

    #: Selects TABS: a token controller with a hard per-sequence budget.
    type: Literal["tabs"] = "tabs"
    #: An absolute cap B_max on open (token, direction) pairs per target and sequence; null:
    #: floor(b · T).
    budget_tokens: int | None = None
    #: Project onto the top B_max pairs in training and evaluation (`false`: penalty only, the
    #: ablation).
    projection: bool = True
    #: Gates per `token`, or one per `sequence` (CBSP's gates, the ablation).
    gate_granularity: Literal["token", "sequence"] = "token"

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.budget_tokens is not None:
            require(self.budget_tokens >= 1, join(path, "budget_tokens"),
                    f"must be >= 1 or null, got {self.budget_tokens}")

    def recipe(self) -> SpectralRecipe:
        budget = (SequenceBudget(budget_tokens=self.budget_tokens) if self.budget_tokens is not None
                  else SequenceBudget(per_token=self.budget))
        return self._recipe(
            gate_source="token" if self.gate_granularity == "token" else "sequence",
            budget=budget, projection=self.projection,
        )
