"""The spectral family as FineTuningMethods: Spectral Adapter, BHSP, CBSP, TABS (methods.md#spectral-gates).

One method class does the work; the four registered names differ only in their config, whose
:class:`~rankwise.methods.spectral.config.SpectralRecipe` says which gate source, budget,
projection and penalty the layers get. ``wrap``:

1. freezes the backbone and takes the top-R SVD of every target (``svd_cache``: once per
   weights and R, then read from disk),
2. replaces each target ``nn.Linear`` by a :class:`SpectralLinear` around it (P_U, P_V zero,
   so the step-0 model equals the backbone),
3. hooks the model so the layers see the attention mask (``context.py``),
4. leaves the classification head and pooler trainable.

The loop then adds ``regularization_losses`` (``budget_penalty``, already × λ) to the task loss.
For CBSP/TABS the penalty uses the E[r_seq] of the most recent training forward (the loop
calls it right after the forward), λ · Σ_k mean_seq(max(0, E[r_seq] − B_max))²; for BHSP it is
computed from the gate parameters, λ · max(0, Σ_k Σ_i P(g_ki ≠ 0) − b·|K|)².

Gated variants also report the training-time open rate (``step_log_metrics`` every logging
step, ``training_metrics`` for the final metrics): ``train_expected_open_gates_per_token`` =
Σ_k Σ_tokens Σ_i P(g_ki ≠ 0) / Σ_k tokens over real training tokens (closed form of
``gates.py``, before the budget projection), and ``train_sampled_open_gates_per_token``, the
same with the sampled gates as used (after the projection). The final value covers the last
epoch (the gates the evaluated model was trained with at the end; earlier epochs reflect
controllers still far from their budget), the step-log value the steps since the previous log.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import ConfigError
from rankwise.methods.base import FineTuningMethod, freeze, unfreeze_head
from rankwise.methods.cost import REALISED, ForwardCost
from rankwise.methods.engagement import (
    Check,
    SeedEvidence,
    failing_seeds,
    mean_known,
    per_seed,
    regulariser_share,
)
from rankwise.methods.spectral.budget_projection import TopLogitBudgetProjection
from rankwise.methods.spectral.config import SpectralRecipe
from rankwise.methods.spectral.context import ForwardContext, install_forward_context
from rankwise.methods.spectral.controllers import (
    GateSource,
    LayerController,
    LayerInputHook,
    SequenceController,
    SharedLayerGates,
    StaticGateLogits,
    TokenController,
    controller_width,
    transformer_layer_of,
)
from rankwise.methods.spectral.gates import EVAL_RULES, HardConcreteGate
from rankwise.methods.spectral.layer import SpectralLinear
from rankwise.methods.spectral.multipliers import BudgetMultipliers
from rankwise.methods.spectral.statistics import PREFIX, GateStatistics
from rankwise.methods.spectral.svd_cache import load_or_compute_factors


def spectral_layers(model: nn.Module) -> dict[str, SpectralLinear]:
    """The model's spectral layers by target name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SpectralLinear)}


@contextlib.contextmanager
def record_gate_statistics(model: nn.Module) -> Iterator[GateStatistics | None]:
    """Gather gate statistics of the forward passes run inside the block.

    Yields a fresh :class:`GateStatistics` (``None`` for a model without spectral layers) and
    restores whatever the layers recorded into before, so a measurement pass after training
    leaves the method's evaluation statistics (``gates.json``) untouched.
    """
    layers = spectral_layers(model)
    if not layers:
        yield None
        return
    context = next(iter(layers.values())).context
    previous, context.statistics = context.statistics, GateStatistics()
    try:
        yield context.statistics
    finally:
        context.statistics.end_batch()
        context.statistics = previous


class SpectralFamily(FineTuningMethod):
    """Shared implementation; subclasses only set ``name`` (the registry key)."""

    name = "spectral_family"

    def __init__(self, config: Any, run_cfg: Any):
        super().__init__(config, run_cfg)
        self.recipe: SpectralRecipe = config.recipe()
        self.context: ForwardContext | None = None
        self.last_statistics: GateStatistics | None = None  # the most recent evaluation pass
        # each split's most recent evaluation pass (the final evaluation's, after training)
        self.split_statistics: dict[str, GateStatistics] = {}
        self._evaluating: str | None = None
        self.last_evaluation: dict[str, Any] = {}
        self.svd_info: dict[str, Any] = {}
        self._layers: list[SpectralLinear] = []
        self._gate_params: list[nn.Parameter] = []  # gates' and controllers' (``.gate_source.``)
        self._gate_init: list[torch.Tensor] = []
        # budget_control: lagrangian / target: one multiplier pair per constraint
        self.multipliers = BudgetMultipliers(self.recipe.budget_control, self.recipe.multiplier_lr)
        # Training open-rate totals [expected, sampled, tokens]: since the last step log, this
        # epoch, the previous epoch.
        self._window = [0.0, 0.0, 0.0]
        self._epoch = [0.0, 0.0, 0.0]
        self._previous_epoch = [0.0, 0.0, 0.0]

    # --- building --------------------------------------------------------------------------
    def wrap(self, backbone: nn.Module, target_modules: list[str]) -> nn.Module:
        from rankwise.models import default_cache_dir

        rank = self.recipe.rank
        modules = dict(backbone.named_modules())
        for name in target_modules:
            linear = modules.get(name)
            if not isinstance(linear, nn.Linear):
                raise ConfigError("model.target_modules", f"{name!r} is not an nn.Linear")
            if rank > min(linear.in_features, linear.out_features):
                raise ConfigError(
                    "model.adapter.R",
                    f"R = {rank} exceeds min(d_in, d_out) = "
                    f"{min(linear.in_features, linear.out_features)} of target {name!r}",
                )
        freeze(backbone)
        start = time.perf_counter()
        factors, hit, path = load_or_compute_factors(
            backbone, target_modules, rank, default_cache_dir()
        )
        seconds = time.perf_counter() - start
        self.svd_info = {"cache_hit": hit, "file": path.name, "seconds": seconds}

        self.context = ForwardContext()
        shared = self._layer_controllers(backbone, target_modules) if self.recipe.controller == "per_layer" else {}
        for name in target_modules:
            linear = modules[name]
            parent_name, _, attr = name.rpartition(".")
            parent = modules[parent_name] if parent_name else backbone
            layer = SpectralLinear(
                linear, factors[name], self.context, scale=self.recipe.scale,
                gate_source=shared[name] if name in shared else self._gate_source(linear),
                gate=(HardConcreteGate(eval_rule=self.recipe.eval_gates, budget_on=self.recipe.budget_on)
                      if self.recipe.gate_source != "none" else None),
                budget=self.recipe.budget,
                projection=TopLogitBudgetProjection() if self.recipe.projection else None,
                target_name=name,
            )
            layer.execution = "auto" if self.recipe.inference_path == "sparse" else "dense"
            setattr(parent, attr, layer)
        install_forward_context(backbone, self.context)
        # DeBERTa's relative-position rows: gated once per forward for the whole batch
        self._position_rows = any(hasattr(m, "disentangled_attention_bias") for m in backbone.modules())
        unfreeze_head(backbone)
        self._layers = list(spectral_layers(backbone).values())
        # the gates' initial parameters, for ``gate_movement`` (a resumed run rebuilds the same
        # ones: the model is built under the seed before a checkpoint is loaded)
        self._gate_params = [p for n, p in backbone.named_parameters() if ".gate_source." in f".{n}."]
        self._gate_init = [p.detach().clone() for p in self._gate_params]
        return backbone

    def _layer_controllers(self, backbone: nn.Module, target_modules: list[str]) -> dict[str, SharedLayerGates]:
        """``controller: per_layer``: one :class:`LayerController` per transformer layer holding
        targets, registered on that layer as ``gate_source`` and fed its input hidden state by
        hooks; each target gets a view of its layer's controller."""
        r = self.recipe
        modules = dict(backbone.named_modules())
        d_model = getattr(getattr(backbone, "config", None), "hidden_size", None)
        if not isinstance(d_model, int):
            raise ConfigError("model.adapter.controller", "per_layer needs the model's hidden size "
                                                          "(config.hidden_size)")
        by_layer: dict[str, list[str]] = {}
        for name in target_modules:
            layer_name = transformer_layer_of(name, modules)
            if layer_name is None:
                raise ConfigError("model.adapter.controller",
                                  f"per_layer: target {name!r} is not inside a stack of layers (an nn.ModuleList)")
            by_layer.setdefault(layer_name, []).append(name)
        device = modules[target_modules[0]].weight.device
        views = {}
        for layer_name, names in by_layer.items():
            layer = modules[layer_name]
            controller = LayerController(
                d_model, controller_width(r.controller_hidden, d_model, r.rank), r.rank,
                "token" if r.gate_source == "token" else "sequence", self.context,
                r.detach_controller_input, r.controller_init_bias).to(device)
            layer.gate_source = controller
            hook = LayerInputHook(controller)
            layer.register_forward_pre_hook(hook.before, with_kwargs=True)
            layer.register_forward_hook(hook.after, with_kwargs=True, always_call=True)
            views.update({name: SharedLayerGates(controller, counts_flops=i == 0) for i, name in enumerate(names)})
        return views

    def _gate_source(self, linear: nn.Linear) -> GateSource | None:
        r = self.recipe
        device = linear.weight.device
        if r.gate_source == "none":
            return None
        if r.gate_source == "static":
            return StaticGateLogits(r.rank, r.init_log_alpha).to(device)
        hidden = controller_width(r.controller_hidden, linear.in_features, r.rank)
        cls = SequenceController if r.gate_source == "sequence" else TokenController
        return cls(linear.in_features, hidden, r.rank, r.detach_controller_input,
                   r.controller_init_bias).to(device)

    # --- training --------------------------------------------------------------------------
    @property
    def rows_independent(self) -> bool:
        # A gate sample drawn once per forward is shared by the batch's rows (BHSP's
        # input-independent gates; CBSP's and TABS's gates on DeBERTa's position rows): run
        # as parts, the batch would see one sample per part.
        if self.recipe.gate_source == "none":
            return True
        return self.recipe.gate_source != "static" and not getattr(self, "_position_rows", False)

    def regularization_losses(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The budget term. ``penalty``: λ · (budget excess)², hinged (methods.md, spectral
        family). ``lagrangian``: Σ_k μ_k · (use_k − budget), signed, each μ_k ≥ 0 raised by
        dual ascent while its budget is exceeded and lowered while it is not. ``target``:
        μ_k · c_k + ν_k · c_k², c_k = use_k − target_use · budget, μ_k free in sign, as
        structured L0 pruning holds a target sparsity: below the target μ_k turns negative and
        the quadratic term pulls too, so gates that shut past it open again (with μ ≥ 0 nothing
        does once μ reaches 0). One pair per target for per-sequence and average budgets, one
        for BHSP's total (``multipliers.py``); in directions per token (CBSP, TABS) or per
        target (BHSP), whatever ``penalty_units`` says."""
        r = self.recipe
        layers = list(spectral_layers(model).values())
        if r.penalty == "none" or not layers:
            return {}
        if r.budget_control == "penalty":
            return {"budget_penalty": r.penalty_weight * self._budget_penalty(layers)}
        gaps = self._constraint_values(layers, share=r.target_use if r.budget_control == "target" else 1.0)
        if not gaps:  # no training forward since the last call: nothing to add
            return {}
        return {f"budget_{r.budget_control}": self.multipliers.term(gaps)}

    def _budget_penalty(self, layers: list[SpectralLinear]) -> torch.Tensor:
        """The squared hinge of the excess as the penalty has it (BHSP: of the total over
        targets; CBSP/TABS: mean over sequences, summed over targets). Zero when no training
        forward left budget terms."""
        r = self.recipe
        if r.penalty == "static_total":
            gap = self._static_excess(layers, share=1.0)
            return torch.relu(gap / len(layers) if r.normalised_penalty else gap).square()
        total = torch.zeros((), device=layers[0].P_U.device)
        for layer in layers:
            terms, layer.pending_budget_terms = layer.pending_budget_terms, None
            if terms is None:  # no training forward since the last call
                continue
            gap = terms.expected_open_pairs - terms.max_open_pairs  # (B,)
            if r.normalised_penalty:
                gap = gap / terms.valid_tokens.clamp(min=1)
            total = total + torch.relu(gap).square().mean()
        return total

    def _static_excess(self, layers: list[SpectralLinear], share: float) -> torch.Tensor:
        expected = sum(layer.gate.budget_quantity(layer.gate_source.log_alpha).sum() for layer in layers)
        return expected - share * self.recipe.static_budget_per_target * len(layers)

    def _constraint_values(self, layers: list[SpectralLinear], share: float) -> dict[int, torch.Tensor]:
        """c_k = use − share × budget of each constraint, in directions: BHSP's total per
        target (one constraint); each target's mean over sequences of open directions per
        token (CBSP, TABS), for the targets a training forward left terms for."""
        if self.recipe.penalty == "static_total":
            return {0: self._static_excess(layers, share) / len(layers)}
        gaps = {}
        for k, layer in enumerate(layers):
            terms, layer.pending_budget_terms = layer.pending_budget_terms, None
            if terms is not None:
                gap = terms.expected_open_pairs - share * terms.max_open_pairs  # (B,)
                gaps[k] = (gap / terms.valid_tokens.clamp(min=1)).mean()
        return gaps

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        """One ascent step on the learned multipliers (``multipliers.py``)."""
        if self.recipe.budget_control != "penalty":
            self.multipliers.step()

    def _multipliers(self) -> dict[str, float]:
        return {} if self.recipe.budget_control == "penalty" else self.multipliers.summary()

    def parameter_learning_rate(self, name: str) -> float | None:
        """``gate_learning_rate`` for the gates and controllers (None: the adapter's)."""
        if self.recipe.gate_learning_rate is not None and ".gate_source." in f".{name}.":
            return self.recipe.gate_learning_rate
        return None

    def clip_group(self, name: str) -> str | None:
        """``gate_clipping: apart``: the gates and controllers have a norm of their own."""
        if self.recipe.gate_clipping == "apart" and ".gate_source." in f".{name}.":
            return "gates"
        return None

    # --- evaluation rules -----------------------------------------------------------------
    def evaluation_rules(self) -> tuple[str, ...]:
        return EVAL_RULES if self.gated else ()

    @contextlib.contextmanager
    def evaluation_rule(self, model: nn.Module, rule: str) -> Iterator[None]:
        """Every gate of ``model`` evaluates with ``rule`` inside the block (each still followed
        by its budget projection); the configured rule after it."""
        if rule not in self.evaluation_rules():
            raise ValueError(f"{self.name} has no evaluation rule {rule!r}")
        gates = [layer.gate for layer in spectral_layers(model).values() if layer.gate is not None]
        before = [gate.eval_rule for gate in gates]
        for gate in gates:
            gate.eval_rule = rule
        try:
            yield
        finally:
            for gate, rule_before in zip(gates, before):
                gate.eval_rule = rule_before

    # --- training-time open rate -----------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.recipe.gate_source != "none"

    def _drain_tallies(self) -> None:
        for layer in self._layers:
            counts = layer.training_tally.drain()
            for totals in (self._window, self._epoch):
                for i, v in enumerate(counts):
                    totals[i] += v

    @staticmethod
    def _open_rates(totals: list[float]) -> dict[str, float]:
        expected, sampled, tokens = totals
        if not tokens:
            return {}
        return {"train_expected_open_gates_per_token": expected / tokens,
                "train_sampled_open_gates_per_token": sampled / tokens}

    def begin_epoch(self, model: nn.Module, fresh: bool) -> None:
        if not fresh:
            return
        self._drain_tallies()
        if self._epoch[2]:
            self._previous_epoch = self._epoch
        self._epoch = [0.0, 0.0, 0.0]

    def step_log_metrics(self, model: nn.Module) -> dict[str, float]:
        if not self.gated:
            return {}
        self._drain_tallies()
        rates, self._window = self._open_rates(self._window), [0.0, 0.0, 0.0]
        return {**rates, **self._multipliers()}

    def training_metrics(self, model: nn.Module) -> dict[str, float]:
        if not self.gated:
            return {}
        self._drain_tallies()
        return {**self._open_rates(self._epoch if self._epoch[2] else self._previous_epoch),
                "gate_movement": self.gate_movement(), **self._multipliers()}

    def gate_movement(self) -> float:
        """How far training moved the gates from their initialisation: mean |Δ log α| for
        input-independent gates (BHSP), ‖θ − θ₀‖ / ‖θ₀‖ over the controllers' parameters
        otherwise (CBSP, TABS)."""
        now = [p.detach() for p in self._gate_params]
        if not now:
            return 0.0
        if self.recipe.gate_source == "static":
            return float(torch.cat([(a - b).abs().flatten() for a, b in zip(now, self._gate_init)]).mean())
        moved = sum(float((a - b).square().sum()) for a, b in zip(now, self._gate_init))
        start = sum(float(b.square().sum()) for b in self._gate_init)
        return (moved / start) ** 0.5 if start > 0 else float(moved > 0)

    # --- mechanism checks ------------------------------------------------------------------
    @property
    def engagement_check_names(self) -> tuple[str, ...]:
        if not self.gated:
            return ()
        share = self.recipe.penalty != "none" and self.recipe.budget_control == "penalty"
        return ("capacity_ratio", "budget_met", "gate_movement") + (("regulariser_share",) if share else ())

    def engagement_checks(self, evidence: list[SeedEvidence],
                          thresholds: dict[str, float]) -> list[Check]:
        """Gated methods: the gates evaluate with the capacity they trained with
        (``capacity_ratio``), keep their budget at evaluation (``budget_met``) and moved from
        their initialisation (``gate_movement``); a budget penalty must neither vanish nor
        swamp the task loss (``regulariser_share``)."""
        if not self.gated:
            return []
        checks = [capacity_ratio(evidence, thresholds), budget_met(evidence),
                  gate_movement(evidence, thresholds, static=self.recipe.gate_source == "static")]
        if self.recipe.penalty != "none" and self.recipe.budget_control == "penalty":
            checks.append(regulariser_share(evidence, "budget_penalty", thresholds))
        return checks

    # --- evaluation ------------------------------------------------------------------------
    def begin_evaluation(self, model: nn.Module, split: str | None = None) -> None:
        self._context(model).statistics = GateStatistics()
        self._evaluating = split

    def end_evaluation(self, model: nn.Module) -> dict[str, Any]:
        context = self._context(model)
        stats, context.statistics = context.statistics, None
        if stats is None:
            return {}
        self.last_statistics = stats
        if self._evaluating is not None:
            self.split_statistics[self._evaluating] = stats
        summary = stats.summary()
        if self.recipe.penalty == "static_total":
            summary[f"{PREFIX}static_open_gates"] = sum(
                sum(v) for v in self._static_open_gates(model).values())
        violations = self.budget_violations(model, stats)
        if violations is None:
            summary.pop(f"{PREFIX}budget_violations")  # ungated: there is no budget to violate
        else:
            summary[f"{PREFIX}budget_violations"] = violations
        self.last_evaluation = summary
        return summary

    def budget_violations(self, model: nn.Module, stats: GateStatistics) -> int | None:
        """Budget violations of the passes recorded in ``stats``; ``None`` without a budget.

        TABS: (target, sequence) pairs with more than B_max open pairs. CBSP: its budget is an
        average (b directions per target and sequence on average, methods.md), so the targets
        whose open pairs over all sequences exceed Σ B_max. BHSP: its budget is global and
        input-independent, Σ_k (open directions of k) ≤ b·|K|, so 1 if the current static
        gates exceed it, else 0.
        """
        if self.recipe.penalty == "static_total":
            open_gates = self._static_open_gates(model)
            total_open = sum(sum(v) for v in open_gates.values())
            return int(total_open > self.recipe.static_budget_per_target * len(open_gates))
        if self.recipe.budget is None:
            return None
        if self.recipe.average_budget:
            return stats.average_budget_violations()
        return stats.budget_violations()

    # --- cost: realised from the gates of the pass ---------------------------------------------
    def forward_cost(self, model: nn.Module, forward: Callable[[], Any],
                     attention_mask: torch.Tensor) -> ForwardCost:
        """Open (token, direction) pairs × cost per pair and the controllers' FLOPs, counted
        from the gates of this very pass, with its budget violations and open-gate histogram."""
        with record_gate_statistics(model) as stats:
            forward()
        return self._realised_cost(model, stats)

    def evaluation_cost(self, model: nn.Module, valid_tokens: list[int],
                        split: str | None = None) -> ForwardCost | None:
        """From the gate statistics of the most recent evaluation pass over ``split`` (any
        split when None), as ``end_evaluation`` recorded them."""
        stats = self.last_statistics if split is None else self.split_statistics.get(split)
        if stats is None:
            return None
        stats.end_batch()
        return self._realised_cost(model, stats)

    def _realised_cost(self, model: nn.Module, stats: GateStatistics) -> ForwardCost:
        gated = any(layer.gate_source is not None for layer in spectral_layers(model).values())
        tokens = sum(c.tokens for c in stats.targets.values())
        open_pairs = sum(c.open_pairs for c in stats.targets.values())
        position = stats.position_totals()
        return ForwardCost(
            source=REALISED, valid_tokens=[e.valid_tokens for e in stats.examples],
            adapter_flops=[e.adapter_flops for e in stats.examples],
            controller_flops=[e.controller_flops for e in stats.examples],
            budget_violations=self.budget_violations(model, stats),
            histogram=stats.histogram() if gated else None,
            open_gates_per_token=open_pairs / tokens if tokens else 0.0,
            position_adapter_flops=position.adapter_flops,
            position_dense_adapter_flops=position.dense_adapter_flops,
            position_controller_flops=position.controller_flops,
            detail={"dense_adapter_flops_per_example": ForwardCost._mean(
                [e.dense_adapter_flops for e in stats.examples])},
            # sequence-level controllers (CBSP, TABS's shared-gates ablation) run once per
            # sequence: their FLOPs are the per-sequence shape
            sequence_flops=([e.controller_flops for e in stats.examples]
                            if self.recipe.gate_source == "sequence" else None),
            sources={"per_token": "counted: open (token, direction) pairs of the pass × cost per pair",
                     **({"per_sequence": "counted: one controller pass per sequence and "
                                         + ("layer" if self.recipe.controller == "per_layer" else "target")}
                        if self.recipe.gate_source == "sequence" else {})},
        )

    def _context(self, model: nn.Module) -> ForwardContext:
        layers = spectral_layers(model)
        if not layers:
            raise RuntimeError("the model has no spectral layers: call wrap() first")
        return next(iter(layers.values())).context

    @staticmethod
    def _static_open_gates(model: nn.Module) -> dict[str, list[int]]:
        return {
            name: (layer.gate.decide(layer.gate_source.log_alpha) > 0).int().tolist()
            for name, layer in spectral_layers(model).items()
        }

    # --- outputs and resume ----------------------------------------------------------------
    def write_artifacts(self, model: nn.Module, run_dir: Path) -> dict[str, Any]:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        layers = spectral_layers(model)
        r = self.recipe
        gates: dict[str, Any] = {
            "method": self.name,
            "R": r.rank,
            "gate_source": r.gate_source,
            "budget": r.budget.describe() if r.budget is not None else None,
            "projection": r.projection,
            "svd": self.svd_info,
            "cost_per_pair": {name: layer.cost_per_pair for name, layer in layers.items()},
        }
        if r.gate_source == "static":
            gates["static_gates"] = {}
            for name, layer in layers.items():
                log_alpha = layer.gate_source.log_alpha.detach().cpu()
                gates["static_gates"][name] = {
                    "log_alpha": log_alpha.tolist(),
                    "prob_open": layer.gate.prob_open(log_alpha).tolist(),
                    "open_at_evaluation": (layer.gate.decide(log_alpha) > 0).int().tolist(),
                }
        summary: dict[str, Any] = {
            f"{PREFIX}svd_cache_hit": int(bool(self.svd_info.get("cache_hit")))
        }
        controller_params = sum(
            p.numel() for layer in layers.values() if layer.gate_source is not None
            for p in layer.gate_source.parameters()
        )
        summary[f"{PREFIX}gate_params"] = controller_params
        if self.last_statistics is not None:
            detail = self.last_statistics.to_json()
            examples = detail.pop("examples")
            gates["last_evaluation"] = detail
            (run_dir / "flops_by_length.json").write_text(json.dumps({"examples": examples}))
            for key in ("open_gates_per_token", "budget_violations", "adapter_flops_per_example",
                        "controller_flops_per_example", "position_adapter_flops_per_forward",
                        "position_controller_flops_per_forward"):
                if f"{PREFIX}{key}" in self.last_evaluation:
                    summary[f"{PREFIX}{key}"] = self.last_evaluation[f"{PREFIX}{key}"]
        (run_dir / "gates.json").write_text(json.dumps(gates, indent=2))
        return summary

    def state_dict(self) -> dict[str, Any]:
        # Parameters (P_U, P_V, controllers, log α) are in the model; the frozen factors are
        # rebuilt from the SVD cache. Record which factors, so a resume cannot silently mix.
        self._drain_tallies()
        return {"R": self.recipe.rank, "svd_file": self.svd_info.get("file"),
                "train_open_rate": {"window": list(self._window), "epoch": list(self._epoch),
                                    "previous_epoch": list(self._previous_epoch)},
                "budget_multipliers": self.multipliers.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("R") != self.recipe.rank or state.get("svd_file") != self.svd_info.get("file"):
            raise ValueError(
                f"checkpoint was made with R={state.get('R')} and SVD {state.get('svd_file')}, "
                f"this run has R={self.recipe.rank} and SVD {self.svd_info.get('file')}"
            )
        self.multipliers.load_state_dict(state.get("budget_multipliers", {}))
        rates = state.get("train_open_rate")
        if rates is not None:
            self._window, self._epoch = list(rates["window"]), list(rates["epoch"])
            self._previous_epoch = list(rates["previous_epoch"])


class SpectralAdapter(SpectralFamily):
    name = "spectral"


class BHSP(SpectralFamily):
    name = "bhsp"


class CBSP(SpectralFamily):
    name = "cbsp"


class TABS(SpectralFamily):
    name = "tabs"


# --- mechanism checks of the gated family (methods.md, spectral family) ---------------------------

EVAL_OPEN = f"validation_{PREFIX}open_gates_per_token"
EVAL_VIOLATIONS = f"validation_{PREFIX}budget_violations"


def capacity_ratio(evidence: list[SeedEvidence], thresholds: dict[str, float]) -> Check:
    """Directions open per token at evaluation ÷ expected open per token in training, per
    seed: gates trained open and evaluated shut (0.9 of 8.7) fail it."""
    lo, hi = thresholds["capacity_ratio_min"], thresholds["capacity_ratio_max"]
    evals, trains = per_seed(evidence, EVAL_OPEN), per_seed(evidence, "train_expected_open_gates_per_token")
    ratios = {s: (evals[s] / trains[s]) if evals[s] is not None and trains[s] else None for s in evals}
    bad = failing_seeds(ratios, lambda v: lo <= v <= hi)
    shown = ", ".join(f"seed {s}: {evals[s]:.2f} / {trains[s]:.2f}" for s in ratios if ratios[s] is not None)
    why = (f"open per token at evaluation / expected in training ({shown or 'not recorded'}) "
           f"{'within' if not bad else 'outside'} [{lo:g}, {hi:g}]")
    return Check("capacity_ratio", not bad, mean_known(ratios), [lo, hi], why)


def budget_met(evidence: list[SeedEvidence]) -> Check:
    """No budget violation at evaluation in any seed; the budget use (open per token) shown."""
    violations, opened = per_seed(evidence, EVAL_VIOLATIONS), per_seed(evidence, EVAL_OPEN)
    if all(v is None for v in violations.values()):
        return Check("budget_met", True, None, 0, "no budget to meet (none configured)")
    bad = failing_seeds(violations, lambda v: v == 0)
    shown = ", ".join(f"seed {s}: {violations[s]:g} violations, {opened[s]:.2f} open / token"
                      for s in violations if violations[s] is not None and opened[s] is not None)
    return Check("budget_met", not bad, float(sum(v or 0 for v in violations.values())), 0,
                 f"budget violations at evaluation ({shown or 'not recorded'})")


def gate_movement(evidence: list[SeedEvidence], thresholds: dict[str, float], static: bool) -> Check:
    """The gates moved from their initialisation by at least the threshold in every seed
    (BHSP's log α moved 0.06 where meeting its budget needed about 1.6)."""
    name = "gate_movement_static_min" if static else "gate_movement_controller_min"
    floor = thresholds[name]
    moved = per_seed(evidence, "gate_movement")
    bad = failing_seeds(moved, lambda v: v >= floor)
    unit = "mean |Δ log α|" if static else "relative change of the controllers' parameters"
    shown = ", ".join(f"seed {s}: {v:.3g}" for s, v in moved.items() if v is not None)
    return Check("gate_movement", not bad, mean_known(moved), floor,
                 f"{unit} from initialisation ({shown or 'not recorded'}; at least {floor:g})")

