"""The relu7 deep generator network (DeePSiM fc7 generator, Dosovitskiy & Brox 2016).

Input: a 4096-d CaffeNet relu7 code. Output: a 256x256 image already in Caffe space (BGR,
0-255 scale, mean-subtracted); it goes to the encoder as is after a centre crop.
Module names follow bdpy's ``AlexNetGenerator`` (``defc7`` ... ``deconv0``) so its weight
files load; bdpy also stores each layer under ``defc.N`` / ``deconv.N`` keys, which
``icnn_pl.nets.weights`` folds onto these names.
"""

from __future__ import annotations

import torch
from torch import nn

from icnn_pl.nets.vgg import small_biases_

_FC = ("defc7", "defc6", "defc5")
# name, in, out, kernel, stride: every deconv pads 1, k4 s2 doubles the size, k3 s1 keeps it.
_DECONV = (
    ("deconv5", 256, 256, 4, 2), ("conv5_1", 256, 512, 3, 1),
    ("deconv4", 512, 256, 4, 2), ("conv4_1", 256, 256, 3, 1),
    ("deconv3", 256, 128, 4, 2), ("conv3_1", 128, 128, 3, 1),
    ("deconv2", 128, 64, 4, 2), ("deconv1", 64, 32, 4, 2),
    ("deconv0", 32, 3, 4, 2),
)
LEAK = 0.3


GENERATOR_SIZE = 256  # side of the relu7 generator's images (cropped to the encoder's input)


class Relu7Generator(nn.Module):
    """fc7 (relu7) -> 256x256 image generator, LeakyReLU(0.3) after every layer but the last."""

    def __init__(self, input_size: int = 4096) -> None:
        super().__init__()
        self.input_size = input_size
        sizes = [input_size, 4096, 4096, 4096]
        for name, n_in, n_out in zip(_FC, sizes[:-1], sizes[1:], strict=True):
            self.add_module(name, nn.Linear(n_in, n_out))
        for name, c_in, c_out, k, s in _DECONV:
            deconv = nn.ConvTranspose2d(c_in, c_out, kernel_size=k, stride=s, padding=1)
            self.add_module(name, deconv)
        self.act = nn.LeakyReLU(LEAK)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        for name in _FC:
            x = self.act(getattr(self, name)(x))
        x = x.view(-1, 256, 4, 4)
        for name, *_ in _DECONV[:-1]:
            x = self.act(getattr(self, name)(x))
        return self.deconv0(x)


def init_generator_(gen: Relu7Generator, generator: torch.Generator, out_std: float = 60.0) -> None:
    """Seeded variance-preserving initialisation for a random relu7 generator.

    PyTorch's default init makes a random generator output an almost flat image (mean
    |pixel| ~0.1); Kaiming init for the leaky slope keeps the signal alive through the 12
    layers, and the last layer is rescaled so the image has pixel contrast (std ~60 on the
    0-255 scale) for a typical code.
    """
    gain = (2.0 / (1.0 + LEAK**2)) ** 0.5
    for m in gen.modules():
        if isinstance(m, nn.Linear):
            std = gain / m.in_features**0.5
        elif isinstance(m, nn.ConvTranspose2d):
            # Each output pixel of a stride-s transposed conv sums (k/s)^2 * c_in inputs.
            stride = m.stride[0]
            std = gain / (m.in_channels * (m.kernel_size[0] / stride) ** 2) ** 0.5
        else:
            continue
        with torch.no_grad():
            m.weight.normal_(0.0, std, generator=generator)
    small_biases_(gen, generator)  # not zero: see init_vgg_
    # Calibrate the output scale on a typical relu7-like code (non-negative, mean ~1).
    with torch.no_grad():
        z = torch.rand(8, gen.input_size, generator=generator) * 2.0
        scale = out_std / gen(z).std().clamp_min(1e-12)
        gen.deconv0.weight.mul_(scale)


def center_crop(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre crop (B, C, H, W) to ``size``: 256 -> 224 at offset 16, as the reference does."""
    h, w = image.shape[-2:]
    th, tw = size
    if th > h or tw > w:
        raise ValueError(f"cannot crop a {h}x{w} image to {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return image[..., top:top + th, left:left + tw]
