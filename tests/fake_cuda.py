"""A "fake CUDA" layer: the real fit path of a Trainer built for ``cuda:i``, on the CPU.

CUDA's queries are stubbed (available, device count, an Ampere-or-later capability), so
``make_trainer`` builds exactly the Trainer a GPU gets and Lightning runs its CUDA code
(``CUDAAccelerator.setup_device`` with ``_check_cuda_matmul_precision``); the calls
that would act on a device (``torch.cuda.empty_cache``, ``synchronize``, ``set_device``,
the cuBLAS workspace clearing) are recorded instead, and the module's own ``.to`` / ``.cpu``
are recorded and left undone, and so is any tensor made on or moved to a CUDA device
(``_TensorsStayOnCpu``): every tensor stays on the CPU. What a GPU would make
of the kernels is not simulated: only what the code asks of CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning_fabric.accelerators.cuda as fabric_cuda
import pytest
import torch
from torch.overrides import TorchFunctionMode

# torch.cuda calls that act on the device (each would be a sync or an allocator round trip)
SPIED = ("empty_cache", "synchronize", "set_device", "reset_peak_memory_stats")


@dataclass
class FakeCuda:
    """What the code asked of CUDA while the layer was on."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    moves: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def clear(self) -> None:
        self.calls.clear()
        self.moves.clear()

    def pin(self, module: torch.nn.Module) -> torch.nn.Module:
        """Record ``module``'s moves (``to``, ``cpu``, ``cuda``) and leave it where it is
        (also its ``device``, which Lightning sets to the Trainer's before moving it)."""
        where = next(module.parameters()).device
        for name in ("to", "cpu", "cuda"):
            def record(*args: Any, _name: str = name, **kwargs: Any) -> torch.nn.Module:
                self.moves.append((_name, args + tuple(kwargs.values())))
                module._device = where
                return module
            object.__setattr__(module, name, record)
        return module


def _is_cuda(x: Any) -> bool:
    return isinstance(x, (str, torch.device)) and torch.device(x).type == "cuda"


class _TensorsStayOnCpu(TorchFunctionMode):
    """Tensors asked for on a CUDA device (made there, or moved there) are made or kept on
    the CPU, and recorded as ``("tensor_on_cuda", op)``."""

    def __init__(self, fake: FakeCuda) -> None:
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        cuda = _is_cuda(kwargs.get("device"))
        if cuda:
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            cuda = cuda or func is torch.Tensor.cuda or any(_is_cuda(a) for a in args[1:])
            if func is torch.Tensor.cuda:
                func, args = torch.Tensor.to, args[:1]
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if cuda:
            self.fake.calls.append(("tensor_on_cuda", (getattr(func, "__name__", str(func)),)))
        return func(*args, **kwargs)


@contextmanager
def fake_cuda(monkeypatch: pytest.MonkeyPatch, devices: int = 2,
              capability: tuple[int, int] = (9, 0)) -> Iterator[FakeCuda]:
    """CUDA "available" with ``devices`` GPUs of ``capability`` (9.0: an H100/H200)."""
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    for name in SPIED:
        monkeypatch.setattr(torch.cuda, name,
                            lambda *a, _n=name, **k: fake.calls.append((_n, a)))
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces",
                        lambda: fake.calls.append(("clear_cublas_workspaces", ())),
                        raising=False)
    # Lightning's check runs once per device and process: cleared, so that it runs here
    fabric_cuda._check_cuda_matmul_precision.cache_clear()
    try:
        with _TensorsStayOnCpu(fake):
            yield fake
    finally:
        fabric_cuda._check_cuda_matmul_precision.cache_clear()
