"""The one typed, validated run schema: YAML (Hydra/OmegaConf) -> ``RunConfig`` -> builders.

A run file has six top-level keys: ``run_id``, ``method``, ``model``, ``dataset``,
``training``, ``optuna``. ``method`` is a *role label* (``proposed``, ``comparative-1``,
``baseline``, ``ablation-<name>``); the algorithm is resolved from the content
(:meth:`RunConfig.algorithm`):

=============================================  ===================================
``model.adapter``                              algorithm
=============================================  ===================================
absent / ``null`` / ``type: full``             ``full_ft``
``type: <t>``                                   the method registered for ``<t>``
``type: <t>`` + IW regularisation enabled      its ``iw_`` twin (LoRA family only)
=============================================  ===================================

(``rankwise.methods`` is the one list of types, e.g. ``lora`` + IW = ``iw_lora``.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from rankwise.config.typed import check_known_keys, from_mapping, join, require
from rankwise.errors import ConfigError

ROLE_PATTERN = re.compile(r"^(proposed|baseline|comparative(-\d+)?|ablation(-[A-Za-z0-9_.+-]+)?)$")


@dataclass
class IWRegularisationConfig:
    """Importance weighting (docs/methods.md#iw-lora): calibration, importance weights, weighted
    L2 penalty, on any LoRA-family adapter."""

    #: Make a LoRA-family method its importance-weighted twin (LoRA: IW-LoRA): calibrate
    #: importance weights, add the weighted L2 penalty (needs a LoRA-family `model.adapter.type`).
    enabled: bool = False
    #: α, the weight of the penalty α Σ_k c_k ‖Δ_k‖²; 0 trains exactly as LoRA.
    reg_alpha: float = 1e-4
    #: β in the coefficients c_k = (1 − w_k)^β.
    beta: float = 1.0
    #: Training batches the calibration reads (nothing is updated).
    sensitivity_warmup_steps: int = 150
    #: Per-batch sensitivities kept (a ring buffer); s_k is their mean.
    sensitivity_buffer_size: int = 1024
    #: Keep the LoRA factors out of the calibration graph (`false` computes their gradients too
    #: and discards them).
    freeze_lora_during_warmup: bool = True
    #: s_k: the mean of ‖∂L/∂W_k‖_F (`grad_norm`) or of its square (`grad_sq`) over the
    #: calibration batches.
    sensitivity: Literal["grad_norm", "grad_sq"] = "grad_norm"
    #: w_k = s_k / Σ_j s_j (`sum`) or s_k / max_j s_j (`max`).
    normalise: Literal["sum", "max"] = "sum"
    #: Penalise ‖scale·B_k A_k‖_F² (`delta`) or ‖A_k‖_F² + ‖B_k‖_F² (`factors`).
    penalty_on: Literal["delta", "factors"] = "delta"
    #: `importance`: c_k from the calibration; `uniform`: every c_k = 1, no calibration (the
    #: same L2 at the same α: the control that isolates what the importance weights add).
    coefficients: Literal["importance", "uniform"] = "importance"

    def validate(self, path: str) -> None:
        require(self.reg_alpha >= 0, join(path, "reg_alpha"), f"must be >= 0, got {self.reg_alpha}")
        require(self.beta >= 0, join(path, "beta"), f"must be >= 0, got {self.beta}")
        require(
            self.sensitivity_warmup_steps >= 1,
            join(path, "sensitivity_warmup_steps"),
            f"must be >= 1, got {self.sensitivity_warmup_steps}",
        )
        require(
            self.sensitivity_buffer_size >= 1,
            join(path, "sensitivity_buffer_size"),
            f"must be >= 1, got {self.sensitivity_buffer_size}",
        )


@dataclass
class ModelConfig:
    #: A hub id, a local directory, `minilm` (the packaged all-MiniLM-L6-v2), `tiny-bert` /
    #: `tiny-deberta` (2-layer random models for tests) or `long-bert` / `long-deberta` (random
    #: MiniLM-sized models for timing long inputs).
    name: str = "minilm"
    # The config dataclass its ``type`` registered (parse_adapter), or None: full fine-tuning.
    #: The method's block, chosen by its `type` (the `model.adapter` sections below); absent,
    #: null or `type: full`: full fine-tuning.
    adapter: Any = field(default=None, metadata={"convert": lambda raw, path: parse_adapter(raw, path)})
    importance_weighted_regularisation: IWRegularisationConfig = field(
        default_factory=IWRegularisationConfig
    )
    #: Load this tokenizer (hub id or path) instead of the model's own; null: the model's.
    tokenizer: str | None = None
    #: Module-name suffixes or regexes to adapt, for every method; null: the architecture's
    #: default (query, key, value, attention output, intermediate and output dense of every
    #: layer).
    target_modules: list[str] | None = None
    # keys that older files may hold; each is refused with the reason
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "dropout_override": "it was accepted but never applied; the backbone's own dropout is used "
                            "(set the adapter's `dropout` for LoRA-family methods)",
    }

    def validate(self, path: str) -> None:
        require(bool(self.name), join(path, "name"), "must be a hub id, a local path or 'minilm'")


@dataclass
class SplitsConfig:
    #: The split trained on.
    train: str = "train"
    #: The split reported (MNLI: `validation_matched`).
    validation: str = "validation"
    #: Further splits evaluated (e.g. MNLI's `validation_mismatched`); null: the task's default,
    #: evaluated where the source has it.
    extra_validation: list[str] | None = None


@dataclass
class PreprocessingConfig:
    #: Cut rows longer than `dataset.max_seq_length` (ListOps refuses too-long rows either way).
    truncation: bool = True
    #: Accepted and logged: batches are always padded dynamically to their longest row (masked
    #: padding does not change an encoder's outputs).
    padding: Literal["max_length", "longest", "dynamic", True, False] = "longest"


@dataclass
class ListOpsConfig:
    """LRA ListOps generation (Tay et al. 2021, following Nangia & Bowman 2018)."""

    #: Shortest expression, exclusive, in tokens of the printed expression.
    min_length: int = 500
    #: Longest expression, exclusive.
    max_length: int = 2000
    #: Deepest nesting of operators.
    max_depth: int = 10
    #: Fewest arguments of an operator.
    min_args: int = 2
    #: Most arguments of an operator.
    max_args: int = 10
    #: Probability that an argument is itself an operation.
    operator_prob: float = 0.25
    #: Training expressions generated.
    n_train: int = 96000
    #: Validation expressions generated.
    n_validation: int = 2000
    #: Test expressions generated.
    n_test: int = 2000
    #: Seed of the generator: the splits are a pure function of these keys.
    seed: int = 0

    def validate(self, path: str) -> None:
        require(self.min_length >= 1, join(path, "min_length"), "must be >= 1")
        require(
            self.max_length > self.min_length + 1,
            join(path, "max_length"),
            f"must exceed min_length + 1 ({self.min_length + 1}), got {self.max_length}",
        )
        require(self.max_depth >= 1, join(path, "max_depth"), "must be >= 1")
        require(2 <= self.min_args <= self.max_args, join(path, "min_args"), "need 2 <= min_args <= max_args")
        require(0 < self.operator_prob < 1, join(path, "operator_prob"), "must be in (0, 1)")
        for key in ("n_train", "n_validation", "n_test"):
            require(getattr(self, key) >= 1, join(path, key), "must be >= 1")


@dataclass
class DatasetConfig:
    #: `glue` (through `datasets`) or `lra` (Long Range Arena: ListOps).
    name: Literal["glue", "lra"] = "glue"
    #: The task: `cola`, `sst2`, `mrpc`, `qqp`, `stsb`, `mnli`, `qnli`, `rte`; `listops` for
    #: `lra`.
    subset: str = "rte"
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    #: Longest row in tokens, [CLS] and [SEP] included.
    max_seq_length: int = 128
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    #: Train on a seeded selection of this many rows; null: all.
    max_train_samples: int | None = None
    #: Evaluate on the first this many rows of each evaluation split; null: all.
    max_eval_samples: int | None = None
    #: A local mirror with the hub's layout,
    #: `<data_dir>/<subset>/<split>-00000-of-00001.parquet`; null: env `RANKWISE_DATA_DIR`, else
    #: the hub.
    data_dir: str | None = None
    #: Accepted but not read: caches live under `$RANKWISE_CACHE_DIR` (default
    #: `~/.cache/rankwise`).
    cache_dir: str | None = None
    listops: ListOpsConfig = field(default_factory=ListOpsConfig)

    def validate(self, path: str) -> None:
        from rankwise.data.tasks import known_subsets

        subsets = known_subsets(self.name)
        if self.subset not in subsets:
            from rankwise.config.typed import did_you_mean

            raise ConfigError(
                join(path, "subset"),
                f"unknown {self.name} subset {self.subset!r}{did_you_mean(self.subset, subsets)} "
                f"(choose from {', '.join(subsets)})",
            )
        require(self.max_seq_length >= 8, join(path, "max_seq_length"), "must be >= 8")
        for key in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, key)
            require(v is None or v >= 1, join(path, key), f"must be >= 1 or null, got {v}")


@dataclass
class InferenceMeasurementConfig:
    """Post-training measurement of every run (``rankwise.measure.after_training``).

    Headline latency mean / p50 / p99: ``timed_batches`` timed forward passes over the primary
    evaluation split's batches as evaluation runs them (evaluation batch size, dynamic
    padding, cycling through the batches), after ``warmup`` untimed ones. Per length sweep: at
    ``batch_size`` (default: the evaluation batch size) and each of ``lengths`` (default: half
    of and the full ``dataset.max_seq_length``), one counting pass, ``warmup`` untimed and
    ``repeats`` timed passes. Trial mode caps it at the shortest length, 1 warm-up, 3 timed
    passes per length and 10 timed evaluation batches.
    """

    #: Measure after training (latency, length sweep, FLOPs per example); false: no timing, no
    #: files, the cost keys that need no forward pass still written.
    enabled: bool = True
    #: Sequence lengths of the sweep; null: half of and the full `dataset.max_seq_length`.
    lengths: list[int] | None = None
    #: Batch size of the sweep; null: the evaluation batch size.
    batch_size: int | None = None
    #: Untimed passes before the timed ones (headline latency and per sweep shape).
    warmup: int = 3
    #: Timed passes per sweep shape.
    repeats: int = 5
    #: Timed forward passes over the evaluation batches behind the latency mean, p50 and p99.
    timed_batches: int = 100
    #: Write the figures (FLOPs vs length, gate histogram).
    figures: bool = True

    def validate(self, path: str) -> None:
        if self.lengths is not None:
            require(len(self.lengths) >= 1, join(path, "lengths"), "must list at least one length")
            for i, n in enumerate(self.lengths):
                require(n >= 1, join(join(path, "lengths"), i), f"must be >= 1, got {n}")
        if self.batch_size is not None:
            require(self.batch_size >= 1, join(path, "batch_size"), f"must be >= 1, got {self.batch_size}")
        require(self.warmup >= 0, join(path, "warmup"), f"must be >= 0, got {self.warmup}")
        require(self.repeats >= 1, join(path, "repeats"), f"must be >= 1, got {self.repeats}")
        require(self.timed_batches >= 1, join(path, "timed_batches"),
                f"must be >= 1, got {self.timed_batches}")


@dataclass
class TrainingConfig:
    #: Passes over the training split.
    epochs: int = 3
    #: Training examples per optimizer step (per accumulation step), over all processes.
    batch_size: int = 32
    #: Evaluation batch size; null: `batch_size`.
    eval_batch_size: int | None = None
    #: Peak learning rate of the adapter (every trained parameter for full fine-tuning).
    learning_rate: float = 2e-4
    #: Learning rate of the classification head and pooler; null: `learning_rate`.
    head_learning_rate: float | None = None
    #: The optimizer.
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    #: Decoupled weight decay (AdamW), or L2 for Adam and SGD.
    weight_decay: float = 0.01
    #: Adam β1.
    adam_beta1: float = 0.9
    #: Adam β2.
    adam_beta2: float = 0.999
    #: Adam ε.
    adam_epsilon: float = 1e-8
    #: Learning-rate schedule after the warm-up.
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    #: Linear warm-up in optimizer steps (ignored when `warmup_ratio` is set).
    warmup_steps: int = 0
    #: Linear warm-up as a fraction of the optimizer steps; null: `warmup_steps`.
    warmup_ratio: float | None = None
    #: Batches per optimizer step.
    gradient_accumulation_steps: int = 1
    #: Clip the gradient norm to this; null: no clipping.
    max_grad_norm: float | None = 1.0
    #: Stop after this many optimizer steps; null: `epochs` decide.
    max_steps: int | None = None
    #: float16 autocast with a GradScaler. Honoured on CUDA; on the CPU only with
    #: `cpu_autocast` (else the run trains in float32, says so once, and metrics.json records
    #: precision: float32).
    fp16: bool = False
    #: bfloat16 autocast on CUDA (float32 on a machine without CUDA, said once); exclusive with
    #: `fp16`.
    bf16: bool = False
    #: Run fp16/bf16 on the CPU too, through torch's CPU autocast and the same GradScaler code
    #: as CUDA (a rehearsal of the GPU path; slower than float32 on most CPUs). Needs `fp16` or
    #: `bf16`. No effect on CUDA.
    cpu_autocast: bool = False
    #: The seed of a one-seed run, of every search trial, and the first of `n_seeds`.
    seed: int = 42
    #: Train once per seed into the one run folder; null: `n_seeds`, else `seed` alone.
    seeds: list[int] | None = None
    #: Train with seeds `seed`, `seed` + 1, ...; exclusive with `seeds`.
    n_seeds: int | None = None
    #: Optimizer steps between step logs (`history.jsonl`).
    log_every_n_steps: int = 50
    #: When to write a checkpoint.
    save_strategy: Literal["epoch", "steps", "no"] = "epoch"
    #: Optimizer steps between checkpoints with `save_strategy: steps`.
    save_every_n_steps: int | None = None
    #: Checkpoints kept per seed (the newest).
    save_total_limit: int = 2
    #: When to evaluate during training.
    evaluation_strategy: Literal["epoch", "steps", "no"] = "epoch"
    #: Optimizer steps between evaluations with `evaluation_strategy: steps`.
    eval_every_n_steps: int | None = None
    #: Ask torch for deterministic kernels (slower).
    deterministic: bool = False
    #: Run under `torch.autograd.set_detect_anomaly` (slow; for debugging).
    detect_anomaly: bool = False
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "num_workers": "it was accepted but never applied; batches are built in the training "
                       "process from the tokenised cache (no DataLoader workers)",
    }
    #: Group training batches by length (the order stays a pure function of seed and epoch, so
    #: resume is exact); false: the plain permutation and whole batches.
    group_by_length: bool = True
    #: `within_batch`: the plain batches, each sorted by length and run as `length_buckets`
    #: parts cut where they pad least, the part losses weighted by their share of rows (the
    #: batch's gradient unchanged); `megabatch`: batches cut from length-sorted mega-batches of
    #: `length_megabatch` batches, then shuffled (HF's LengthGroupedSampler; less padding, but
    #: it changes the batches).
    length_grouping: Literal["within_batch", "megabatch"] = "within_batch"
    #: Parts a batch is run in under `length_grouping: within_batch`.
    length_buckets: int = 2
    #: Batches per mega-batch under `length_grouping: megabatch`.
    length_megabatch: int = 50
    # AdamW/Adam kernel: "auto" = fused where torch has it for the device, else foreach
    #: The Adam/AdamW kernel: `auto` = fused where torch has it for the device, else foreach.
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    #: Overrides of the mechanism checks' thresholds (`engagement` in metrics.json) by name:
    #: `regulariser_share_min` (0.01), `regulariser_share_max` (0.5), `capacity_ratio_min`
    #: (0.67), `capacity_ratio_max` (1.5), `gate_movement_static_min` (0.1),
    #: `gate_movement_controller_min` (0.01), `rank_budget_tolerance` (0.05).
    engagement_thresholds: dict[str, float] = field(default_factory=dict)
    inference_measurement: InferenceMeasurementConfig = field(
        default_factory=InferenceMeasurementConfig)

    def validate(self, path: str) -> None:
        positive = ("epochs", "batch_size", "gradient_accumulation_steps", "log_every_n_steps",
                    "save_total_limit", "length_buckets", "length_megabatch")
        for key in positive:
            require(getattr(self, key) >= 1, join(path, key), f"must be >= 1, got {getattr(self, key)}")
        require(self.learning_rate > 0, join(path, "learning_rate"), f"must be > 0, got {self.learning_rate}")
        if self.head_learning_rate is not None:
            require(self.head_learning_rate > 0, join(path, "head_learning_rate"), "must be > 0")
        require(self.weight_decay >= 0, join(path, "weight_decay"), f"must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, join(path, "warmup_steps"), f"must be >= 0, got {self.warmup_steps}")
        if self.warmup_ratio is not None:
            require(0 <= self.warmup_ratio < 1, join(path, "warmup_ratio"), "must be in [0, 1)")
        if self.eval_batch_size is not None:
            require(self.eval_batch_size >= 1, join(path, "eval_batch_size"), "must be >= 1")
        if self.max_grad_norm is not None:
            require(self.max_grad_norm > 0, join(path, "max_grad_norm"), "must be > 0 or null")
        if self.max_steps is not None:
            require(self.max_steps >= 1, join(path, "max_steps"), "must be >= 1 or null")
        require(not (self.fp16 and self.bf16), join(path, "bf16"), "fp16 and bf16 are exclusive")
        require(not self.cpu_autocast or self.fp16 or self.bf16, join(path, "cpu_autocast"),
                "needs training.fp16 or training.bf16 (the precision to run on the CPU)")
        if self.seeds is not None:
            require(len(self.seeds) >= 1, join(path, "seeds"), "must list at least one seed")
            require(len(set(self.seeds)) == len(self.seeds), join(path, "seeds"), "seeds must be distinct")
        if self.n_seeds is not None:
            require(self.n_seeds >= 1, join(path, "n_seeds"), "must be >= 1")
            require(self.seeds is None, join(path, "n_seeds"), "give either seeds or n_seeds, not both")
        if self.save_strategy == "steps":
            require(self.save_every_n_steps is not None, join(path, "save_every_n_steps"),
                    "required when save_strategy is 'steps'")
        if self.save_every_n_steps is not None:
            require(self.save_every_n_steps >= 1, join(path, "save_every_n_steps"), "must be >= 1")
        if self.evaluation_strategy == "steps":
            require(self.eval_every_n_steps is not None and self.eval_every_n_steps >= 1,
                    join(path, "eval_every_n_steps"), "must be >= 1 when evaluation_strategy is 'steps'")

    def seed_list(self) -> list[int]:
        """The seeds the final configuration runs with (one run per seed)."""
        if self.seeds is not None:
            return list(self.seeds)
        if self.n_seeds is not None:
            return [self.seed + i for i in range(self.n_seeds)]
        return [self.seed]


@dataclass
class SearchSpaceEntry:
    #: The distribution the parameter is drawn from.
    type: Literal["loguniform", "uniform", "float", "int", "categorical", "discrete_uniform"]
    #: Lower bound (all types but `categorical`).
    low: float | None = None
    #: Upper bound (all types but `categorical`).
    high: float | None = None
    #: Grid step of `int`, `float` and `discrete_uniform` (not with a log scale).
    step: float | None = None
    #: Draw on a log scale (`loguniform` always does).
    log: bool = False
    #: The values of a `categorical` entry.
    choices: list[Any] | None = None

    def validate(self, path: str) -> None:
        if self.type == "categorical":
            require(bool(self.choices), join(path, "choices"), "categorical needs a non-empty list")
            return
        require(self.low is not None, join(path, "low"), f"required for type {self.type}")
        require(self.high is not None, join(path, "high"), f"required for type {self.type}")
        require(self.low <= self.high, join(path, "low"), f"low ({self.low}) > high ({self.high})")
        if self.type == "loguniform" or self.log:
            require(self.low > 0, join(path, "low"), "must be > 0 for a log scale")
        if self.step is not None:
            require(self.step > 0, join(path, "step"), "must be > 0")
            require(not (self.log or self.type == "loguniform"), join(path, "step"),
                    "step and log scale are exclusive")
        if self.type == "int":
            for key in ("low", "high"):
                v = getattr(self, key)
                require(float(v).is_integer(), join(path, key), f"must be an integer for type int, got {v}")


@dataclass
class OptunaConfig:
    #: Whether the search maximises or minimises `metric_name`.
    direction: Literal["maximize", "minimize"] = "maximize"
    #: The metric that scores a trial, by its metrics.json name (e.g. `validation_accuracy`),
    #: measured on the selection split.
    metric_name: str = "validation_accuracy"
    #: Trials before the final run; 0: no search.
    n_trials: int = 0
    #: Parameter name (an alias such as `learning_rate`, `lora_rank`, or a dotted path such as
    #: `training.adam_beta2`) to its distribution.
    search_space: dict[str, SearchSpaceEntry] = field(default_factory=dict)
    #: The study's database URL (e.g. `postgresql+psycopg2://...` for workers on several
    #: machines); null: SQLite at `<run>/optuna/study.db`.
    storage: str | None = None
    #: Seed of the TPE sampler; null: `training.seed`.
    sampler_seed: int | None = None
    #: How unpromising trials are stopped early; `none`: never.
    pruner: Literal["median", "percentile", "hyperband", "none"] = "median"
    #: With `pruner: percentile`, keep the trials above this percentile.
    pruner_percentile: float = 25.0
    #: Epochs of a trial that are never pruned.
    pruner_warmup_epochs: int = 0
    #: Trials that finish before any is pruned.
    n_startup_trials: int = 5
    #: Seconds between a running trial's heartbeats.
    heartbeat_interval: int = 30
    #: Seconds without a heartbeat after which a trial is declared dead and retried; null: twice
    #: `heartbeat_interval`.
    grace_period: int | None = None
    #: Stop starting new trials after this many seconds (then train the best so far); null: no
    #: limit.
    timeout_s: float | None = None
    #: What scores a trial: a fraction in (0, 1) holds out a seeded, stratified slice of the
    #: training split (trials train on the rest; the final run trains on all of it and reports
    #: on validation), or `validation` (selection on the reported split: optimistic).
    selection_split: float | str = 0.1

    def validate(self, path: str) -> None:
        if isinstance(self.selection_split, str):
            require(self.selection_split == "validation", join(path, "selection_split"),
                    f"must be a fraction in (0, 1) or 'validation', got {self.selection_split!r}")
        else:
            require(0 < self.selection_split < 1, join(path, "selection_split"),
                    f"must be a fraction in (0, 1) or 'validation', got {self.selection_split}")
        require(self.n_trials >= 0, join(path, "n_trials"), f"must be >= 0, got {self.n_trials}")
        require(self.heartbeat_interval >= 1, join(path, "heartbeat_interval"), "must be >= 1")
        # A grace period shorter than the heartbeat interval declares live trials dead.
        require(self.grace_period is None or self.grace_period > self.heartbeat_interval,
                join(path, "grace_period"),
                f"must exceed heartbeat_interval ({self.heartbeat_interval}), got {self.grace_period}")
        require(0 < self.pruner_percentile < 100, join(path, "pruner_percentile"),
                f"must be in (0, 100), got {self.pruner_percentile}")
        require(self.pruner_warmup_epochs >= 0, join(path, "pruner_warmup_epochs"), "must be >= 0")
        require(self.n_startup_trials >= 0, join(path, "n_startup_trials"), "must be >= 0")
        require(self.timeout_s is None or self.timeout_s > 0, join(path, "timeout_s"),
                "must be > 0 or null")

    @property
    def selection_label(self) -> str:
        """``validation`` or ``train_holdout_<fraction>`` (metrics.json, trials.csv)."""
        if self.selection_split == "validation":
            return "validation"
        return f"train_holdout_{self.selection_split:g}"

    @property
    def selection_optimistic(self) -> bool:
        """Whether trials are scored on the split the final run reports (validation)."""
        return self.selection_split == "validation"


@dataclass
class RunConfig:
    #: Names the run and its folder `<results_dir>/<run_id>/`; file-name-safe characters only.
    run_id: str
    #: The run's role label: `proposed`, `baseline`, `comparative-<n>` or `ablation-<name>`; the
    #: algorithm is read from `model.adapter`.
    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optuna: OptunaConfig = field(default_factory=OptunaConfig)

    def validate(self, path: str) -> None:
        require(bool(re.fullmatch(r"[A-Za-z0-9_.+-]+", self.run_id)), "run_id",
                f"must be a file-name-safe id, got {self.run_id!r}")
        require(bool(ROLE_PATTERN.match(self.method)), "method",
                f"role label {self.method!r} is not one of proposed, baseline, comparative-<n>, "
                "ablation-<name>")
        from rankwise.methods import importance_weightable_types, registered_methods

        iw = self.model.importance_weighted_regularisation
        weightable = importance_weightable_types()
        if iw.enabled and self.adapter_type not in weightable:
            raise ConfigError(
                "model.importance_weighted_regularisation.enabled",
                f"IW regularisation needs a LoRA-family model.adapter.type ({', '.join(weightable)}), "
                f"got {self.adapter_type!r}",
            )
        if self.algorithm not in registered_methods():
            key = ("model.importance_weighted_regularisation.enabled" if iw.enabled
                   else "model.adapter.type")
            raise ConfigError(key, f"method {self.algorithm!r} is not available in this build")
        if getattr(self.model.adapter, "eval_gates", None) == "select" and not (
                self.optuna.n_trials > 0 and self.optuna.selection_split != "validation"):
            raise ConfigError("model.adapter.eval_gates",
                              "select chooses the rule on a search's held-out selection slice: it needs "
                              "optuna.n_trials > 0 and optuna.selection_split a fraction")
        from rankwise.metrics import metric_names_for

        names = metric_names_for(self.dataset.name, self.dataset.subset)
        if self.optuna.metric_name not in names:
            raise ConfigError(
                "optuna.metric_name",
                f"{self.optuna.metric_name!r} is not produced by {self.dataset.name}/"
                f"{self.dataset.subset} (available: {', '.join(names)})",
            )

    @property
    def adapter_type(self) -> str:
        from rankwise.methods import FULL

        return FULL if self.model.adapter is None else self.model.adapter.type

    @property
    def algorithm(self) -> str:
        """Registry name of the method this config selects (``rankwise.methods``)."""
        from rankwise.methods import method_for_adapter_type

        try:
            return method_for_adapter_type(self.adapter_type,
                                           self.model.importance_weighted_regularisation.enabled)
        except KeyError as missing:  # validate names the key
            return str(missing.args[0])


def parse_adapter(raw: Any, path: str) -> Any:
    """Validate ``model.adapter`` against the dataclass its ``type`` registers."""
    if raw is None:
        return None
    if dataclasses_is_instance(raw):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping with a 'type' key, got {type(raw).__name__}")
    from rankwise.config.typed import did_you_mean
    from rankwise.methods import FULL, adapter_types, method_for_adapter_type, registered_methods

    known = adapter_types()
    kind = raw.get("type")
    if kind is None:
        raise ConfigError(join(path, "type"), f"required (one of {', '.join(known)})")
    if kind == FULL:
        check_known_keys(raw, ["type"], path)
        return None
    if kind not in known:
        raise ConfigError(
            join(path, "type"),
            f"unknown adapter type {kind!r}{did_you_mean(str(kind), list(known))} (choose from {', '.join(known)})",
        )
    return from_mapping(registered_methods()[method_for_adapter_type(kind)].config_cls, raw, path)


def dataclasses_is_instance(obj: Any) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def parse_run_config(data: Any) -> RunConfig:
    return from_mapping(RunConfig, data, "")
