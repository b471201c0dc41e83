"""What is optimised: the pixels of an image, the input code of a generator, or the image's
Fourier spectrum (a weight-free prior).

Each parameterisation owns the only trainable tensor of a reconstruction, its box bounds,
and ``forward()`` -> the Caffe-space image the encoder sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


# lucid's ImageNet colour correlation (square root of the RGB covariance, via SVD): rows are
# output colours R, G, B. Our images are BGR, so the rows are reversed where it is used.
IMAGENET_COLOUR_SQRT_RGB = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
COLOUR_DECORRELATIONS = ("imagenet", "none")
SQUASHES = ("sigmoid", "clamp")
FOURIER_GAIN = 0.25  # lucid's "/ 4": keeps its spectrum scale, so its learning rates carry over
FOURIER_INIT_STD = 0.01  # lucid's initial spectrum: N(0, 0.01^2), an almost grey image
_SQUASH_EPS = 1e-3  # the inverse clips pixels to [eps, 1 - eps] of the range (sigmoid)


class FourierImage(Parameterization):
    """The image as a decorrelated, 1/f-scaled Fourier spectrum (Olah et al. 2017, lucid).

    ``value`` is the spectrum (B, 3, H, W//2+1, 2) (real, imaginary); the image is::

        squash(colour @ irfft2(spectrum * gain / max(f, 1/max(H, W))^decay)) * 255 - mean

    in Caffe space (BGR, 0-255 minus the mean), the space ``PixelImage`` holds and the
    encoder reads. Scaling by 1/f makes every frequency equally easy to change, so the
    optimiser does not fill the image with high-frequency patterns; the colour matrix
    decorrelates the channels; the squash keeps raw pixels in [0, 255] without bounds.

    Args:
        spectrum: the initial spectrum (see ``to_spectrum`` for one from an image).
        size: image (H, W).
        mean_bgr: the encoder's mean pixel.
        decay: exponent of the 1/f scale (1: lucid; 0: a plain Fourier basis).
        colour: "imagenet" (lucid's matrix), "none" (identity) or a 3x3 RGB matrix.
        squash: "sigmoid" (lucid's default) or "clamp" (clip to the range; the gradient
            passes through, as lucid's ``constrain_L_inf``).
    """

    def __init__(self, spectrum: Tensor, size: tuple[int, int], mean_bgr: Sequence[float],
                 decay: float = 1.0, colour: str | Sequence[Sequence[float]] = "imagenet",
                 squash: str = "sigmoid") -> None:
        super().__init__(spectrum, None, None)
        self.size = (int(size[0]), int(size[1]))
        h, w = self.size
        if tuple(self.value.shape[1:]) != (3, h, w // 2 + 1, 2):
            raise ConfigError(f"spectrum of shape {tuple(self.value.shape)} does not fit a"
                              f" {h}x{w} image", f"give (B, 3, {h}, {w // 2 + 1}, 2)")
        if squash not in SQUASHES:
            raise ConfigError(f"squash={squash!r} is not known", f"use one of {SQUASHES}")
        self.squash = squash
        freq = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.rfftfreq(w)[None] ** 2)
        self.register_buffer("scale",
                             FOURIER_GAIN / freq.clamp_min(1.0 / max(h, w)) ** float(decay))
        self.register_buffer("colour", colour_matrix_bgr(colour))
        self.register_buffer("mean", torch.tensor(mean_bgr, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self) -> Tensor:
        spectrum = torch.view_as_complex(self.value) * self.scale
        u = torch.fft.irfft2(spectrum, s=self.size, norm="ortho")
        t = torch.einsum("ij,bjhw->bihw", self.colour, u)
        if self.squash == "sigmoid":
            s = torch.sigmoid(t)
        else:  # clip to the range; the gradient passes as if unclipped (straight-through)
            s = t + 0.5
            s = s + (s.clamp(0.0, 1.0) - s).detach()
        return s * 255.0 - self.mean

    @torch.no_grad()
    def to_spectrum(self, image: Tensor) -> Tensor:
        """The spectrum (B, 3, H, W//2+1, 2) whose image is ``image`` (Caffe space): the
        inverse of ``forward``, exact for raw pixels inside (eps, 255 - eps) (sigmoid) or
        [0, 255] (clamp); pixels outside are clipped first."""
        s = (image.to(self.mean) + self.mean) / 255.0
        if self.squash == "sigmoid":
            t = torch.logit(s.clamp(_SQUASH_EPS, 1.0 - _SQUASH_EPS))
        else:
            t = s.clamp(0.0, 1.0) - 0.5
        u = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.colour), t)
        return torch.view_as_real(torch.fft.rfft2(u, norm="ortho") / self.scale).contiguous()

    @classmethod
    def from_image(cls, image: Tensor, mean_bgr: Sequence[float], **options: Any
                   ) -> FourierImage:
        """A parameterisation that starts at ``image`` (B, 3, H, W), Caffe space."""
        b, _, h, w = image.shape
        param = cls(torch.zeros(b, 3, h, w // 2 + 1, 2), (h, w), mean_bgr, **options)
        param.value.data.copy_(param.to_spectrum(image))
        return param


def colour_matrix_bgr(colour: str | Sequence[Sequence[float]]) -> Tensor:
    """The 3x3 matrix from decorrelated to BGR colour: lucid's normalisation (divided by
    its largest column norm), rows reversed from RGB to BGR."""
    if isinstance(colour, str):
        if colour not in COLOUR_DECORRELATIONS:
            raise ConfigError(f"colour={colour!r} is not a known colour decorrelation",
                              f"use one of {COLOUR_DECORRELATIONS} or a 3x3 RGB matrix")
        m = torch.tensor(IMAGENET_COLOUR_SQRT_RGB) if colour == "imagenet" else torch.eye(3)
    else:
        m = torch.as_tensor(np.asarray(colour, dtype=np.float32))
        if m.shape != (3, 3) or abs(float(torch.linalg.det(m))) < 1e-8:
            raise ConfigError(f"colour matrix of shape {tuple(m.shape)} is not an invertible"
                              " 3x3 matrix", "give 3 rows of 3 numbers (RGB), or 'imagenet'")
    m = m.float() / m.norm(dim=0).max()
    return m.flip(0).contiguous()


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
# Fourier: "normal" is lucid's random spectrum, "zeros" a grey image; "uniform" and "mean"
# are the pixel inits, carried into the spectrum by the inverse.
FOURIER_INITS = ("normal", "zeros", "uniform", "mean")
INITS = {"pixel": PIXEL_INITS, "code": CODE_INITS, "fourier": FOURIER_INITS}
# A code may also start at a target layer's features ("target:fc7"): the DGN-direct baseline.
TARGET_INIT = "target:"


def check_init(spec: InitSpec, kind: str, key: str = "init") -> None:
    """A named initial value must be one this parameter knows (arrays are checked for
    shape when the parameter is made). ``kind``: the parameter's kind ("pixel", "code",
    "fourier")."""
    names = INITS[kind]
    if kind == "code" and isinstance(spec, str) and spec.startswith(TARGET_INIT) \
            and len(spec) > len(TARGET_INIT):
        return
    if isinstance(spec, str) and spec not in names:
        what = {"code": "initial generator code", "pixel": "initial image",
                "fourier": "initial spectrum"}[kind]
        extra = f", {TARGET_INIT}<layer>" if kind == "code" else ""
        raise ConfigError(f"{key}={spec!r} is not a known {what}",
                          f"use one of {names}{extra} or an array")


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
        check_init(spec, "pixel")
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
        check_init(spec, "code")
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


def initial_spectrum(spec: InitSpec, param: FourierImage, mean_bgr: Sequence[float],
                     rng: torch.Generator) -> Tensor:
    """One image's initial spectrum (1, 3, H, W//2+1, 2) for ``param``: ``normal`` (lucid:
    N(0, 0.01^2), an almost grey image), ``zeros`` (grey), or a pixel init (``uniform``,
    ``mean``, an RGB array, ``mean_bgr`` the mean pixel ``param`` was made with) carried
    into the spectrum by the inverse."""
    shape = (1, *param.value.shape[1:])
    if isinstance(spec, str) and spec in ("normal", "zeros"):
        return (torch.randn(shape, generator=rng) * FOURIER_INIT_STD if spec == "normal"
                else torch.zeros(shape))
    if isinstance(spec, str):
        check_init(spec, "fourier")
    return param.to_spectrum(initial_image(spec, 1, param.size, mean_bgr, rng))
