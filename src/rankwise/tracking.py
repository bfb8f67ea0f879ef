"""Optional Weights & Biases tracking (``wandb.mode: offline|online``), imported lazily.

Local files are always written; W&B mirrors them. The W&B run is *identified* by the run id
(``id=run_id``, ``resume="allow"``), so re-running a run id continues its W&B run instead of
starting a new one. It holds:

- config: the resolved run config, the job keys (``job``) and any kept-aside top-level
  sections (``ignored_sections``);
- history: every seed's step and evaluation records, as ``seed<N>/<key>`` against
  ``seed<N>/step``;
- summary: ``status`` (``running`` → ``complete`` | ``failed`` | ``interrupted``), every final
  metric by its metrics.json name, ``std/<metric>``, ``ci95_low/<metric>``,
  ``ci95_high/<metric>``, and after a search ``search/<key>``.
A failed or interrupted run finishes its W&B run with a non-zero exit code.
"""

from __future__ import annotations

from typing import Any

from rankwise.errors import ConfigError


def require_wandb(mode: str) -> Any:
    """The ``wandb`` module, or a ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb.mode", f"{mode!r} needs the wandb package "
                                        "(pip install 'rankwise[wandb]') or wandb.mode=disabled") from None
    return wandb


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """A W&B run, or nothing (every method is then a no-op)."""

    def __init__(self, run: Any = None):
        self._run = run

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(_numbers(record), step=step)

    def log_history(self, seed: int, history: list[dict[str, Any]]) -> None:
        """One seed's step/eval records as ``seed<N>/<key>`` against ``seed<N>/step``."""
        if self._run is None:
            return
        prefix = f"seed{seed}"
        self._run.define_metric(f"{prefix}/step")
        self._run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
        for record in history:
            values = {f"{prefix}/{k}": v for k, v in _numbers(record).items() if k != "step"}
            if values:
                self._run.log({**values, f"{prefix}/step": record.get("step", 0)})

    def summary(self, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(metrics)

    def complete(self, metrics: dict[str, Any]) -> None:
        """Final metrics (mean over seeds), their spread, the search block; status complete."""
        if self._run is None:
            return
        out: dict[str, Any] = dict(_numbers(metrics.get("final", {})))
        out.update({f"std/{k}": v for k, v in _numbers(metrics.get("std", {})).items()})
        for k, (lo, hi) in (metrics.get("ci95") or {}).items():
            out[f"ci95_low/{k}"], out[f"ci95_high/{k}"] = lo, hi
        for k, v in (metrics.get("search") or {}).items():
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                out[f"search/{k}"] = v
        out["seeds"] = len(metrics.get("seeds", []))
        out["status"] = "complete"
        self._run.summary.update(out)
        self.finish()

    def fail(self, status: str, error: str) -> None:
        """Mark the W&B run ``failed`` / ``interrupted`` and finish it with exit code 1."""
        if self._run is None:
            return
        self._run.summary.update({"status": status, "error": error[:500]})
        self.finish(exit_code=1)

    def finish(self, exit_code: int | None = None) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=exit_code)


def start_tracker(wandb_cfg, run_id: str, config: dict[str, Any], run_dir, enabled: bool) -> Tracker:
    """A W&B run identified by ``run_id`` (``resume="allow"``), or a no-op Tracker."""
    if not enabled or wandb_cfg.mode == "disabled":
        return Tracker()
    wandb = require_wandb(wandb_cfg.mode)
    run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, id=run_id, name=run_id,
                     resume="allow", config=config, mode=wandb_cfg.mode, dir=str(run_dir))
    run.summary.update({"status": "running"})
    return Tracker(run)
