"""Shared builders for the engine tests (``tests/test_engine_*.py``).

Tiny networks keep the engine tests fast; the image-space conversions and feature
read-outs here are restated independently of ``icnn_pl`` so the tests do not check the
engine against itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from icnn_pl.nets import FeatureEncoder

MEAN_BGR = (104.0, 117.0, 123.0)
SIZE = (16, 16)  # tiny encoder input (H, W)
PAD = 2  # the tiny generator draws (H + 2 PAD) x (W + 2 PAD) images: the crop is exercised
LAYERS = ("c1", "c2", "fc")
# feature name -> module path of ``tiny_net`` (features taken from the conv / linear
# modules, i.e. before the ReLU)
TINY_MAPPING = {"c1": "0", "c2": "3", "fc": "6"}
TINY_INDEX = {"c1": 0, "c2": 3, "fc": 6}
TINY_SHAPES = {"c1": (4, 16, 16), "c2": (6, 8, 8), "fc": (10,)}


def _tiny_modules(relu_inplace: bool = False) -> list[tuple[str, nn.Module]]:
    return [
        ("c1", nn.Conv2d(3, 4, 3, padding=1)),
        ("r1", nn.ReLU(inplace=relu_inplace)),
        ("p1", nn.MaxPool2d(2)),
        ("c2", nn.Conv2d(4, 6, 3, padding=1)),
        ("r2", nn.ReLU(inplace=relu_inplace)),
        ("flat", nn.Flatten()),
        ("fc", nn.Linear(6 * 8 * 8, 10)),
    ]


def _seeded(modules: list[tuple[str, nn.Module]], seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in modules:
            for p in m.parameters():
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5 * scale)


def tiny_net(seed: int = 0, scale: float = 1.0, relu_inplace: bool = False) -> nn.Sequential:
    """conv(3->4) relu pool conv(4->6) relu flatten linear(384->10), 16x16 input.

    ``scale`` multiplies every weight and bias (features shrink ~scale per layer)."""
    modules = _tiny_modules(relu_inplace)
    _seeded(modules, seed, scale)
    return nn.Sequential(*(m for _, m in modules))


def tiny_named_net(seed: int = 0) -> nn.Sequential:
    """``tiny_net`` with attribute names (c1, r1, p1, c2, r2, flat, fc): the same weights
    for the same seed. bdpy's reconstruct needs layer paths that are Python identifiers."""
    modules = _tiny_modules()
    _seeded(modules, seed, 1.0)
    return nn.Sequential(OrderedDict(modules))


def tiny_encoder(seed: int = 0, scale: float = 1.0, mean_bgr: Sequence[float] = MEAN_BGR
                 ) -> FeatureEncoder:
    return FeatureEncoder(tiny_net(seed, scale), TINY_MAPPING, mean_bgr=mean_bgr, input_size=SIZE)


class TinyGenerator(nn.Module):
    """Code (B, dim) -> Caffe-space image (B, 3, H + 2 PAD, W + 2 PAD) with pixel contrast."""

    def __init__(self, dim: int = 8, size: tuple[int, int] = SIZE, pad: int = PAD,
                 hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.input_size = dim
        self.out_hw = (size[0] + 2 * pad, size[1] + 2 * pad)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.LeakyReLU(0.3)
        self.fc2 = nn.Linear(hidden, 3 * self.out_hw[0] * self.out_hw[1])
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(self.fc1.weight.shape, generator=gen) / dim**0.5)
            self.fc1.bias.copy_(torch.randn(hidden, generator=gen) * 0.1)
            self.fc2.weight.copy_(torch.randn(self.fc2.weight.shape, generator=gen) * 30.0)
            self.fc2.bias.copy_(torch.randn(self.fc2.bias.shape, generator=gen) * 10.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(z))).view(-1, 3, *self.out_hw)


# -- independent restatements ---------------------------------------------------------------
def rgb_image(seed: int = 0, size: tuple[int, int] = SIZE, low: float = 0.0,
              high: float = 255.0) -> np.ndarray:
    """A random RGB image (H, W, 3) float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, (*size, 3)).astype(np.float32)


def rgb_to_caffe(rgb: np.ndarray, mean_bgr: Sequence[float] = MEAN_BGR) -> np.ndarray:
    """(H, W, 3) RGB 0-255 -> (3, H, W) BGR minus mean, float64."""
    bgr = np.asarray(rgb, dtype=np.float64)[..., ::-1]
    return (bgr - np.asarray(mean_bgr, dtype=np.float64)).transpose(2, 0, 1).copy()


def caffe_to_rgb(x: np.ndarray, mean_bgr: Sequence[float] = MEAN_BGR) -> np.ndarray:
    """(3, H, W) Caffe space -> (H, W, 3) RGB 0-255, float64."""
    x = np.asarray(x, dtype=np.float64) + np.asarray(mean_bgr, dtype=np.float64)[:, None, None]
    return x[::-1].transpose(1, 2, 0).copy()


def sequential_features(net: nn.Sequential, x: torch.Tensor,
                        index: Mapping[str, int] = TINY_INDEX) -> dict[str, torch.Tensor]:
    """Outputs of the children at ``index`` of a Sequential, computed child by child."""
    out: dict[str, torch.Tensor] = {}
    by_index = {i: name for name, i in index.items()}
    h = x
    for i, module in enumerate(net):
        h = module(h)
        if i in by_index:
            out[by_index[i]] = h
        if len(out) == len(index):
            break
    return out


def double_copy(module: nn.Module) -> nn.Module:
    """A float64 copy that shares nothing with ``module``."""
    return copy.deepcopy(module).double().eval()


def tiny_targets(seed: int = 1, net_seed: int = 0, scale: float = 1.0,
                 layers: Sequence[str] = LAYERS, rgb: np.ndarray | None = None
                 ) -> dict[str, np.ndarray]:
    """Features (no batch axis, float32) of a random RGB image through ``tiny_net``."""
    rgb = rgb_image(seed) if rgb is None else rgb
    net = tiny_net(net_seed, scale)
    x = torch.from_numpy(rgb_to_caffe(rgb)).float()[None]
    with torch.no_grad():
        feats = sequential_features(net, x, {n: TINY_INDEX[n] for n in layers})
    return {n: feats[n][0].numpy().astype(np.float32) for n in layers}


def batched_tiny_targets(device: str | torch.device = "cpu", **kwargs) -> dict[str, torch.Tensor]:
    """``tiny_targets(**kwargs)`` as tensors with a batch axis of 1, on ``device``."""
    return {n: torch.from_numpy(t)[None].to(device) for n, t in tiny_targets(**kwargs).items()}


def generator_targets(gen: nn.Module, code: np.ndarray, net_seed: int = 0,
                      layers: Sequence[str] = LAYERS) -> dict[str, np.ndarray]:
    """Features of the centre crop of ``gen(code)`` through ``tiny_net``."""
    net = tiny_net(net_seed)
    with torch.no_grad():
        img = gen(torch.as_tensor(code, dtype=torch.float32)[None])
        img = img[:, :, PAD:PAD + SIZE[0], PAD:PAD + SIZE[1]]
        feats = sequential_features(net, img, {n: TINY_INDEX[n] for n in layers})
    return {n: feats[n][0].numpy().astype(np.float32) for n in layers}


def inverse_norm_weights(targets: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``w_l = (1/||t_l||^2) / sum_k (1/||t_k||^2)``."""
    inv = {n: 1.0 / float(np.sum(np.asarray(t, dtype=np.float64) ** 2))
           for n, t in targets.items()}
    total = sum(inv.values())
    return {n: v / total for n, v in inv.items()}


def linear_at(start: float, end: float, t: int, n: int) -> float:
    """The reference schedule ``v_t = start + t * (end - start) / n``."""
    return start + t * (end - start) / n


class ForwardCounter:
    """Counts the calls of a module's forward (optionally only those with grad enabled)."""

    def __init__(self, module: nn.Module, grad_only: bool = False) -> None:
        self.count = 0
        self.grad_only = grad_only
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _m, _inp, _out) -> None:
        if not self.grad_only or torch.is_grad_enabled():
            self.count += 1

    def remove(self) -> None:
        self.handle.remove()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the previous count. Tiny networks run
    faster on one thread and do not slow down when other jobs share the CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
