"""The iteration budget and the reference's linear schedules of hyper-parameters.

``v_t = start + t * (end - start) / n_iter`` for t = 0 .. n_iter-1, so the last learning
rate of 2 -> 1e-10 over 200 iterations is 0.01 (reference section 3).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icnn_pl.errors import ConfigError


def check_n_iter(n_iter: Any, key: str = "n_iter", allow_zero: bool = False) -> int:
    """The iteration budget (GD iterations, L-BFGS-B ``maxiter``) as a positive int (0 for
    the evaluate-only baselines); the one check of it, shared by the functional API, the
    optimizers and the config checks."""
    if isinstance(n_iter, bool) or not isinstance(n_iter, int | np.integer) \
            or n_iter < (0 if allow_zero else 1):
        raise ConfigError(f"{key}={n_iter!r} must be a positive integer",
                          f"set {key}=200 (GD iterations / L-BFGS maxiter; any integer >= 1)")
    return int(n_iter)


@dataclass(frozen=True)
class Linear:
    """``v_t = start + t * (end - start) / n``, t = 0 .. n-1 (the reference schedule)."""

    start: float
    end: float

    def at(self, t: int, n: int) -> float:
        return self.start + t * (self.end - self.start) / n


def as_schedule(v: float | Iterable[float] | Mapping[str, float] | Linear | None
                ) -> Linear | None:
    """A schedule from a constant, a (start, end) pair, a {start, end} mapping or a Linear."""
    if v is None or isinstance(v, Linear):
        return v
    if isinstance(v, Mapping):
        return Linear(float(v["start"]), float(v["end"]))
    if isinstance(v, int | float):
        return Linear(float(v), float(v))
    start, end = (float(x) for x in v)
    return Linear(start, end)


def apply_schedules(opt: torch.optim.Optimizer, schedules: Mapping[str, Linear], t: int,
                    n: int) -> None:
    """Set each scheduled hyper-parameter (lr, momentum, ...) of every param group."""
    for name, sched in schedules.items():
        for group in opt.param_groups:
            group[name] = sched.at(t, n)
