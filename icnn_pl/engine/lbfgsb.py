"""L-BFGS-B with box bounds (scipy), driven by torch gradients: the optimizer of
``icnn_lbfgs`` and ``icnn_dgn_lbfgs``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.optimize
import torch

from icnn_pl.engine.schedules import check_n_iter
from icnn_pl.errors import ConfigError

Tensor = torch.Tensor
LOSS_SCALES = ("grad", "none")


def optimizer_flag(factory: Any, name: str) -> bool:
    """The class flag ``name`` of an optimizer (class, ``functools.partial`` of one, or
    instance); False when it has none."""
    return bool(getattr(getattr(factory, "func", factory), name, False))


def runs_to_completion(factory: Any) -> bool:
    """Whether an optimizer (class, ``functools.partial`` of one, or instance) runs the
    whole minimisation in one ``step`` (L-BFGS-B): the one place that tells them apart."""
    return optimizer_flag(factory, "runs_to_completion")


def check_one_problem(factory: Any, batch_size: int) -> None:
    """A run-to-completion optimizer takes one image per problem: B images would share one
    line search and stop together. One that only evaluates (``dgn_direct``) takes any batch."""
    if runs_to_completion(factory) and not optimizer_flag(factory, "evaluates_only") \
            and batch_size > 1:
        raise ConfigError(
            f"data.batch_size={batch_size} with L-BFGS: {batch_size} images in one L-BFGS"
            " problem would share its line search", "L-BFGS methods reconstruct one image"
            " per problem: set data.batch_size=1")


def check_transforms(factory: Any, transforms: Any) -> None:
    """Random transforms need a gradient method: under a run-to-completion optimizer each
    evaluation would see a different objective."""
    if transforms is not None and runs_to_completion(factory):
        raise ConfigError(
            "random transforms (method.transforms) with a run-to-completion optimizer"
            " (L-BFGS): a different objective at every evaluation breaks its line search",
            "use method.transforms with a gradient method (method=icnn_fourier or icnn_gd),"
            " or set method.transforms=null")


class ScipyLBFGSB(torch.optim.Optimizer):
    """scipy's L-BFGS-B with box bounds, driven by torch gradients.

    One ``step(closure)`` runs the whole minimisation (like ``torch.optim.LBFGS`` runs
    ``max_iter`` iterations per step); the closure is called once per function evaluation.
    ``torch.optim.LBFGS`` has no bounds, which pixel ([0, 255]) and code ((0, upper))
    reconstructions need.

    ``loss_scale="grad"`` (default) hands scipy ``f / s`` and ``g / s`` with ``s`` the
    largest absolute gradient at the initial point, so that ``gtol`` means "the projected
    gradient shrank 1e5-fold" whatever the network's feature scale or the number of
    pixels. With raw values scipy's absolute ``gtol`` (1e-5) can stop after the first
    evaluation and return the initial image (the "L-BFGS stops at iteration 0" users
    report with small-scale networks). ``"none"`` is the reference behaviour.
    """

    runs_to_completion = True

    def __init__(self, params, bounds: list[tuple[Tensor | None, Tensor | None]] | None = None,
                 maxiter: int = 500, m: int = 10, ftol: float = 2.220446049250313e-09,
                 gtol: float = 1e-05, maxls: int = 20, loss_scale: str = "grad") -> None:
        super().__init__(params, {})
        if loss_scale not in LOSS_SCALES:
            raise ConfigError(f"unknown loss_scale {loss_scale!r}", "use 'grad' or 'none'")
        maxiter = check_n_iter(maxiter, "maxiter")
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._bounds = bounds or [(None, None)] * len(self._params)
        self.options = {"maxiter": int(maxiter), "maxcor": int(m), "ftol": float(ftol),
                        "gtol": float(gtol), "maxls": int(maxls)}
        self.loss_scale = loss_scale
        self.result: scipy.optimize.OptimizeResult | None = None
        self.n_evals = 0

    def _flat_bounds(self) -> scipy.optimize.Bounds:
        lo, hi = [], []
        for p, (lower, upper) in zip(self._params, self._bounds, strict=True):
            n = p.numel()
            lo.append(np.full(n, -np.inf) if lower is None
                      else lower.expand(p.shape).detach().cpu().double().numpy().ravel())
            hi.append(np.full(n, np.inf) if upper is None
                      else upper.expand(p.shape).detach().cpu().double().numpy().ravel())
        return scipy.optimize.Bounds(np.concatenate(lo), np.concatenate(hi))

    def _write(self, x: np.ndarray) -> None:
        offset = 0
        with torch.no_grad():
            for p in self._params:
                n = p.numel()
                p.copy_(torch.from_numpy(x[offset:offset + n]).view_as(p))
                offset += n

    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        bounds = self._flat_bounds()
        x0 = torch.cat([p.detach().flatten() for p in self._params]).cpu().double().numpy()
        # scipy would project too; doing it here makes the first evaluation feasible.
        x0 = np.clip(x0, bounds.lb, bounds.ub)
        scale = [1.0]

        def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
            self._write(x)
            with torch.enable_grad():
                loss = closure()
            f = float(loss.detach())
            g = torch.cat([p.grad.flatten() for p in self._params]).cpu().double().numpy()
            if self.n_evals == 0 and self.loss_scale == "grad":
                g_max = float(np.abs(g).max())
                scale[0] = g_max if g_max > 0 and np.isfinite(g_max) else 1.0
            self.n_evals += 1
            return f / scale[0], g / scale[0]

        self.result = scipy.optimize.minimize(
            fun, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=self.options)
        self._write(self.result.x)
        return torch.tensor(self.result.fun * scale[0])
