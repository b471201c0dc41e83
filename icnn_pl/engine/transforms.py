"""Transformation robustness (lucid): the encoder sees a randomly moved copy of the image.

Each evaluation draws, per image, a shift of up to ``jitter`` pixels, a scale factor in
``scale`` and a rotation of up to ``rotate`` degrees, and applies them as one affine
resampling (bilinear, reflected at the borders). Features that survive small moves are
what a natural image has; patterns that only fit one pixel grid are discouraged. Off by
default; ``python -m benchmarks.bench_prior --transforms`` measures whether it helps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from icnn_pl.errors import ConfigError


@dataclass(frozen=True)
class RandomTransforms:
    """Random jitter (pixels), scale (min, max factor) and rotation (max degrees)."""

    jitter: float = 8.0
    scale: tuple[float, float] = (0.95, 1.05)
    rotate: float = 5.0

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if self.jitter < 0 or self.rotate < 0 or not 0 < lo <= hi:
            raise ConfigError(
                f"transforms jitter={self.jitter}, scale={self.scale}, rotate={self.rotate}"
                " are not valid", "use jitter >= 0, rotate >= 0 and 0 < scale[0] <= scale[1]")

    def __call__(self, image: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """``image`` (B, C, H, W) moved by one random affine map per image (differentiable)."""
        b, _, h, w = image.shape
        u = torch.rand(b, 4, generator=rng, dtype=torch.float64) * 2 - 1  # [-1, 1)
        lo, hi = self.scale
        zoom = lo + (hi - lo) * (u[:, 0] + 1) / 2
        angle = u[:, 1] * math.radians(self.rotate)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # affine_grid maps output to input coordinates in [-1, 1]: a shift of d pixels is 2d/size
        theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * self.jitter * 2 / w], 1),
                             torch.stack([sin, cos, u[:, 3] * self.jitter * 2 / h], 1)], 1)
        theta = theta.to(image)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)


def make_transforms(options: Mapping[str, Any], key: str = "transforms") -> RandomTransforms:
    """``{jitter, scale: [lo, hi], rotate}`` (a config block) -> ``RandomTransforms``."""
    o = dict(options)
    unknown = sorted(set(o) - {"jitter", "scale", "rotate"})
    try:
        if unknown:
            raise TypeError(f"unknown keys {unknown}")
        if "scale" in o:
            lo, hi = o["scale"]
            o["scale"] = (float(lo), float(hi))
        return RandomTransforms(**{k: (float(v) if k != "scale" else v) for k, v in o.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}={options} is not valid: {exc}",
                          f"give {key}={{jitter: 8, scale: [0.95, 1.05], rotate: 5}}") from None
