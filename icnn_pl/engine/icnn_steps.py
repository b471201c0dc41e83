"""The iCNN per-iteration operations around a gradient optimizer (``GDSteps``).

Gradient descent follows the Caffe iCNN order per iteration:
forward -> loss -> backward -> normalise gradient (+ regulariser gradients)
-> optimizer step (SGD momentum: ``b = m_t*b + g; x = x - lr_t*b``) -> clips
-> un-jitter -> decay -> blur -> clamp to bounds.
Every operation is per image (dim 0 is the batch) and runs on the parameter's device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from icnn_pl.engine.params import FourierImage, Parameterization, PixelImage
from icnn_pl.engine.schedules import Linear
from icnn_pl.errors import ConfigError

Tensor = torch.Tensor


# -- per-image tensor ops -----------------------------------------------------------------
def _per_image(stat: Tensor, like: Tensor) -> Tensor:
    return stat.view(-1, *([1] * (like.dim() - 1)))


def normalize_grad_(g: Tensor) -> Tensor:
    """``g / mean(|g|)`` per image, where the mean is positive (as the reference)."""
    m = g.abs().flatten(1).mean(1)
    g.div_(_per_image(torch.where(m > 0, m, torch.ones_like(m)), g))
    return g


# Cached per (size, radius, device) and per (sigma, device, dtype): the blur schedule is the
# same for every image of a job, so after the first image no iteration rebuilds them.
@functools.lru_cache(maxsize=256)
def _reflect_index(n: int, radius: int, device: torch.device) -> Tensor:
    # scipy's mode "reflect" (d c b a | a b c d | d c b a), for any radius.
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


@functools.lru_cache(maxsize=4096)
def _gaussian_kernel(sigma: float, radius: int, device: torch.device,
                     dtype: torch.dtype) -> Tensor:
    k = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 / sigma ** 2 * k * k)
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Per-channel Gaussian blur of (B, C, H, W), matching ``scipy.ndimage.gaussian_filter``
    (mode reflect, truncate 4.0), computed on ``x``'s device in ``x``'s dtype (also under
    a mixed-precision autocast, which would otherwise round the image to 16 bits)."""
    if sigma <= 0:
        return x
    radius = int(truncate * float(sigma) + 0.5)
    k = _gaussian_kernel(float(sigma), radius, x.device, x.dtype)
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    with torch.autocast(x.device.type, enabled=False):
        y = F.conv2d(y.index_select(2, _reflect_index(h, radius, x.device)), k.view(1, 1, -1, 1))
        y = F.conv2d(y.index_select(3, _reflect_index(w, radius, x.device)), k.view(1, 1, 1, -1))
    return y.view(b, c, h, w)


def _percentile(x: Tensor, pct: float) -> Tensor:
    """Per-image percentile (numpy's linear interpolation) of a (B, ...) tensor, shaped to
    broadcast against ``x``; computed on ``x``'s device (a Python ``q``: no host copy)."""
    q = min(max(float(pct), 0.0), 100.0) / 100.0
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
            what = "a spectrum" if isinstance(param, FourierImage) else "a generator code"
            raise ConfigError(
                f"{used} act on pixels but this method optimises {what}",
                "turn them off for DGN and Fourier methods (they apply to icnn_gd only)",
            )

    # Jitter: shift image and every optimizer state of the same shape (the momentum buffer)
    def shift(self, param: Parameterization, opt: torch.optim.Optimizer,
              rngs: Sequence[torch.Generator]) -> list[tuple[int, int]] | None:
        """Roll each image by its own random offset (drawn from its own generator: alone or
        in a batch, an image is jittered alike); returns the offsets to undo."""
        if not self.jitter:
            return None
        shifts = [tuple(int(v) for v in torch.randint(-self.jitter, self.jitter + 1, (2,),
                                                      generator=rng)) for rng in rngs]
        _roll_(param, opt, shifts)
        return shifts

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
                   shift: list[tuple[int, int]] | None, feature_grad: Tensor | None) -> None:
        x = param.value
        due = lambda c: c is not None and (t + 1) % c.every == 0  # noqa: E731
        if due(self.clip_extreme):
            clip_extreme_(x, self.clip_extreme.pct.at(t, n))
        if due(self.clip_small_norm):
            clip_small_norm_(x, self.clip_small_norm.pct.at(t, n))
        if due(self.clip_small_contribution):
            clip_small_contribution_(x, feature_grad, self.clip_small_contribution.pct.at(t, n))
        if shift is not None:
            _roll_(param, opt, [(-ox, -oy) for ox, oy in shift])
        if self.decay is not None:
            x.mul_(1.0 - self.decay.at(t, n))
        if self.blur_sigma is not None:
            x.copy_(gaussian_blur(x, self.blur_sigma.at(t, n)))
        param.project_()


@torch.no_grad()
def _roll_(param: Parameterization, opt: torch.optim.Optimizer,
           shifts: Sequence[tuple[int, int]]) -> None:
    """Roll image i (and its rows of the optimizer state) by ``shifts[i]`` = (x, y)."""
    x = param.value
    tensors = [x] + [s for s in opt.state.get(x, {}).values()
                     if isinstance(s, Tensor) and s.shape == x.shape]
    for s in tensors:
        for i, (ox, oy) in enumerate(shifts):
            if ox or oy:
                s[i].copy_(torch.roll(s[i], shifts=(oy, ox), dims=(-2, -1)))
