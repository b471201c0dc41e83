"""VGG19 in plain torch, with torchvision-compatible state-dict keys.

The weights users have (bdpy's ``VGG_ILSVRC_19_layers.pt``) are the Caffe VGG19 weights, so
the network expects Caffe-space input: CHW, BGR, 0-255, minus the per-channel mean.
Features are read *before* the ReLU, from the conv / linear modules named in
``VGG19_LAYERS``.
"""

from __future__ import annotations

import torch
from torch import nn

# Output channels per conv block; "M" is a pooling layer.
_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]

# Feature name -> module path, as in bdpy and every iCNN demo.
VGG19_LAYERS: dict[str, str] = {
    "conv1_1": "features.0", "conv1_2": "features.2",
    "conv2_1": "features.5", "conv2_2": "features.7",
    "conv3_1": "features.10", "conv3_2": "features.12",
    "conv3_3": "features.14", "conv3_4": "features.16",
    "conv4_1": "features.19", "conv4_2": "features.21",
    "conv4_3": "features.23", "conv4_4": "features.25",
    "conv5_1": "features.28", "conv5_2": "features.30",
    "conv5_3": "features.32", "conv5_4": "features.34",
    "fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6",
}

# Mean pixel (BGR, 0-255) of ``ilsvrc_2012_mean.npy``, used by the paper scripts.
PAPER_MEAN_BGR = (104.007, 116.669, 122.679)
# Rounded mean used by the Caffe library default and the PyTorch demo.
LIBRARY_MEAN_BGR = (104.0, 117.0, 123.0)


class VGG19(nn.Module):
    """VGG19 (configuration E) with ``features``, ``avgpool`` and ``classifier`` like torchvision.

    ``leaky=True`` gives the imagery variant of the paper (Fig 8): LeakyReLU(0.2) everywhere
    and average instead of max pooling, with the same weights.
    """

    def __init__(self, num_classes: int = 1000, leaky: bool = False) -> None:
        super().__init__()
        self.leaky = leaky
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _CFG:
            if v == "M":
                pool = nn.AvgPool2d if leaky else nn.MaxPool2d
                layers.append(pool(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), self._act()]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), self._act(), nn.Dropout(),
            nn.Linear(4096, 4096), self._act(), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def _act(self) -> nn.Module:
        # Not in-place: a forward hook must see the conv output before the ReLU.
        return nn.LeakyReLU(0.2) if self.leaky else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def init_vgg_(net: nn.Module, generator: torch.Generator) -> None:
    """torchvision's VGG initialisation (Kaiming normal, fan_out), seeded.

    PyTorch's default initialisation shrinks activations layer by layer (features of a
    random image fall to ~1e-7 gradients at the input); this one keeps their scale, so a
    random network is a usable stand-in when no weight file is given.

    Biases are small but not zero (torchvision zeroes them), as in trained networks: with
    zero biases a constant image (the paper's mean-colour start, or a generator's output
    for a zero code) gives exactly zero features from conv1_1 on and a zero gradient, and
    L-BFGS stops after one evaluation. N(0, 0.01) biases (drawn after every weight, so the
    weights are those of the zero-bias network) change the layers' feature statistics by
    < 0.1 % (README: random networks).
    """
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=generator)
        elif isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.normal_(0.0, 0.01, generator=generator)
    small_biases_(net, generator)


RANDOM_BIAS_STD = 0.01  # biases of the seeded random networks (vgg19, relu7 generator)


def small_biases_(net: nn.Module, generator: torch.Generator,
                  std: float = RANDOM_BIAS_STD) -> None:
    """Draw every conv / linear bias of ``net`` from N(0, std), in module order."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear) and m.bias is not None:
            with torch.no_grad():
                m.bias.normal_(0.0, std, generator=generator)
