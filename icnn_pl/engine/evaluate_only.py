"""The "optimizer" of the no-optimisation baselines (``method=dgn_direct``): it evaluates the
starting point once and changes nothing, so the image is scored like every other method's
(one loss evaluation, no update) through the same module, job and report."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from icnn_pl.engine.lbfgsb import optimizer_flag


class EvaluateOnly(torch.optim.Optimizer):
    """One loss evaluation of the initial value; zero iterations."""

    runs_to_completion = True  # one Trainer step, as L-BFGS-B
    evaluates_only = True
    # read like ScipyLBFGSB's scipy result: the stop reason of results.csv and the .mat
    result = SimpleNamespace(message="no optimisation (the start evaluated once)")

    def __init__(self, params: Any, bounds: Any = None) -> None:
        super().__init__(params, {})  # bounds: the parameter is already inside them

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def evaluates_only(factory: Any) -> bool:
    """Whether an optimizer (class, partial or instance) only evaluates (zero iterations)."""
    return optimizer_flag(factory, "evaluates_only")
