"""Run one ``Reconstruction`` with a lean, fresh Lightning ``Trainer``.

A finished Trainer runs no steps on a second ``fit``, so every reconstruction gets its
own; the Trainer is cheap (~10-80 ms) next to the hundreds of VGG passes it drives.
On a GPU the Trainer's per-fit costs are avoided (``KeepOnDevice``): its strategy would
empty the CUDA cache at set-up and teardown and move the module (the targets, ~60 MB at
224 px with all layers) back to the host after every image. One process uses one device
(``check_devices``); several GPUs are used by shards, one process per GPU.
Global numerics (TF32, cuDNN determinism) are set only while a fit runs and restored after
(``numerics``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader

from icnn_pl.engine.reconstruction import ReconResult, Reconstruction
from icnn_pl.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# Lightning precisions that suit a reconstruction (None: full float32, the reference).
PRECISIONS = (None, "32-true", "bf16-mixed")
# One process, one device: several GPUs are used by running shards side by side.
MULTI_GPU_FIX = ("one reconstruction process uses one device: set trainer.devices=1 (or [i] for"
                 " GPU i); to use N GPUs run N shards, shard i on GPU i: python train_recon.py"
                 " -m hydra/launcher=local data.num_shards=N data.shard=0,1,...,N-1")

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


def check_devices(devices: Any) -> int:
    """The device index that ``trainer.devices`` names: ``1`` (the first device of the
    accelerator) or ``[i]`` (device i). Anything asking for more than one device (``2``,
    ``-1``, ``"auto"``, ``[0, 1]``) would make Lightning start DDP, relaunching the entry
    script once per rank with duplicated outputs: rejected."""
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) == 1:
        index = devices[0]
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            return index
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices == 1:
        return 0
    raise ConfigError(f"trainer.devices={devices!r} is not supported", MULTI_GPU_FIX)


def check_trainer_options(accelerator: str = "auto", precision: str | None = None,
                          tf32: bool | None = False, devices: Any = 1,
                          deterministic: bool = False) -> None:
    """The Trainer settings a reconstruction accepts (checked before any work starts)."""
    accelerator = str(accelerator)
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not valid",
                          "use trainer=auto (GPU when present), trainer=cpu or trainer=gpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no usable"
                          " CUDA GPU", "use trainer=auto (GPU when present) or trainer=cpu")
    if str(precision) in ("16-mixed", "16", "16-true"):
        # float16 needs loss scaling: the scaled gradient meets the iCNN gradient
        # normalisation (steps ~65,536x too small), the scaler syncs with the host every
        # step, and Lightning's AMP plugin calls L-BFGS-B's step without a closure.
        raise ConfigError(f"trainer.precision={precision} is not supported: float16 loss"
                          " scaling does not fit the iCNN gradient normalisation or L-BFGS",
                          "use trainer.precision=bf16-mixed (Ampere+ GPUs, no loss scaling)"
                          " or null (float32)")
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not supported",
                          f"use one of {PRECISIONS} (null: full float32)")
    if tf32 is not None and not isinstance(tf32, bool):
        raise ConfigError(f"trainer.tf32={tf32!r} must be true or false",
                          "set trainer.tf32=true or trainer.tf32=false")
    if not isinstance(deterministic, bool):
        raise ConfigError(f"trainer.deterministic={deterministic!r} must be true or false",
                          "set trainer.deterministic=true or trainer.deterministic=false")
    check_devices(devices)


def set_tf32(enabled: bool) -> None:
    """Allow TF32 (10-bit mantissa) for float32 convolutions and matmuls on Ampere+ GPUs
    (torch's ``fp32_precision`` API; the legacy ``allow_tf32`` flags are not mixed in, since
    reading them after a mix raises). Process-wide: ``numerics`` scopes it to one fit."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


@contextlib.contextmanager
def numerics(tf32: bool | None = False, deterministic: bool = False) -> Iterator[None]:
    """Float32 precision and determinism for the duration of one fit, restored after.

    ``tf32``: False (default) strict float32 (PyTorch's own default allows TF32 in cuDNN
    convolutions, which changes the reconstruction; ``benchmarks.bench_quality`` measures
    it), True TF32 tensor cores, None the process's own settings untouched.
    ``deterministic``: cuDNN picks deterministic algorithms (``cudnn.deterministic``, no
    ``cudnn.benchmark``) and torch's deterministic algorithms are on with ``warn_only``:
    ops without a deterministic CUDA kernel (the fc layers' adaptive pooling backward)
    warn instead of raising; at 224 px that pooling maps 7x7 to 7x7, one input per output,
    so its result does not depend on the order of its atomic adds.
    """
    cudnn = torch.backends.cudnn
    saved = (torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision,
             cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if tf32 is not None:
            set_tf32(tf32)
        if deterministic:
            cudnn.deterministic, cudnn.benchmark = True, False
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision = saved[:2]
        cudnn.deterministic, cudnn.benchmark = saved[2:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


class _LeanCUDA(CUDAAccelerator):
    """CUDA without Lightning's per-fit ``empty_cache`` (set-up and teardown): the next
    image would only allocate the same blocks again."""

    def setup(self, trainer: pl.Trainer) -> None:
        pass

    def teardown(self) -> None:
        pass


class KeepOnDevice(SingleDeviceStrategy):
    """One device; the teardown leaves the module and optimizer where they are (Lightning's
    moves them to the CPU: a copy of the targets to the host per image)."""

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def resolve_device(accelerator: str = "auto", devices: Any = 1) -> torch.device:
    """The one device a reconstruction with these Trainer settings runs on (the options
    are checked by ``check_trainer_options`` first: ``make_trainer``, its caller)."""
    index = check_devices(devices)
    kind = str(accelerator)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    if kind in ("gpu", "cuda"):
        if index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.devices=[{index}] but this process sees"
                              f" {torch.cuda.device_count()} GPU(s)", MULTI_GPU_FIX)
        return torch.device("cuda", index)
    if kind == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def lean_strategy(device: torch.device | str, precision: str | None = None) -> KeepOnDevice:
    """The strategy of every reconstruction's Trainer, on ``device`` (with autocast on that
    device type for ``bf16-mixed``)."""
    device = torch.device(device)
    accelerator = {"cuda": _LeanCUDA, "mps": MPSAccelerator}.get(device.type, CPUAccelerator)()
    plugin = MixedPrecision(precision, device.type) if precision == "bf16-mixed" else None
    return KeepOnDevice(device=device, accelerator=accelerator, precision_plugin=plugin)


def make_trainer(
    max_steps: int,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = 1,
    logger: Any = False,
    callbacks: Sequence[pl.Callback] = (),
    log_every_n_steps: int = 10,
    precision: str | int | None = None,
) -> pl.Trainer:
    """A Trainer with nothing a single reconstruction does not need, on one device.

    ``accelerator="auto"`` is the GPU when present, else the CPU; ``devices`` is ``1`` or
    ``[i]`` (see ``check_devices``). ``precision`` is Lightning's (``bf16-mixed``; default
    full float32). TF32 and determinism are ``fit``'s (``numerics``).
    """
    check_trainer_options(accelerator, precision, devices=devices)
    device = resolve_device(accelerator, devices)
    # None would make Lightning add its default TensorBoard logger in ./lightning_logs.
    logger = False if logger is None else logger
    with _quiet_lightning():
        return pl.Trainer(
            max_steps=max_steps,
            max_epochs=1,
            strategy=lean_strategy(device, precision),
            devices=[device.index] if device.type == "cuda" else 1,
            logger=logger,
            callbacks=list(callbacks),
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            log_every_n_steps=max(1, min(log_every_n_steps, max_steps)),
        )


def fit(module: Reconstruction, trainer: pl.Trainer | None = None, tf32: bool | None = False,
        deterministic: bool = False, **trainer_kwargs: Any) -> ReconResult:
    """Run ``module`` to the end and return its result; ``tf32`` and ``deterministic``
    hold while it runs (``numerics``), ``trainer_kwargs`` go to ``make_trainer``."""
    trainer = trainer or make_trainer(module.trainer_steps, **trainer_kwargs)
    # The loader only counts iterations; targets already live in the module's buffers.
    steps = DataLoader(range(module.trainer_steps), batch_size=None)
    try:
        with _quiet_lightning(), numerics(tf32, deterministic):
            trainer.fit(module, train_dataloaders=steps)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) after its own clean-up; give callers the
        # interrupt back so they can keep finished work and say how to resume.
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    return module.result()
