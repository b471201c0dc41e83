"""Frozen networks: encoders (read out at named layers) and image generators.

A new network goes into ``ARCHITECTURES``: a constructor, its seeded initialisation (or,
for a trained network, where its weights are found by default), for encoders its
feature-name -> module-path map and the input space it was trained on.
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
from icnn_pl.nets.efficientnet_lite import VARIANTS, EfficientNetLite, lite_layers, package_weights
from icnn_pl.nets.encoder import FeatureEncoder, freeze
from icnn_pl.nets.generator import Relu7Generator, center_crop, init_generator_
from icnn_pl.nets.input_space import InputSpace
from icnn_pl.nets.vgg import PAPER_MEAN_BGR, VGG19, VGG19_LAYERS, init_vgg_
from icnn_pl.nets.weights import load_weights

log = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES", "FeatureEncoder", "Relu7Generator", "build_encoder", "build_generator",
    "default_weights",
    "build_network", "center_crop", "fingerprint", "freeze",
]


@dataclass(frozen=True)
class Architecture:
    make: Callable[[], nn.Module]
    # seeded random weights (demo), used when no weight file is given ...
    init: Callable[[nn.Module, torch.Generator], None] | None
    layers: dict[str, str] = field(default_factory=dict)
    # ... unless the network has trained weights of its own to fall back on
    default_weights: Callable[[], Path] | None = None
    input_space: str = "caffe_bgr"


def _lite(variant: str) -> Architecture:
    return Architecture(lambda: EfficientNetLite(variant), None, lite_layers(variant),
                        lambda: package_weights(variant), "rgb_127_128")


ARCHITECTURES: dict[str, Architecture] = {
    "vgg19": Architecture(VGG19, init_vgg_, VGG19_LAYERS),
    "vgg19_leaky": Architecture(lambda: VGG19(leaky=True), init_vgg_, VGG19_LAYERS),
    "relu7": Architecture(Relu7Generator, init_generator_),
    **{variant: _lite(variant) for variant in VARIANTS},
}


def default_weights(arch: str, weights: str | Path | None) -> Path | None:
    """``weights``, or the trained weights ``arch`` brings (None: seeded random weights)."""
    spec = ARCHITECTURES.get(arch)
    if weights is not None or spec is None or spec.default_weights is None:
        return None if weights is None else Path(weights)
    return spec.default_weights()


def build_network(arch: str, weights: str | Path | None = None, seed: int = 0) -> nn.Module:
    """Build ``arch`` from a weight file, or seeded random weights when ``weights`` is None."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown network {arch!r}", f"use one of: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    weights = default_weights(arch, weights)
    if weights is None:
        assert spec.init is not None  # every architecture without weights of its own has one
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
    input_space: str | Mapping | InputSpace | None = None,
) -> FeatureEncoder:
    """A frozen encoder read out at its named layers (conv1_1 ... fc8 for VGG19; stem,
    block0 ..., head, pool, logits for ``efficientnet_lite0``, weights from its package).

    ``arch`` is a name of ``ARCHITECTURES`` or any ``nn.Module`` (a custom encoder: give
    ``layer_mapping``, and ``input_space="rgb_imagenet"`` for torchvision-style models);
    ``weights`` is then loaded into the module (a ``.caffemodel`` by layer name).
    ``input_space`` None: the architecture's own (``caffe_bgr`` for a module).
    """
    if isinstance(arch, nn.Module):
        net = arch
        if weights is not None:
            load_weights(net, weights, type(net).__name__, layer_mapping)
        return FeatureEncoder(net, layer_mapping, mean_bgr, input_size,
                              input_space or "caffe_bgr")
    net = build_network(arch, weights, seed)
    mapping = {**ARCHITECTURES[arch].layers, **(layer_mapping or {})}
    return FeatureEncoder(net, mapping, mean_bgr, input_size,
                          input_space or ARCHITECTURES[arch].input_space)


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
