"""Run one ``Reconstruction`` with a lean, fresh Lightning ``Trainer``.

A finished Trainer runs no steps on a second ``fit``, so every reconstruction gets its
own; the Trainer is cheap (~10-80 ms) next to the hundreds of VGG passes it drives.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from icnn_pl.engine.reconstruction import ReconResult, Reconstruction
from icnn_pl.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# Lightning precisions that suit a reconstruction (None: full float32, the reference).
PRECISIONS = (None, "32-true", "bf16-mixed", "16-mixed")

# Lightning's device banner (printed for every per-image Trainer) and its advice for
# training loops that a reconstruction is not (workers, batch sizes, returned losses).
_BANNER_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
                   "lightning.pytorch.utilities.rank_zero")
_IRRELEVANT_WARNINGS = (".*does not have many workers.*", ".*on_step.*batch_size.*",
                        ".*`training_step` returned `None`.*", ".*treespec, LeafSpec.*")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence the banner and the irrelevant advice while a reconstruction's Trainer is
    built and run; the caller's log levels and warning filters are restored after."""
    loggers = [logging.getLogger(name) for name in _BANNER_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for pattern in _IRRELEVANT_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for lg in loggers:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def device_trainer_args(device: torch.device | str) -> dict[str, Any]:
    """Trainer ``accelerator``/``devices`` that run on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    if device.type == "mps":
        return {"accelerator": "mps", "devices": 1}
    return {"accelerator": "cpu", "devices": 1}


def check_trainer_options(accelerator: str = "auto", precision: str | None = None,
                          tf32: bool = False) -> None:
    """The Trainer settings a reconstruction accepts (checked before any work starts)."""
    accelerator = str(accelerator)
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not valid",
                          "use trainer=auto (GPU when present), trainer=cpu or trainer=gpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no usable"
                          " CUDA GPU", "use trainer=auto (GPU when present) or trainer=cpu")
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not supported",
                          f"use one of {PRECISIONS} (null: full float32)")
    if not isinstance(tf32, bool):
        raise ConfigError(f"trainer.tf32={tf32!r} must be true or false",
                          "set trainer.tf32=true or trainer.tf32=false")


def set_tf32(enabled: bool) -> None:
    """Allow TF32 (10-bit mantissa) for float32 convolutions and matmuls on Ampere+ GPUs.

    Off unless asked for: PyTorch enables it for cuDNN convolutions by default, which
    changes the reconstruction; ``python -m benchmarks.bench_quality`` measures the effect.
    """
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def make_trainer(
    max_steps: int,
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
    with _quiet_lightning():
        return pl.Trainer(
            max_steps=max_steps,
            max_epochs=1,
            accelerator=accelerator,
            devices=devices,
            logger=logger,
            callbacks=list(callbacks),
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            log_every_n_steps=max(1, min(log_every_n_steps, max_steps)),
            **kwargs,
        )


def fit(module: Reconstruction, trainer: pl.Trainer | None = None, **trainer_kwargs: Any
        ) -> ReconResult:
    """Run ``module`` to the end and return its result."""
    trainer = trainer or make_trainer(module.trainer_steps, **trainer_kwargs)
    # The loader only counts iterations; targets already live in the module's buffers.
    steps = DataLoader(range(module.trainer_steps), batch_size=None)
    try:
        with _quiet_lightning():
            trainer.fit(module, train_dataloaders=steps)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) after its own clean-up; give callers the
        # interrupt back so they can keep finished work and say how to resume.
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    return module.result()
