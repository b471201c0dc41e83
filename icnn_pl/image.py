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
    """(B, 3, H, W) Caffe space -> (B, H, W, 3) RGB float32 on the 0-255 scale (not clipped)."""
    mean = torch.tensor(mean_bgr, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x.detach() + mean).flip(1).permute(0, 2, 3, 1).float().cpu().numpy()


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
