"""The one typed, validated run schema: YAML (Hydra/OmegaConf) -> ``RunConfig`` -> builders.

A run file has six top-level keys: ``run_id``, ``method``, ``model``, ``dataset``,
``training``, ``optuna``. ``method`` is a *role label* (``proposed``, ``comparative-1``,
``baseline``, ``ablation-<name>``); the algorithm is resolved from the content
(:meth:`RunConfig.algorithm`):

=============================================  ===================================
``model.adapter``                              algorithm
=============================================  ===================================
absent / ``null`` / ``type: full``             ``full_ft``
``type: lora`` + IW regularisation disabled    ``lora``
``type: lora`` + IW regularisation enabled     ``iw_lora``
``type: adalora``                              ``adalora``
``type: spectral | bhsp | cbsp | tabs``        same name
=============================================  ===================================
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
    """IW-LoRA (methods.md §4): calibration, importance weights, weighted L2 penalty."""

    enabled: bool = False
    reg_alpha: float = 1e-4
    beta: float = 1.0
    sensitivity_warmup_steps: int = 150
    sensitivity_buffer_size: int = 1024
    freeze_lora_during_warmup: bool = True
    sensitivity: Literal["grad_norm", "grad_sq"] = "grad_norm"
    normalise: Literal["sum", "max"] = "sum"
    penalty_on: Literal["delta", "factors"] = "delta"
    # "uniform": every coefficient c_k = 1 (the same L2 at the same α, no calibration): the
    # control that isolates what the importance weights add.
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
    name: str = "minilm"
    # The config dataclass its ``type`` registered (parse_adapter), or None: full fine-tuning.
    adapter: Any = field(default=None, metadata={"convert": lambda raw, path: parse_adapter(raw, path)})
    importance_weighted_regularisation: IWRegularisationConfig = field(
        default_factory=IWRegularisationConfig
    )
    tokenizer: str | None = None
    # Overrides the per-architecture default target modules (methods/targets.py), for every
    # method: the one home of this fact.
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
    train: str = "train"
    validation: str = "validation"
    # Further evaluation splits (e.g. MNLI's validation_mismatched). ``None`` = task default,
    # evaluated only where the source has it.
    extra_validation: list[str] | None = None


@dataclass
class PreprocessingConfig:
    truncation: bool = True
    # Batches are always padded dynamically to the longest sequence in the batch: masked
    # padding does not change an encoder's outputs (tested), so ``max_length`` is accepted
    # and logged once.
    padding: Literal["max_length", "longest", "dynamic", True, False] = "longest"


@dataclass
class ListOpsConfig:
    """LRA ListOps generation (Tay et al. 2021, following Nangia & Bowman 2018)."""

    min_length: int = 500  # exclusive, in tokens of the printed expression
    max_length: int = 2000  # exclusive
    max_depth: int = 10
    min_args: int = 2
    max_args: int = 10
    operator_prob: float = 0.25
    n_train: int = 96000
    n_validation: int = 2000
    n_test: int = 2000
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
    name: Literal["glue", "lra"] = "glue"
    subset: str = "rte"
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    max_seq_length: int = 128
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # Local mirror with the hub layout: <data_dir>/<subset>/<split>-00000-of-00001.parquet.
    # Default: env RANKWISE_DATA_DIR; else the hub.
    data_dir: str | None = None
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

    enabled: bool = True
    lengths: list[int] | None = None
    batch_size: int | None = None
    warmup: int = 3
    repeats: int = 5
    timed_batches: int = 100
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
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int | None = None
    learning_rate: float = 2e-4
    head_learning_rate: float | None = None
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    # Mixed precision: autocast to float16 (with a GradScaler) or bfloat16. Honoured on CUDA;
    # on the CPU only with cpu_autocast (else the run trains in float32 and metrics.json
    # records precision: float32).
    fp16: bool = False
    bf16: bool = False
    # true: run fp16/bf16 on the CPU too, through torch's CPU autocast and the same GradScaler
    # code as CUDA (a rehearsal of the GPU path; slower than float32 on most CPUs). Needs fp16
    # or bf16. No effect on CUDA.
    cpu_autocast: bool = False
    seed: int = 42
    seeds: list[int] | None = None
    n_seeds: int | None = None
    log_every_n_steps: int = 50
    save_strategy: Literal["epoch", "steps", "no"] = "epoch"
    save_every_n_steps: int | None = None
    save_total_limit: int = 2
    evaluation_strategy: Literal["epoch", "steps", "no"] = "epoch"
    eval_every_n_steps: int | None = None
    deterministic: bool = False
    detect_anomaly: bool = False
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "num_workers": "it was accepted but never applied; batches are built in the training "
                       "process from the tokenised cache (no DataLoader workers)",
    }
    # Length grouping of training batches (the order is a pure function of (seed, epoch), so
    # resume stays exact). "within_batch": the plain batches, each sorted by length and run as
    # `length_buckets` parts cut where they pad to the fewest tokens, each padded to its own
    # longest row, with the part losses weighted by their share of rows (the batch's rows and
    # gradient unchanged, less padding);
    # "megabatch": batches cut from length-sorted mega-batches of `length_megabatch` batches of
    # the shuffled order, then shuffled (HF's LengthGroupedSampler: less padding still, but
    # each batch holds rows of similar length).
    group_by_length: bool = True
    length_grouping: Literal["within_batch", "megabatch"] = "within_batch"
    length_buckets: int = 2
    length_megabatch: int = 50
    # AdamW/Adam kernel: "auto" = fused where torch has it for the device, else foreach
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
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
    type: Literal["loguniform", "uniform", "float", "int", "categorical", "discrete_uniform"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
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
    direction: Literal["maximize", "minimize"] = "maximize"
    metric_name: str = "validation_accuracy"
    n_trials: int = 0
    search_space: dict[str, SearchSpaceEntry] = field(default_factory=dict)
    storage: str | None = None  # default: sqlite file in the run's results folder
    sampler_seed: int | None = None  # default: training.seed
    pruner: Literal["median", "percentile", "hyperband", "none"] = "median"
    pruner_percentile: float = 25.0  # pruner: percentile keeps trials above this percentile
    pruner_warmup_epochs: int = 0
    n_startup_trials: int = 5
    heartbeat_interval: int = 30
    grace_period: int | None = None  # default: 2 x heartbeat_interval
    timeout_s: float | None = None
    # What scores a trial: a fraction in (0, 1) = a seeded, stratified held-out slice of the
    # training split (trials train on the rest; the final run trains on all of it and reports
    # on validation), or "validation" (selection on the reported split: optimistic).
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
    run_id: str
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
        iw = self.model.importance_weighted_regularisation
        if iw.enabled and self.adapter_type != "lora":
            raise ConfigError(
                "model.importance_weighted_regularisation.enabled",
                f"IW regularisation needs model.adapter.type: lora, got {self.adapter_type!r}",
            )
        from rankwise.methods import registered_methods

        if self.algorithm not in registered_methods():
            key = ("model.importance_weighted_regularisation.enabled" if self.algorithm == "iw_lora"
                   else "model.adapter.type")
            raise ConfigError(key, f"method {self.algorithm!r} is not available in this build")
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

        t = self.adapter_type
        if t == "lora" and self.model.importance_weighted_regularisation.enabled:
            return "iw_lora"
        return method_for_adapter_type(t)


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
