"""Frozen networks: encoders (read out at named layers) and image generators.

A new network goes into ``ARCHITECTURES``: a constructor, its seeded initialisation and,
for encoders, its feature-name -> module-path map.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from icnn_pl.errors import ConfigError
from icnn_pl.nets.encoder import FeatureEncoder, freeze
from icnn_pl.nets.generator import Relu7Generator, center_crop, init_generator_
from icnn_pl.nets.vgg import PAPER_MEAN_BGR, VGG19, VGG19_LAYERS, init_vgg_
from icnn_pl.nets.weights import load_weights

log = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES", "FeatureEncoder", "Relu7Generator", "build_encoder", "build_generator",
    "build_network", "center_crop", "fingerprint", "freeze",
]


@dataclass(frozen=True)
class Architecture:
    make: Callable[[], nn.Module]
    init: Callable[[nn.Module, torch.Generator], None]
    layers: dict[str, str] = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {
    "vgg19": Architecture(VGG19, init_vgg_, VGG19_LAYERS),
    "vgg19_leaky": Architecture(lambda: VGG19(leaky=True), init_vgg_, VGG19_LAYERS),
    "relu7": Architecture(Relu7Generator, init_generator_),
}


def build_network(arch: str, weights: str | Path | None = None, seed: int = 0) -> nn.Module:
    """Build ``arch`` from a weight file, or seeded random weights when ``weights`` is None."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown network {arch!r}", f"use one of: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    if weights is None:
        net = spec.make()
        spec.init(net, torch.Generator().manual_seed(seed))
        log.warning(
            "%s: no weight file given, using RANDOM weights (seed %d). Reconstructions show"
            " the pipeline working, not the paper's image quality; pass the lab's weight"
            " file to reproduce it.", arch, seed,
        )
    else:
        with torch.device("meta"):  # no memory or init for weights about to be replaced
            net = spec.make()
        load_weights(net, weights, arch, spec.layers)
    return freeze(net)


def build_encoder(
    arch: str | nn.Module = "vgg19",
    weights: str | Path | None = None,
    mean_bgr: Sequence[float] = PAPER_MEAN_BGR,
    input_size: tuple[int, int] = (224, 224),
    seed: int = 0,
    *,
    layer_mapping: Mapping[str, str] | None = None,
    input_space: str = "caffe_bgr",
) -> FeatureEncoder:
    """A frozen encoder read out at its named layers (conv1_1 ... fc8 for VGG19).

    ``arch`` is a name of ``ARCHITECTURES`` or any ``nn.Module`` (a custom encoder: give
    ``layer_mapping``, and ``input_space="rgb_imagenet"`` for torchvision-style models);
    ``weights`` is then loaded into the module (a ``.caffemodel`` by layer name).
    """
    if isinstance(arch, nn.Module):
        net = arch
        if weights is not None:
            load_weights(net, weights, type(net).__name__, layer_mapping)
        return FeatureEncoder(net, layer_mapping, mean_bgr, input_size, input_space)
    net = build_network(arch, weights, seed)
    mapping = {**ARCHITECTURES[arch].layers, **(layer_mapping or {})}
    return FeatureEncoder(net, mapping, mean_bgr, input_size, input_space)


def build_generator(
    arch: str = "relu7", weights: str | Path | None = None, seed: int = 0
) -> nn.Module:
    """A frozen image generator (the relu7 DGN) mapping codes to Caffe-space images."""
    return build_network(arch, weights, seed)


def fingerprint(module: nn.Module, n: int = 16) -> str:
    """A short digest of ``module``'s parameters (names, shapes, first ``n`` values of
    each): files computed with a seeded random network are keyed by it, so a change of
    the initialisation (e.g. non-zero biases) gets fresh files, not stale ones."""
    h = hashlib.sha1()
    for name, p in module.state_dict().items():
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(p.detach().flatten()[:n].float().cpu().numpy().tobytes())
    return h.hexdigest()[:10]
