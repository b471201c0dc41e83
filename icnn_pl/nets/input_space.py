"""How a network wants its input, as one per-channel affine map from the Caffe-space image.

Every method, clip and score here works on the Caffe-space image (BGR, 0-255, minus the
image space's mean ``mean_bgr``). A network trained on another input gets the image
converted in the encoder's input step: channel order (``rgb`` / ``bgr``), value range
(``255``: 0-255, ``1``: 0-1), then ``(x - mean) / std`` per channel (in the network's channel
order and range). Named presets:

- ``caffe_bgr``: the Caffe-space image as it is (VGG19 from the Caffe weights);
- ``rgb_imagenet``: RGB in [0, 1], ImageNet mean and std (torchvision models);
- ``rgb_127_128``: RGB in [0, 255], ``(x - 127) / 128`` (TensorFlow's EfficientNet-Lite).

A custom network gives its own as a mapping: ``{channels: rgb, range: 255, mean: [...],
std: [...]}`` (``network.input_space`` in the config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from icnn_pl.errors import ConfigError

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpace:
    """A network's input: channel order, value range and per-channel mean and std.
    ``mean=None`` means the image space's own mean (``mean_bgr``), i.e. Caffe space."""

    name: str
    channels: str = "bgr"
    range: float = 255.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def affine(self, mean_bgr: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(scale, shift)`` per *Caffe* channel (B, G, R): network input channel ``c`` is
        ``scale * caffe + shift`` of the Caffe channel it comes from."""
        order = (2, 1, 0) if self.channels == "rgb" else (0, 1, 2)  # net channel -> BGR index
        mean = self.mean if self.mean is not None else tuple(mean_bgr[i] for i in order)
        unit = self.range / 255.0
        scale, shift = [0.0] * 3, [0.0] * 3
        for c, src in enumerate(order):
            scale[src] = unit / self.std[c]
            shift[src] = (mean_bgr[src] * unit - mean[c]) / self.std[c]
        return tuple(scale), tuple(shift)

    def is_identity(self, mean_bgr: Sequence[float]) -> bool:
        scale, shift = self.affine(mean_bgr)
        return self.channels == "bgr" and all(abs(s - 1) < 1e-12 for s in scale) \
            and all(abs(b) < 1e-9 for b in shift)


PRESETS: dict[str, InputSpace] = {
    "caffe_bgr": InputSpace("caffe_bgr"),
    "rgb_imagenet": InputSpace("rgb_imagenet", "rgb", 1.0, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB),
    "rgb_127_128": InputSpace("rgb_127_128", "rgb", 255.0, (127.0,) * 3, (128.0,) * 3),
}
INPUT_SPACES = tuple(PRESETS)
_FIX = ("use one of " + ", ".join(INPUT_SPACES) + ", or {channels: rgb|bgr, range: 255|1,"
        " mean: [m1,m2,m3], std: [s1,s2,s3]} (in the network's channel order and range)")


def _three(value: Any, key: str) -> tuple[float, float, float]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3 \
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"input space {key}={value!r} must be three numbers", _FIX)
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def parse_input_space(spec: str | Mapping[str, Any] | InputSpace) -> InputSpace:
    """A preset name, a mapping (channels, range, mean, std) or an ``InputSpace``."""
    if isinstance(spec, InputSpace):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ConfigError(f"unknown input space {spec!r}", _FIX)
        return PRESETS[spec]
    if not isinstance(spec, Mapping):
        raise ConfigError(f"input space {spec!r} is neither a name nor a mapping", _FIX)
    unknown = sorted(set(spec) - {"channels", "range", "mean", "std"})
    channels, rng = spec.get("channels", "rgb"), spec.get("range", 255)
    if unknown or channels not in ("rgb", "bgr") or rng not in (1, 255):
        raise ConfigError(f"input space {dict(spec)!r}: channels must be rgb or bgr, range 1"
                          f" or 255{f', unknown keys {unknown}' if unknown else ''}", _FIX)
    std = _three(spec.get("std", (1, 1, 1)), "std")
    if any(s <= 0 for s in std):
        raise ConfigError(f"input space std={list(std)} must be positive", _FIX)
    return InputSpace("custom", channels, float(rng), _three(spec.get("mean", (0, 0, 0)), "mean"),
                      std)


def affine_tensors(space: InputSpace, mean_bgr: Sequence[float], like: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The map's per-channel scale and shift as (1, 3, 1, 1) tensors like ``like``."""
    scale, shift = space.affine(mean_bgr)
    kw = {"dtype": like.dtype, "device": like.device}
    return (torch.tensor(scale, **kw).view(1, 3, 1, 1), torch.tensor(shift, **kw).view(1, 3, 1, 1))
