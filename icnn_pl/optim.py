"""Updates: linear schedules, the iCNN per-iteration steps around a torch optimizer, and
L-BFGS-B with box bounds.

Gradient descent follows the Caffe iCNN order per iteration:
forward -> loss -> backward -> normalise gradient (+ regulariser gradients)
-> optimizer step (SGD momentum: ``b = m_t*b + g; x = x - lr_t*b``) -> clips
-> un-jitter -> decay -> blur -> clamp to bounds.
Every step is per image (dim 0 is the batch) and runs on the parameter's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

from icnn_pl.errors import ConfigError
from icnn_pl.params import Parameterization, PixelImage

Tensor = torch.Tensor


@dataclass(frozen=True)
class Linear:
    """``v_t = start + t * (end - start) / n``, t = 0 .. n-1 (the reference schedule)."""

    start: float
    end: float

    def at(self, t: int, n: int) -> float:
        return self.start + t * (self.end - self.start) / n


def linear(v: float | Iterable[float] | Mapping[str, float] | Linear | None) -> Linear | None:
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


# -- per-image tensor ops -----------------------------------------------------------------
def _per_image(stat: Tensor, like: Tensor) -> Tensor:
    return stat.view(-1, *([1] * (like.dim() - 1)))


def normalize_grad_(g: Tensor) -> Tensor:
    """``g / mean(|g|)`` per image, where the mean is positive (as the reference)."""
    m = g.abs().flatten(1).mean(1)
    g.div_(_per_image(torch.where(m > 0, m, torch.ones_like(m)), g))
    return g


def _reflect_index(n: int, radius: int, device: torch.device) -> Tensor:
    # scipy's mode "reflect" (d c b a | a b c d | d c b a), for any radius.
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_blur(x: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Per-channel Gaussian blur of (B, C, H, W), matching ``scipy.ndimage.gaussian_filter``
    (mode reflect, truncate 4.0), computed on ``x``'s device."""
    if sigma <= 0:
        return x
    radius = int(truncate * float(sigma) + 0.5)
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    k = torch.exp(-0.5 / float(sigma) ** 2 * k * k)
    k = (k / k.sum()).to(x.dtype)
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(y.index_select(2, _reflect_index(h, radius, x.device)), k.view(1, 1, -1, 1))
    y = F.conv2d(y.index_select(3, _reflect_index(w, radius, x.device)), k.view(1, 1, 1, -1))
    return y.view(b, c, h, w)


def _percentile(x: Tensor, pct: float) -> Tensor:
    """Per-image percentile (numpy's linear interpolation) of a (B, ...) tensor, shaped to
    broadcast against ``x``."""
    q = torch.tensor(min(max(pct, 0.0), 100.0) / 100.0, device=x.device, dtype=x.dtype)
    return _per_image(torch.quantile(x.flatten(1), q, dim=1), x)


def clip_extreme_(x: Tensor, pct: float) -> None:
    """Clip each image to its [pct/2, 100 - pct/2] percentiles."""
    x.copy_(torch.minimum(torch.maximum(x, _percentile(x, pct / 2)), _percentile(x, 100 - pct / 2)))


def _zero_small_pixels_(x: Tensor, score: Tensor, pct: float) -> None:
    small = score < _percentile(score, pct)  # (B, H, W)
    x.masked_fill_(small.unsqueeze(1), 0.0)


def clip_small_norm_(x: Tensor, pct: float) -> None:
    """Zero the pixels whose RGB norm is below the pct-th percentile."""
    _zero_small_pixels_(x, x.norm(dim=1), pct)


def clip_small_contribution_(x: Tensor, grad: Tensor, pct: float) -> None:
    """Zero the pixels whose RGB norm of ``x * grad`` is below the pct-th percentile."""
    _zero_small_pixels_(x, (x * grad).norm(dim=1), pct)


# -- image regularisers (pixel methods) ---------------------------------------------------
def noise_image_norm(shape: tuple[int, ...]) -> float:
    """Half the expected norm of a uniform-integer 0..255 noise image (the reference's
    ``img_norm0``, which it drew at random; the expectation makes runs reproducible)."""
    n = int(np.prod(shape))
    return float(np.sqrt(n * 255.0 * 511.0 / 6.0) / 2.0)


def p_norm_grad(x: Tensor, p: float) -> Tensor:
    """Gradient of ``sum |x|^p`` per image."""
    return p * x.abs().pow(p - 1) * x.sign()


def tv_norm_grad(x: Tensor, beta: float) -> Tensor:
    """Gradient of ``sum ((dx^2 + dy^2)^(beta/2))`` with forward differences (zero at the
    far edges), via autograd; the sqrt is floored so it stays finite on flat regions."""
    with torch.enable_grad():
        y = x.detach().requires_grad_(True)
        d1 = torch.cat([y[:, :, 1:] - y[:, :, :-1], torch.zeros_like(y[:, :, :1])], dim=2)
        d2 = torch.cat([y[:, :, :, 1:] - y[:, :, :, :-1], torch.zeros_like(y[:, :, :, :1])], dim=3)
        v = (d1 * d1 + d2 * d2).clamp_min(1e-10).pow(beta / 2.0)
        (grad,) = torch.autograd.grad(v.sum(), y)
    return grad


@dataclass(frozen=True)
class Regularizer:
    """``lamda_t * normalised grad`` of an image prior, added after gradient normalisation."""

    kind: str  # "p_norm" or "tv"
    order: float  # p of the p-norm, beta of the TV norm
    lamda: Linear

    def grad(self, x: Tensor) -> Tensor:
        if self.kind == "p_norm":
            g = p_norm_grad(x, self.order)
        elif self.kind == "tv":
            g = tv_norm_grad(x, self.order)
        else:
            raise ConfigError(f"unknown regulariser {self.kind!r}", "use p_norm or tv")
        return g / noise_image_norm(x.shape[1:]) ** 2


@dataclass(frozen=True)
class Clipping:
    """A clip applied every ``every`` iterations with percentile schedule ``pct``."""

    every: int
    pct: Linear


@dataclass
class GDSteps:
    """The iCNN per-iteration operations around a gradient optimizer (per image, on device)."""

    normalize_grad: bool = True
    decay: Linear | None = None
    blur_sigma: Linear | None = None
    jitter: int = 0
    regularizers: list[Regularizer] = field(default_factory=list)
    clip_extreme: Clipping | None = None
    clip_small_norm: Clipping | None = None
    clip_small_contribution: Clipping | None = None

    def check(self, param: Parameterization) -> None:
        """Image-space operations need the pixels as the parameter."""
        image_ops = {
            "blur": self.blur_sigma, "jitter": self.jitter or None,
            "regularizers": self.regularizers or None, "clip_extreme": self.clip_extreme,
            "clip_small_norm": self.clip_small_norm,
            "clip_small_contribution": self.clip_small_contribution,
        }
        used = [k for k, v in image_ops.items() if v is not None]
        if used and not isinstance(param, PixelImage):
            raise ConfigError(
                f"{used} act on pixels but this method optimises a generator code",
                "turn them off for DGN methods (they apply to icnn_gd only)",
            )

    # Jitter: shift image and every optimizer state of the same shape (the momentum buffer)
    def shift(self, param: Parameterization, opt: torch.optim.Optimizer,
              rng: torch.Generator) -> tuple[int, int] | None:
        if not self.jitter:
            return None
        ox, oy = (int(v) for v in torch.randint(-self.jitter, self.jitter + 1, (2,), generator=rng))
        _roll_(param, opt, ox, oy)
        return ox, oy

    def transform_grad(self, param: Parameterization, t: int, n: int) -> Tensor | None:
        """Normalise the gradient and add regulariser gradients; returns the normalised
        feature gradient when a clip needs it."""
        g = param.value.grad
        if self.normalize_grad:
            normalize_grad_(g)
        feature_grad = g.clone() if self.clip_small_contribution else None
        for reg in self.regularizers:
            r = reg.grad(param.value.detach())
            if self.normalize_grad:
                normalize_grad_(r)
            g.add_(r, alpha=reg.lamda.at(t, n))
        return feature_grad

    @torch.no_grad()
    def after_step(self, param: Parameterization, opt: torch.optim.Optimizer, t: int, n: int,
                   shift: tuple[int, int] | None, feature_grad: Tensor | None) -> None:
        x = param.value
        due = lambda c: c is not None and (t + 1) % c.every == 0  # noqa: E731
        if due(self.clip_extreme):
            clip_extreme_(x, self.clip_extreme.pct.at(t, n))
        if due(self.clip_small_norm):
            clip_small_norm_(x, self.clip_small_norm.pct.at(t, n))
        if due(self.clip_small_contribution):
            clip_small_contribution_(x, feature_grad, self.clip_small_contribution.pct.at(t, n))
        if shift is not None:
            _roll_(param, opt, -shift[0], -shift[1])
        if self.decay is not None:
            x.mul_(1.0 - self.decay.at(t, n))
        if self.blur_sigma is not None:
            x.copy_(gaussian_blur(x, self.blur_sigma.at(t, n)))
        param.project_()


@torch.no_grad()
def _roll_(param: Parameterization, opt: torch.optim.Optimizer, ox: int, oy: int) -> None:
    x = param.value
    tensors = [x] + [s for s in opt.state.get(x, {}).values()
                     if isinstance(s, Tensor) and s.shape == x.shape]
    for s in tensors:
        s.copy_(torch.roll(s, shifts=(oy, ox), dims=(-2, -1)))


# -- L-BFGS-B -----------------------------------------------------------------------------
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
        if loss_scale not in ("grad", "none"):
            raise ConfigError(f"unknown loss_scale {loss_scale!r}", "use 'grad' or 'none'")
        if int(maxiter) <= 0:
            raise ConfigError(f"maxiter must be positive, got {maxiter}", "set n_iter >= 1")
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
