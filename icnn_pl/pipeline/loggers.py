"""Experiment loggers (W&B, CSV, TensorBoard) and what a job shows in them.

W&B runs offline by default (no key, no network) inside the run directory; ``wandb sync``
of ``<run dir>/wandb/offline-run-*`` later fills the dashboard. Images are logged as
uint8 (float images in [0, 1] show up black in W&B).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from icnn_pl.errors import ConfigError

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


def check_logger(kind: str, mode: str = "offline") -> None:
    """A known logger kind, and for W&B a known mode (checked before any work starts)."""
    if kind not in LOGGERS:
        raise ConfigError(f"unknown logger {kind!r}", f"use one of {list(LOGGERS)}")
    if kind == "wandb" and mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={mode!r} is not a W&B mode",
                          "use offline (default), online or disabled")


def _csv(save_dir: Path, **_: Any) -> Logger:
    return CSVLogger(save_dir, name="csv", version="")


def _tensorboard(save_dir: Path, **_: Any) -> Logger:
    return TensorBoardLogger(save_dir, name="tensorboard", version="")


def _wandb(save_dir: Path, *, name: str, project: str, group: str | None, mode: str,
           tags: Sequence[str], config: Mapping[str, Any] | None) -> Logger:
    import wandb

    save_dir.mkdir(parents=True, exist_ok=True)
    # Started here, not through WandbLogger: Lightning hands wandb.init its deprecated
    # ``anonymous`` setting, which makes every run print a warning the user cannot act on.
    # No console capture or system stats: the job's own log is the record.
    run = wandb.init(
        project=project, name=name, group=group, dir=str(save_dir), mode=mode,
        tags=list(tags), config=dict(config or {}),
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    # the x axis WandbLogger sets up when it starts a run itself
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    return WandbLogger(experiment=run, save_dir=str(save_dir))


#: logger kind -> factory (``none`` gives no logger); a new logger goes here.
LOGGERS: dict[str, Callable[..., Logger] | None] = {
    "wandb": _wandb, "csv": _csv, "tensorboard": _tensorboard, "none": None,
}


def make_logger(
    kind: str, save_dir: str | Path, name: str, *, project: str = "icnn-pl",
    group: str | None = None, mode: str = "offline", tags: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
) -> Logger | None:
    """One logger per job (``none`` gives None); W&B starts at once, so a broken W&B
    fails before any work."""
    check_logger(kind, mode)
    factory = LOGGERS[kind]
    if factory is None:
        return None
    return factory(Path(save_dir), name=name, project=project, group=group, mode=mode,
                   tags=tags, config=config)


def log_image(logger: Logger | None, label: str, recon: np.ndarray,
              true: np.ndarray | None, step: int) -> None:
    """One reconstruction beside its true image (both uint8 HxWx3)."""
    if isinstance(logger, WandbLogger):
        import wandb

        images = [wandb.Image(recon, caption=f"{label} reconstruction")]
        if true is not None:
            images.insert(0, wandb.Image(true, caption=f"{label} true"))
        logger.experiment.log({"reconstructions": images, "image_index": step})
    elif isinstance(logger, TensorBoardLogger):
        pair = recon if true is None else np.concatenate([true, recon], axis=1)
        logger.experiment.add_image(f"recon/{label}", pair, step, dataformats="HWC")


def log_curve(logger: Logger | None, label: str, history: np.ndarray) -> None:
    """A whole loss curve at once (L-BFGS runs in one Trainer step, so its per-evaluation
    losses are logged after the fact under the same key as GD's per-step losses)."""
    if logger is None:
        return
    for i, v in enumerate(np.asarray(history, dtype=float)):
        logger.log_metrics({f"loss/{label}": float(v)}, step=i)


def log_summary(logger: Logger | None, rows: Sequence[Mapping[str, Any]],
                images: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                summary: Mapping[str, float], figures: Mapping[str, np.ndarray]) -> None:
    """Per-image table (true image, reconstruction, numbers), summary metrics, figures."""
    if logger is None:
        return
    logger.log_metrics({f"summary/{k}": v for k, v in summary.items()
                        if isinstance(v, int | float) and np.isfinite(v)})
    if isinstance(logger, WandbLogger):
        import wandb

        keys = [k for k in rows[0] if k != "label"] if rows else []
        table = wandb.Table(columns=["label", "true", "reconstruction", *keys])
        for r in rows:
            recon, true = images.get(r["label"], (None, None))
            table.add_data(
                r["label"], None if true is None else wandb.Image(true),
                None if recon is None else wandb.Image(recon), *[r.get(k) for k in keys])
        logger.experiment.log({"results": table,
                               **{k: wandb.Image(v) for k, v in figures.items()}})
        for k, v in summary.items():
            logger.experiment.summary[k] = v
    elif isinstance(logger, TensorBoardLogger):
        for k, v in figures.items():
            logger.experiment.add_image(k, v, 0, dataformats="HWC")


def finish(logger: Logger | None, status: str = "success") -> None:
    """Close the run (W&B needs ``wandb.finish()`` between jobs in one process)."""
    if logger is None:
        return
    logger.finalize(status)
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish(exit_code=0 if status == "success" else 1)
