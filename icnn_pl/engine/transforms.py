"""Transformation robustness (lucid): the encoder sees a randomly moved copy of the image.

Each evaluation draws, per image and from that image's own generator, a shift of up to
``jitter`` pixels, a scale factor in ``scale`` and a rotation of up to ``rotate`` degrees
(in pixel space, about the centre), and applies them as one affine resampling (bilinear,
reflected at the borders, in float32). Features that survive small moves are
what a natural image has; patterns that only fit one pixel grid are discouraged. Off by
default; ``python -m benchmarks.bench_prior --transforms`` measures whether it helps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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

    def __call__(self, image: torch.Tensor, rngs: Sequence[torch.Generator]) -> torch.Tensor:
        """``image`` (B, C, H, W) moved by one random affine map per image (differentiable),
        image i's drawn from ``rngs[i]``: alone or in a batch, an image moves alike."""
        b, _, h, w = image.shape
        if len(rngs) != b:
            raise ValueError(f"{len(rngs)} random generators for {b} images")
        u = torch.cat([torch.rand(1, 4, generator=r, dtype=torch.float64) for r in rngs]) * 2 - 1
        lo, hi = self.scale
        zoom = lo + (hi - lo) * (u[:, 0] + 1) / 2
        angle = u[:, 1] * math.radians(self.rotate)
        return warp(image, affine_theta(zoom, angle, u[:, 2] * self.jitter,
                                        u[:, 3] * self.jitter, (h, w)))


def affine_theta(zoom: torch.Tensor, angle: torch.Tensor, shift_x: torch.Tensor,
                 shift_y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``affine_grid``'s (B, 2, 3) map (output to input, coordinates in [-1, 1]) of a
    rotation by ``angle`` (radians) and a zoom about the image centre, then a shift in
    pixels, all in pixel space: on a non-square image the normalised coordinates scale x
    and y differently, so the rotation's off-diagonal terms carry the aspect ratio (without
    it a rotation is also a shear)."""
    h, w = size
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    return torch.stack([torch.stack([cos, -sin * h / w, shift_x * 2 / w], 1),
                        torch.stack([sin * w / h, cos, shift_y * 2 / h], 1)], 1)


def warp(image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``image`` resampled through ``theta`` (bilinear, reflected at the borders). Geometry
    and sampling run in float32 whatever the autocast: in bfloat16 the grid's coordinates
    would be off by up to 0.6 px at 224 px."""
    with torch.autocast(image.device.type, enabled=False):
        theta = theta.to(device=image.device, dtype=torch.float32)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        return F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="reflection",
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
