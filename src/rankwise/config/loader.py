"""Compose a job from ``configs/config.yaml``, one run file and CLI overrides.

CLI arguments use Hydra's override grammar (parsed by Hydra's own parser), e.g.::

    python -m rankwise.main run=<run_id|path.yaml> results_dir=R mode=trial \
        model.name=minilm dataset.subset=rte 'training.seeds=[1,2,3]'

Keys whose first component is a run-schema section (``run_id``, ``method``, ``model``,
``dataset``, ``training``, ``optuna``) override the run file; the others are job keys
(``run``, ``runs_dir``, ``results_dir``, ``mode``, ``resume``, ``device``, ``wandb.*``). The
composed plain dicts go through OmegaConf (interpolation, merging) and then the typed schema.

``run=<id>`` resolves, in order: a path to a YAML file; ``<runs_dir>/<id>.yaml`` (default
``config/runs`` under the working directory); the packaged ``configs/runs/<id>.yaml``.

A run file's top-level sections other than the six above are kept aside (``Job.ignored_sections``,
recorded in metrics.json) unless the name is close to a known section (``modle``), which is an
error. Unknown keys inside known sections are errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf

from rankwise.config.schema import RunConfig, parse_run_config
from rankwise.config.typed import did_you_mean, from_mapping, require
from rankwise.data.tasks import known_splits
from rankwise.errors import ConfigError

RUN_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))
# An unknown top-level section this close to a known one (difflib ratio) is taken for a typo.
SECTION_TYPO_CUTOFF = 0.8


@dataclass
class WandbConfig:
    #: Mirror the run to Weights & Biases (`offline`, `online`; full mode only, needs `pip
    #: install -e '.[wandb]'`); local files are always written.
    mode: Literal["disabled", "offline", "online"] = "disabled"
    #: The W&B project.
    project: str = "rankwise"
    #: The W&B team or user; null: your default entity.
    entity: str | None = None


@dataclass
class JobConfig:
    #: The run config: a path to a YAML file, or a run id looked up as `<runs_dir>/<id>.yaml`,
    #: then the packaged `configs/runs/<id>.yaml`.
    run: str
    #: Where `run=<id>` is looked for first (relative to the working directory).
    runs_dir: str = "config/runs"
    #: The run writes `<results_dir>/<run_id>/`.
    results_dir: str = "results"
    #: `full`: as configured (a search first when `optuna.n_trials > 0`); `trial`: a smoke run
    #: after every check the full run makes: 1 epoch, the first seed, at most 2 training and 2
    #: evaluation batches, no search, no checkpoints, no W&B.
    mode: Literal["trial", "full"] = "full"
    #: `auto`: continue a run folder whose run is incomplete and has a checkpoint; `true`:
    #: require such a checkpoint; `false`: start over.
    resume: Literal["auto", True, False] = "auto"
    #: `auto`: CUDA when available, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    #: Train only this seed (one of the run's seeds) into `<run_dir>/seed<N>/`, ending with
    #: `seed<N>/result.json` instead of the run's `metrics.json`; after a search, with the
    #: finished study's best parameters. The grid's seed cells; `merge_seeds` joins them.
    seed_only: int | None = None
    #: Write the run's `metrics.json` from the seeds that `seed_only` trained (every seed of
    #: the run must be complete); trains nothing.
    merge_seeds: bool = False
    #: Run at most this many trials of the run's search in this process (on the shared study),
    #: then exit without the final run. The grid's search cells.
    max_trials: int | None = None

    def validate(self, path: str) -> None:
        parts = [k for k, on in (("seed_only", self.seed_only is not None), ("merge_seeds", self.merge_seeds),
                                 ("max_trials", self.max_trials is not None)) if on]
        require(len(parts) <= 1, parts[-1] if parts else "seed_only",
                f"{' and '.join(parts)} exclude each other: a process does one part of a run")
        require(self.max_trials is None or self.max_trials >= 1, "max_trials",
                f"must be >= 1, got {self.max_trials}")


@dataclass(frozen=True)
class RunLimits:
    """The caps a run trains under that no run key expresses; a full run has none.

    ``max_batches``: training batches per epoch and evaluation batches per split (the data
    loaded is cut to the rows they read; the data check still reads the configured rows).
    ``calibration_batches``: the batches a method's calibration may read.
    ``max_seeds``: how many of ``training.seeds`` run (the first ones)."""

    max_batches: int | None = None
    calibration_batches: int | None = None
    max_seeds: int | None = None

    def seeds(self, run: RunConfig) -> list[int]:
        """The seeds the run trains: the configured ones, the first ``max_seeds`` of them."""
        return run.training.seed_list()[: self.max_seeds]


# mode=trial: a smoke run of the whole pipeline (see resolve_mode).
TRIAL_LIMITS = RunLimits(max_batches=2, calibration_batches=1, max_seeds=1)
TRIAL_MEASUREMENT = {"warmup": 1, "repeats": 3, "timed_batches": 10}


def resolve_mode(run: RunConfig, mode: str) -> tuple[RunConfig, RunLimits]:
    """The run's values under ``mode``, resolved once at load: nothing downstream reads the mode.

    ``full`` changes nothing. ``trial`` is a smoke run: one epoch (no ``max_steps``),
    evaluated at its end, no checkpoints, no search (``optuna.n_trials=0``), and a
    measurement pass at the shortest length with at most 1 warm-up, 3 timed passes per
    length and 10 timed evaluation batches; its ``RunLimits``: the first seed only, at most
    two training batches and two evaluation batches per split, one calibration batch."""
    if mode == "full":
        return run, RunLimits()
    t = run.training
    m = t.inference_measurement
    max_len = run.dataset.max_seq_length
    shortest = min(m.lengths or [max(1, max_len // 2), max_len])
    measurement = dataclasses.replace(
        m, lengths=[shortest], **{k: min(getattr(m, k), v) for k, v in TRIAL_MEASUREMENT.items()})
    training = dataclasses.replace(
        t, epochs=1, max_steps=None, evaluation_strategy="epoch", save_strategy="no",
        save_every_n_steps=None, inference_measurement=measurement)
    optuna = dataclasses.replace(run.optuna, n_trials=0)
    return dataclasses.replace(run, training=training, optuna=optuna), TRIAL_LIMITS


@dataclass
class Job:
    command: JobConfig  # the command's own keys: run, results_dir, mode, resume, device, wandb
    run: RunConfig  # the run's values under the command's mode (resolve_mode)
    run_dict: dict[str, Any]  # the run config as written (schema-checked): search, config.yaml
    # Top-level sections of the run file that rankwise does not use (kept, recorded, warned about).
    ignored_sections: dict[str, Any] = field(default_factory=dict)
    limits: RunLimits = field(default_factory=RunLimits)  # caps from the mode (resolve_mode)
    # The run as written, before the mode trimmed it: what preflight checks in every mode.
    configured_run: RunConfig | None = None
    # Set once training (or the search) has begun: errors before it leave no run folder behind.
    training_started: bool = False
    # seed_only / merge_seeds: what a seed's result.json must match (runner.seed_identity)
    seed_identity: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.command.results_dir) / self.run.run_id

    @property
    def as_configured(self) -> RunConfig:
        return self.configured_run or self.run

    def with_run(self, run_dict: dict[str, Any]) -> Job:
        """This job's command with another run config (a search trial, the best parameters,
        a bench variant), parsed and resolved for the command's mode like the original."""
        return make_job(self.command, run_dict, self.ignored_sections)


def make_job(command: JobConfig, run_dict: dict[str, Any],
             ignored_sections: dict[str, Any] | None = None) -> Job:
    """The one way a Job is built: schema-checked run config, resolved for the mode."""
    configured = parse_run_config(run_dict)
    run, limits = resolve_mode(configured, command.mode)
    return Job(command=command, run=run, run_dict=run_dict,
               ignored_sections=dict(ignored_sections or {}), limits=limits,
               configured_run=configured)


def packaged_configs() -> Path:
    return Path(str(resources.files("rankwise") / "configs"))


def available_runs() -> list[str]:
    return sorted(p.stem for p in (packaged_configs() / "runs").glob("*.yaml"))


def read_yaml(path: Path, key: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(key, f"{path} is not valid YAML ({problem}{where})") from None
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path} must hold a mapping at top level")
    return data


def run_file_candidates(run: str, runs_dir: str | Path) -> list[Path]:
    """Where ``run=<run>`` is looked for, in order: a path, ``<runs_dir>/<run>.yaml``, packaged."""
    as_path = Path(run).expanduser()
    candidates = []
    if run.endswith((".yaml", ".yml")) or "/" in run or as_path.is_file():
        candidates.append(as_path)
    if "/" not in run:
        name = run if run.endswith((".yaml", ".yml")) else f"{run}.yaml"
        candidates += [Path(runs_dir).expanduser() / name, packaged_configs() / "runs" / name]
    return candidates


def locate_run_file(run: str, runs_dir: str | Path = "config/runs") -> Path:
    candidates = run_file_candidates(run, runs_dir)
    for path in candidates:
        if path.is_file():
            return path
    local = sorted(p.stem for p in Path(runs_dir).expanduser().glob("*.yaml"))
    looked = "; ".join(str(p) for p in candidates)
    raise ConfigError("run", f"no run config {run!r}{did_you_mean(run, local + available_runs())} "
                             f"(looked in: {looked})")


def split_run_sections(run_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's known sections, other top-level sections). A name close to a known section
    (``modle``) is a typo: ConfigError with a "did you mean"."""
    import difflib

    known, other = {}, {}
    for key, value in run_dict.items():
        if key in RUN_SECTIONS:
            known[key] = value
            continue
        close = difflib.get_close_matches(str(key).lower(), RUN_SECTIONS, n=1,
                                          cutoff=SECTION_TYPO_CUTOFF)
        if close:
            raise ConfigError(str(key), f"unknown section; did you mean '{close[0]}'? "
                                        f"(sections: {', '.join(RUN_SECTIONS)})")
        other[key] = value
    return known, other


def check_splits(run: RunConfig) -> None:
    """Every ``dataset.splits`` name must be one the task publishes (before anything is loaded)."""
    ds = run.dataset
    names = known_splits(ds.name, ds.subset)
    keys = [("dataset.splits.train", ds.splits.train),
            ("dataset.splits.validation", ds.splits.validation)]
    keys += [(f"dataset.splits.extra_validation.{i}", name)
             for i, name in enumerate(ds.splits.extra_validation or [])]
    for key, name in keys:
        if name not in names:
            raise ConfigError(key, f"unknown split {name!r} of {ds.name}/{ds.subset}"
                                   f"{did_you_mean(str(name), names)} (splits: {', '.join(names)})")


def parse_overrides(argv: list[str]) -> list[tuple[str, Any, bool]]:
    """Hydra-grammar ``key=value`` strings -> (key, python value, is_delete)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for arg in argv:
        try:
            (ov,) = parser.parse_overrides([arg])
        except HydraException as exc:
            key = arg.split("=", 1)[0].lstrip("+~") if "=" in arg else arg
            msg = str(exc).strip().splitlines()[0]
            raise ConfigError(key or "<cli>", f"cannot parse override {arg!r}: {msg}") from None
        value = None if ov.is_delete() else ov.value()
        parsed.append((ov.key_or_group, _plain(value), ov.is_delete()))
    return parsed


def _plain(value: Any) -> Any:
    """Hydra's parsed values -> plain python (lists/dicts)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set_dotted(cfg: dict, key: str, value: Any, delete: bool) -> None:
    conf = OmegaConf.create(cfg)
    if delete:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(conf, parent_key) if parent_key else conf
        if parent is None or leaf not in parent:
            raise ConfigError(key, "cannot delete a key that is not set")
        del parent[leaf]
    else:
        OmegaConf.update(conf, key, value, merge=True, force_add=True)
    cfg.clear()
    cfg.update(OmegaConf.to_container(conf, resolve=False))


def _resolve(cfg: dict, key: str) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except Exception as exc:  # interpolation errors
        raise ConfigError(getattr(exc, "full_key", None) or key, str(exc).splitlines()[0]) from None


def load_job(argv: list[str]) -> Job:
    """Parse CLI args into a validated Job, before any heavy work. Raises ConfigError."""
    overrides = parse_overrides(argv)
    job_dict = read_yaml(packaged_configs() / "config.yaml", "config.yaml")
    run_overrides = []
    for key, value, delete in overrides:
        head = key.split(".", 1)[0]
        if head in RUN_SECTIONS:
            run_overrides.append((key, value, delete))
        elif head in job_dict:
            _set_dotted(job_dict, key, value, delete)
        else:
            known = list(job_dict) + list(RUN_SECTIONS)
            raise ConfigError(key, f"unknown key{did_you_mean(head, known)}")
    if job_dict.get("run") in (None, "???"):
        raise ConfigError("run", "required: run=<run_id> or run=<path/to/run.yaml>")
    job_dict["run"] = str(job_dict["run"])
    job = from_mapping(JobConfig, _resolve(job_dict, "config"), "")

    run_dict = read_yaml(locate_run_file(job.run, job.runs_dir), "run")
    split_run_sections(run_dict)  # a typo'd section name fails before anything else
    for key, value, delete in run_overrides:
        _set_dotted(run_dict, key, value, delete)
    # resolved whole, so interpolations may point into the kept-aside sections
    run_dict, ignored = split_run_sections(_resolve(run_dict, "run"))
    built = make_job(job, run_dict, ignored)
    check_splits(built.run)
    check_run_part(built)
    return built


def check_run_part(job: Job) -> None:
    """``seed_only`` names one of the seeds the run trains; ``max_trials`` needs a search."""
    c = job.command
    seeds = job.limits.seeds(job.run)
    if c.seed_only is not None and c.seed_only not in seeds:
        raise ConfigError("seed_only", f"seed {c.seed_only} is not one of the run's seeds "
                                       f"({', '.join(map(str, seeds))})")
    if c.max_trials is not None and job.run.optuna.n_trials < 1:
        raise ConfigError("max_trials", "the run has no search (optuna.n_trials is 0"
                                        + (" in mode=trial" if c.mode == "trial" else "") + ")")
