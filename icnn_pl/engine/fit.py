"""Run one ``Reconstruction`` with a lean, fresh Lightning ``Trainer``.

A finished Trainer runs no steps on a second ``fit``, so every reconstruction gets its
own; the Trainer is cheap (~10-80 ms) next to the hundreds of VGG passes it drives.
On a GPU the stock Trainer's per-fit costs are avoided: its CUDA accelerator would empty
the CUDA cache at set-up and teardown (``_LeanCUDA``), its checkpoint connector once more
after every start, checkpoint or not (``LeanTrainer``), and its strategy would move the
module (the targets, ~60 MB at 224 px with all layers) back to the host after every image
(``KeepOnDevice``). Each emptying is a device sync, and the next image allocates every
block again. ``tests/test_gpu_ready.py`` proves these on the CPU with CUDA stubbed.
One process uses one device (``check_devices``); several GPUs are used by shards, one
process per GPU. Global numerics (TF32, cuDNN determinism) are set only while a fit runs
and restored after (``numerics``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.trainer.connectors.checkpoint_connector import _CheckpointConnector
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
    """Allow TF32 (10-bit mantissa) for float32 matmuls and cuDNN convolutions on Ampere+
    GPUs, or forbid it. Process-wide: ``numerics`` scopes it to one fit.

    Both of torch's APIs are set so that they agree: with only the new ``fp32_precision``
    set, ``torch.get_float32_matmul_precision()`` raises ("mix of the legacy and new
    APIs"), and Lightning calls it at every fit on an Ampere+ GPU. The legacy setters keep
    their pairs consistent: ``set_float32_matmul_precision`` ("high" / "highest") writes
    the cuBLAS and oneDNN matmul values with the legacy precision, ``cudnn.allow_tf32`` the
    conv and RNN values with the legacy flag; the explicit cuDNN values then hold even
    where a process set a generic default."""
    mode = "tf32" if enabled else "ieee"
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cudnn.conv.fp32_precision = mode
    torch.backends.cudnn.rnn.fp32_precision = mode


# What set_tf32 writes: (object, attribute) pairs, each read back raw to be restored.
_TF32_STATE = ((torch.backends.cuda.matmul, "fp32_precision"),
               (torch.backends.mkldnn.matmul, "fp32_precision"),
               (torch.backends.cudnn.conv, "fp32_precision"),
               (torch.backends.cudnn.rnn, "fp32_precision"))


def _save_tf32() -> tuple[Any, ...]:
    """The float32 precision state ``set_tf32`` changes: the legacy matmul precision (None
    where a caller's own mix of the APIs makes it unreadable), the legacy cuDNN flag (the
    same) and the new API's per-backend values."""
    legacy = []
    for read in (torch.get_float32_matmul_precision, lambda: torch.backends.cudnn.allow_tf32):
        try:
            legacy.append(read())
        except RuntimeError:
            legacy.append(None)
    return (*legacy, *(getattr(obj, name) for obj, name in _TF32_STATE))


def _restore_tf32(saved: tuple[Any, ...]) -> None:
    """Undo ``set_tf32``: the legacy values first (their setters also write new-API values),
    then the new API's own values, so every pair is as it was."""
    matmul, cudnn_flag, *values = saved
    if matmul is not None:
        torch.set_float32_matmul_precision(matmul)
    if cudnn_flag is not None:
        torch.backends.cudnn.allow_tf32 = cudnn_flag
    for (obj, name), value in zip(_TF32_STATE, values, strict=True):
        setattr(obj, name, value)


# cuBLAS's deterministic workspace setting (torch's documented value); read by cuBLAS when
# CUDA first creates its workspace, so it must be in the environment before CUDA starts.
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
_DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def deterministic_cublas() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for reproducible cuBLAS matmuls (the fc layers),
    unless the environment already gives a deterministic value. cuBLAS reads it once, when
    CUDA first sizes its workspace: set after CUDA started in this process, it only quiets
    torch's check, so a warning says to set it in the environment before starting."""
    name, value = CUBLAS_WORKSPACE
    if os.environ.get(name) in _DETERMINISTIC_CUBLAS:
        return
    os.environ[name] = value
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        warnings.warn(f"trainer.deterministic: {name} was set to {value} after CUDA started in"
                      " this process; cuBLAS may already use its default workspace, so the fc"
                      " layers' matmuls may not repeat exactly. Start the process with"
                      f" {name}={value} in the environment.", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def numerics(tf32: bool | None = False, deterministic: bool = False) -> Iterator[None]:
    """Float32 precision and determinism for the duration of one fit, restored after.

    ``tf32``: False (default) strict float32 (PyTorch's own default allows TF32 in cuDNN
    convolutions, which changes the reconstruction; ``benchmarks.bench_quality`` measures
    it), True TF32 tensor cores, None the process's own settings untouched.
    ``deterministic``: cuDNN picks deterministic algorithms (``cudnn.deterministic``, no
    ``cudnn.benchmark``), cuBLAS its deterministic workspace (``deterministic_cublas``,
    left set: cuBLAS reads it once) and torch's deterministic algorithms are on with
    ``warn_only``: ops without a deterministic CUDA kernel (the fc layers' adaptive pooling
    backward) warn instead of raising; at 224 px that pooling maps 7x7 to 7x7, one input
    per output, so its result does not depend on the order of its atomic adds. The random
    transforms' resampling has no deterministic CUDA backward: ``check_deterministic``
    refuses them together on a GPU.
    """
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    tf32_saved = _save_tf32() if tf32 is not None else None
    try:
        if tf32 is not None:
            set_tf32(tf32)
        if deterministic:
            deterministic_cublas()
            cudnn.deterministic, cudnn.benchmark = True, False
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        if tf32_saved is not None:
            _restore_tf32(tf32_saved)
        cudnn.deterministic, cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def check_deterministic(device: torch.device | str, deterministic: bool, transforms: Any) -> None:
    """Random transforms resample with ``grid_sample``, whose CUDA backward adds with atomics
    in no fixed order: no run would repeat exactly, so ``deterministic`` refuses them on a
    GPU (on the CPU that backward is sequential: reproducible)."""
    if deterministic and transforms is not None and torch.device(device).type == "cuda":
        raise ConfigError("trainer.deterministic=true with random transforms (method.transforms)"
                          " on a GPU: their resampling's CUDA backward is not deterministic",
                          "set method.transforms=null, or trainer.deterministic=false (or run"
                          " on the CPU: trainer=cpu)")


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


class _KeepCacheConnector(_CheckpointConnector):
    """Lightning's checkpoint connector without the CUDA cache emptying at the end of every
    start (``resume_end``), which runs whether or not a checkpoint was loaded; with one
    loaded (never, for a reconstruction) Lightning's own clean-up runs."""

    def resume_end(self) -> None:
        if self._ckpt_path:
            super().resume_end()
            return
        self._loaded_checkpoint = {}
        self.trainer.strategy.barrier("_CheckpointConnector.resume_end")


class LeanTrainer(pl.Trainer):
    """A Trainer whose start leaves the CUDA cache alone (``_KeepCacheConnector``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checkpoint_connector = _KeepCacheConnector(self)


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
) -> LeanTrainer:
    """A Trainer with nothing a single reconstruction does not need, on one device: no
    per-fit CUDA cache emptying or module moves (``LeanTrainer``, ``lean_strategy``).

    ``accelerator="auto"`` is the GPU when present, else the CPU; ``devices`` is ``1`` or
    ``[i]`` (see ``check_devices``). ``precision`` is Lightning's (``bf16-mixed``; default
    full float32). TF32 and determinism are ``fit``'s (``numerics``).
    """
    check_trainer_options(accelerator, precision, devices=devices)
    device = resolve_device(accelerator, devices)
    # None would make Lightning add its default TensorBoard logger in ./lightning_logs.
    logger = False if logger is None else logger
    with _quiet_lightning():
        return LeanTrainer(
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
    check_deterministic(trainer.strategy.root_device, deterministic, module.transforms)
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
