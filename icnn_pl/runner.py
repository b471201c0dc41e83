"""Run one ``Reconstruction`` with a lean, fresh Lightning ``Trainer``.

A finished Trainer runs no steps on a second ``fit``, so every reconstruction gets its
own; the Trainer is cheap (~10-80 ms) next to the hundreds of VGG passes it drives.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from icnn_pl.module import ReconResult, Reconstruction

# Per-image Trainers would otherwise print the same device banner for every image.
for _name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
              "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*on_step.*batch_size.*")
warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")


def device_trainer_args(device: torch.device | str) -> dict[str, Any]:
    """Trainer ``accelerator``/``devices`` that run on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    if device.type == "mps":
        return {"accelerator": "mps", "devices": 1}
    return {"accelerator": "cpu", "devices": 1}


def set_tf32(enabled: bool) -> None:
    """Allow TF32 (10-bit mantissa) for float32 convolutions and matmuls on Ampere+ GPUs.

    Off unless asked for: PyTorch enables it for cuDNN convolutions by default, which
    changes the reconstruction; ``python -m benchmarks.bench_quality`` measures the effect.
    """
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def make_trainer(
    n_steps: int,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    logger: Any = False,
    callbacks: Sequence[pl.Callback] = (),
    log_every_n_steps: int = 10,
    precision: str | int | None = None,
    tf32: bool = False,
) -> pl.Trainer:
    """A Trainer with nothing a single reconstruction does not need.

    ``precision`` is Lightning's (``bf16-mixed``, ``16-mixed``; default full float32);
    ``tf32`` allows TF32 tensor cores on Ampere+ GPUs (see ``set_tf32``).
    """
    set_tf32(tf32)
    kwargs = {} if precision is None else {"precision": precision}
    # None would make Lightning add its default TensorBoard logger in ./lightning_logs.
    logger = False if logger is None else logger
    return pl.Trainer(
        max_steps=n_steps,
        max_epochs=1,
        accelerator=accelerator,
        devices=devices,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(log_every_n_steps, n_steps)),
        **kwargs,
    )


def fit(module: Reconstruction, trainer: pl.Trainer | None = None, **trainer_kwargs: Any
        ) -> ReconResult:
    """Run ``module`` to the end and return its result."""
    trainer = trainer or make_trainer(module.n_steps, **trainer_kwargs)
    # The loader only counts iterations; targets already live in the module's buffers.
    steps = DataLoader(range(module.n_steps), batch_size=None)
    try:
        trainer.fit(module, train_dataloaders=steps)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) after its own clean-up; give callers the
        # interrupt back so they can keep finished work and say how to resume.
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    return module.result()
