"""Optional Weights & Biases tracking (``wandb.mode: offline|online``), imported lazily.

Local files are always written; W&B mirrors the step logs and final metrics.
"""

from __future__ import annotations

from typing import Any

from rankwise.errors import ConfigError


class Tracker:
    def __init__(self, run: Any = None):
        self._run = run

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()


def start_tracker(wandb_cfg, run_id: str, config: dict[str, Any], run_dir, enabled: bool) -> Tracker:
    if not enabled or wandb_cfg.mode == "disabled":
        return Tracker()
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb.mode", f"{wandb_cfg.mode!r} needs the wandb package "
                                        "(pip install 'rankwise[wandb]') or wandb.mode=disabled") from None
    run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=run_id, config=config,
                     mode=wandb_cfg.mode, dir=str(run_dir), reinit=True)
    return Tracker(run)
