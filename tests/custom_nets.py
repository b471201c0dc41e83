"""Small networks the tests define: VGG19's module tree in miniature, and a network that
fails in the middle of its forward pass."""

from __future__ import annotations

import re

import torch
from torch import nn

from icnn_pl.nets.vgg import VGG19_LAYERS

_CFG = [4, 4, "M", 8, 8, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"]
# bdpy's layer_map('vgg19') writes module paths with brackets: features[0], classifier[6]
BDPY_VGG19_MAP = {k: re.sub(r"\.(\d+)", r"[\1]", v) for k, v in VGG19_LAYERS.items()}


class MiniVGG(nn.Module):
    """VGG19's module tree (the same indices) with few channels: the real name map and the
    fc6 flatten order (C, H, W over a 2x2 map) at a test's cost."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(16, 16), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class _Explodes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("unsupported operand for the custom block")


class FailingNet(nn.Module):
    """conv, then a block whose forward raises a TypeError (not a size problem)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), _Explodes())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(x))
