"""What is optimised: the pixels of an image, or the input code of a generator.

Each parameterisation owns the only trainable tensor of a reconstruction, its box bounds,
and ``forward()`` -> the Caffe-space image the encoder sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from icnn_pl.errors import ConfigError
from icnn_pl.image import caffe_pixel_bounds, to_caffe
from icnn_pl.nets.encoder import freeze
from icnn_pl.nets.generator import center_crop

Tensor = torch.Tensor
InitSpec = str | np.ndarray | Tensor


class Parameterization(nn.Module):
    """Holds ``value`` (the nn.Parameter) and optional ``lower``/``upper`` bound buffers."""

    value: nn.Parameter
    lower: Tensor | None
    upper: Tensor | None

    def __init__(self, init: Tensor, lower: Tensor | None, upper: Tensor | None) -> None:
        super().__init__()
        self.value = nn.Parameter(init.float().contiguous())
        if lower is not None and upper is not None and bool((lower > upper).any()):
            raise ConfigError(
                "bounds with lower > upper", "give a lower bound not above the upper bound"
            )
        self.register_buffer("lower", None if lower is None else lower.float())
        self.register_buffer("upper", None if upper is None else upper.float())

    def project_(self) -> None:
        """Clamp ``value`` into its bounds in place."""
        if self.lower is not None or self.upper is not None:
            with torch.no_grad():
                self.value.clamp_(self.lower, self.upper)

    def bounds(self) -> tuple[Tensor | None, Tensor | None]:
        """Bounds broadcast to the full shape of ``value`` (or None where unbounded)."""
        shape = self.value.shape
        return tuple(None if b is None else b.expand(shape) for b in (self.lower, self.upper))


class PixelImage(Parameterization):
    """The image itself, in Caffe space (B, 3, H, W); bounds are raw pixels [0, 255]."""

    def __init__(self, init: Tensor, mean_bgr: Sequence[float], bounded: bool = False) -> None:
        lower, upper = caffe_pixel_bounds(mean_bgr) if bounded else (None, None)
        super().__init__(init, lower, upper)

    def forward(self) -> Tensor:
        return self.value


class GeneratorCode(Parameterization):
    """The input code of a frozen generator; the image is ``crop(G(code))``.

    The generator is held by reference, not registered as a submodule: it is shared by
    every reconstruction of a job and must not be moved or saved with each one.
    """

    def __init__(
        self, init: Tensor, generator: nn.Module, crop: tuple[int, int],
        lower: Tensor | float | None = None, upper: Tensor | float | None = None,
    ) -> None:
        super().__init__(init, _bound(lower, init), _bound(upper, init))
        self._generator = (freeze(generator),)
        self.crop = crop

    @property
    def generator(self) -> nn.Module:
        return self._generator[0]

    def forward(self) -> Tensor:
        return center_crop(self.generator(self.value), self.crop)


def _bound(b: Tensor | float | np.ndarray | None, like: Tensor) -> Tensor | None:
    if b is None:
        return None
    t = torch.as_tensor(np.asarray(b, dtype=np.float32)) if not isinstance(b, Tensor) else b
    if t.dim() > 0 and t.shape[-1] != like.shape[-1]:
        raise ConfigError(
            f"code bounds have {t.shape[-1]} values but the generator code has {like.shape[-1]}",
            "give a scalar bound or an act_range file with one value per code unit",
        )
    return t.float()


# -- initial values -----------------------------------------------------------------------
PIXEL_INITS = ("uniform", "mean", "zeros", "normal")
CODE_INITS = ("zeros", "normal")


def check_init(spec: InitSpec, of_code: bool, key: str = "init") -> None:
    """A named initial value must be one this parameter knows (arrays are checked for
    shape when the parameter is made)."""
    names = CODE_INITS if of_code else PIXEL_INITS
    if isinstance(spec, str) and spec not in names:
        what = "initial generator code" if of_code else "initial image"
        raise ConfigError(f"{key}={spec!r} is not a known {what}",
                          f"use one of {names} or an array")


def initial_image(
    spec: InitSpec, batch: int, size: tuple[int, int], mean_bgr: Sequence[float],
    rng: torch.Generator,
) -> Tensor:
    """Initial Caffe-space image (B, 3, H, W).

    ``uniform``: random integers 0..255 per RGB pixel (library default); ``mean``: the
    mean-colour image, zeros in Caffe space (paper scripts); ``zeros``: same as ``mean``;
    ``normal``: N(0, 1) in Caffe space; an array: an RGB 0-255 image (H, W, 3) or
    (B, H, W, 3).
    """
    h, w = size
    if isinstance(spec, str):
        if spec == "uniform":
            rgb = torch.randint(0, 256, (batch, h, w, 3), generator=rng).float().numpy()
            return to_caffe(rgb, mean_bgr)
        if spec in ("mean", "zeros"):
            return torch.zeros(batch, 3, h, w)
        check_init(spec, of_code=False)
        return torch.randn(batch, 3, h, w, generator=rng)  # "normal"
    arr = np.asarray(spec.detach().cpu() if isinstance(spec, Tensor) else spec, dtype=np.float32)
    if arr.ndim == 3:
        arr = np.broadcast_to(arr, (batch, *arr.shape)).copy()
    if arr.shape != (batch, h, w, 3):
        raise ConfigError(
            f"initial image of shape {arr.shape} does not fit the network input {h}x{w}x3",
            f"give an RGB image of shape ({h}, {w}, 3)",
        )
    return to_caffe(arr, mean_bgr)


def initial_code(spec: InitSpec, batch: int, dim: int, rng: torch.Generator) -> Tensor:
    """Initial generator code (B, dim): ``zeros`` (paper script), ``normal`` N(0, 1)
    (library and PyTorch demo), or an array (dim,) / (B, dim)."""
    if isinstance(spec, str):
        if spec == "zeros":
            return torch.zeros(batch, dim)
        check_init(spec, of_code=True)
        return torch.randn(batch, dim, generator=rng)  # "normal"
    t = torch.as_tensor(np.asarray(spec.detach().cpu() if isinstance(spec, Tensor) else spec,
                                   dtype=np.float32))
    if t.dim() == 1:
        t = t.expand(batch, -1)
    if tuple(t.shape) != (batch, dim):
        raise ConfigError(
            f"initial generator code of shape {tuple(t.shape)} does not fit ({dim},)",
            f"give a vector of {dim} values",
        )
    return t.clone()
