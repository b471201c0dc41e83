"""Image spaces: RGB HxWx3 0-255 arrays <-> the encoder's Caffe space (BGR CHW, minus mean)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_caffe(rgb: np.ndarray, mean_bgr: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) RGB 0-255 -> (B, 3, H, W) BGR minus mean, float32."""
    x = torch.as_tensor(np.asarray(rgb, dtype=np.float32))
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (B, H, W, 3) RGB images, got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).flip(1)  # HWC RGB -> CHW BGR
    return (x - torch.tensor(mean_bgr, dtype=torch.float32).view(1, 3, 1, 1)).contiguous()


def from_caffe(x: torch.Tensor, mean_bgr: Sequence[float]) -> np.ndarray:
    """(B, 3, H, W) Caffe space -> (B, H, W, 3) RGB float32 on the 0-255 scale (not clipped);
    the mean is added in float32 (in bfloat16 116.669 would become 116.5)."""
    mean = torch.tensor(mean_bgr, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.detach().float() + mean).flip(1).permute(0, 2, 3, 1).float().cpu().numpy()


def caffe_pixel_bounds(mean_bgr: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels in [0, 255] expressed in Caffe space: [-mean_c, 255 - mean_c] per channel."""
    mean = torch.tensor(mean_bgr, dtype=torch.float32).view(1, 3, 1, 1)
    return -mean, 255.0 - mean


def load_rgb(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as RGB float32 (H, W, 3) 0-255, resized (bicubic) to ``size``."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        return np.asarray(im, dtype=np.float32)


DISPLAY_PERCENTILES = (2.0, 98.0)


def display_image(img: np.ndarray) -> np.ndarray:
    """The lab's display conversion: clip to the 2nd/98th percentiles, min-max to uint8.

    Percentiles are over the whole image (all channels, numpy's linear interpolation);
    scaled values are truncated like the lab's ``np.uint8`` cast; a constant image (or
    one without finite values) gives zeros.
    """
    x = np.asarray(img, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros(x.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, DISPLAY_PERCENTILES)
    span = float(hi - lo)
    if span <= 0.0:
        return np.zeros(x.shape, dtype=np.uint8)
    x = np.clip(np.nan_to_num(x, nan=lo), lo, hi) - lo
    return np.clip(x * (255.0 / span), 0.0, 255.0).astype(np.uint8)
