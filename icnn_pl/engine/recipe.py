"""A method as data: a ``Recipe`` (parameter, optimizer, iCNN steps, bounds, loss) and the
one builder that turns it and a set of targets into a ready-to-fit ``Reconstruction``.

The functional API, the Hydra pipeline and the benchmarks all build through here, so a fix
in one is a fix in all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from icnn_pl.engine.evaluate_only import evaluates_only
from icnn_pl.engine.icnn_steps import GDSteps
from icnn_pl.engine.lbfgsb import runs_to_completion
from icnn_pl.engine.objective import Objective, layer_weights, make_mask
from icnn_pl.engine.params import (
    TARGET_INIT,
    FourierImage,
    GeneratorCode,
    PixelImage,
    initial_code,
    initial_image,
    initial_spectrum,
)
from icnn_pl.engine.reconstruction import OptimizerFactory, Reconstruction
from icnn_pl.engine.schedules import Linear, check_n_iter
from icnn_pl.engine.seeds import image_generators, image_seed  # noqa: F401 (re-exported)
from icnn_pl.engine.transforms import RandomTransforms
from icnn_pl.errors import ConfigError
from icnn_pl.nets.encoder import FeatureEncoder

Bound = float | np.ndarray | torch.Tensor | None


def build_reconstruction(
    targets: Mapping[str, torch.Tensor],
    encoder: FeatureEncoder,
    optimizer: OptimizerFactory,
    n_iter: int,
    *,
    generator: nn.Module | None = None,
    init: Any = "uniform",
    code_bounds: tuple[Bound, Bound] = (None, None),
    pixel_bounds: bool = False,
    schedules: Mapping[str, Linear] | None = None,
    steps: GDSteps | None = None,
    weights: str | Mapping[str, float] = "inverse_norm",
    loss_type: str | Mapping[str, str] = "l2",
    masks: Mapping[str, Any] | None = None,
    channels: Mapping[str, Sequence[int]] | None = None,
    return_last_forward: bool = False,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    fourier: Mapping[str, Any] | None = None,
    transforms: RandomTransforms | None = None,
) -> Reconstruction:
    """A ready-to-fit reconstruction of B images from stacked targets (name -> (B, ...)).

    Pixel methods optimise the Caffe-space image (``pixel_bounds`` keeps raw pixels in
    [0, 255]); with a ``generator`` they optimise its input code within ``code_bounds``;
    with ``fourier`` options (``FourierImage``'s decay, colour, squash) the image's
    spectrum. ``transforms`` randomly move the image before the encoder each evaluation.
    """
    n_iter = check_n_iter(n_iter, allow_zero=evaluates_only(optimizer))
    batch = next(iter(targets.values())).shape[0]
    labels = list(labels) if labels is not None else [str(i) for i in range(batch)]
    # One generator per image: an image starts from the same point alone or in a batch.
    rngs = image_generators(seed, labels)
    shapes = {n: tuple(t.shape[1:]) for n, t in targets.items()}
    masks, channels = dict(masks or {}), dict(channels or {})
    unknown = sorted((set(masks) | set(channels)) - set(targets))
    if unknown:
        raise ConfigError(f"masks/channels given for layers {unknown} that are not targets",
                          f"use target layers: {list(targets)}")
    objective = Objective(
        targets,
        layer_weights(targets, weights, labels),
        {n: make_mask(n, shapes[n], masks.get(n), channels.get(n)) for n in targets},
        loss_type,
    )
    if fourier is not None:
        param = _fourier_parameter(encoder, fourier, init, rngs)
    else:
        param = _parameter(encoder, generator, init, rngs, code_bounds, pixel_bounds, targets)
    return Reconstruction(
        param, encoder, objective, optimizer, n_iter, schedules=schedules, steps=steps,
        return_last_forward=return_last_forward, labels=labels, seed=seed,
        transforms=transforms,
    )


def _fourier_parameter(encoder: FeatureEncoder, options: Mapping[str, Any], init: Any,
                       rngs: Sequence[torch.Generator]) -> FourierImage:
    """The spectrum of each image, one initial value per image (as for the pixels)."""
    h, w = encoder.input_size
    param = FourierImage(torch.zeros(len(rngs), 3, h, w // 2 + 1, 2), (h, w),
                         encoder.mean_bgr, **options)
    param.value.data.copy_(torch.cat([initial_spectrum(_one(init, i), param, encoder.mean_bgr, rng)
                                      for i, rng in enumerate(rngs)]))
    return param


def _target_code(init: str, targets: Mapping[str, torch.Tensor], dim: int) -> torch.Tensor:
    """``target:<layer>``: the code is that target layer's features (the DGN-direct
    baseline feeds decoded fc7 features straight into the generator)."""
    layer = init[len(TARGET_INIT):]
    if layer not in targets:
        raise ConfigError(f"init={init!r} but {layer} is not among the target layers",
                          f"add {layer} to the layers (layers=all)")
    code = targets[layer].detach().float().cpu().reshape(targets[layer].shape[0], -1)
    if code.shape[1] != dim:
        raise ConfigError(f"{layer} has {code.shape[1]} features but the generator code has"
                          f" {dim}", "use the layer the generator takes (fc7 for relu7)")
    return code.clone()


def _parameter(encoder: FeatureEncoder, generator: nn.Module | None, init: Any,
               rngs: Sequence[torch.Generator], code_bounds: tuple[Bound, Bound],
               pixel_bounds: bool, targets: Mapping[str, torch.Tensor]
               ) -> PixelImage | GeneratorCode:
    """The pixels (Caffe space) or the generator code, one initial value per image."""
    if generator is None:
        init_value = torch.cat([
            initial_image(_one(init, i), 1, encoder.input_size, encoder.mean_bgr, rng)
            for i, rng in enumerate(rngs)])
        return PixelImage(init_value, encoder.mean_bgr, bounded=pixel_bounds)
    dim = int(getattr(generator, "input_size", 4096))
    if isinstance(init, str) and init.startswith(TARGET_INIT):
        param = GeneratorCode(_target_code(init, targets, dim), generator, encoder.input_size,
                              *code_bounds)
        param.project_()  # clipped to the code bounds, as the code the generator was made for
        return param
    init_value = torch.cat([initial_code(_one(init, i), 1, dim, rng)
                            for i, rng in enumerate(rngs)])
    return GeneratorCode(init_value, generator, encoder.input_size, *code_bounds)


@dataclass
class Recipe:
    """Everything about a method that does not depend on the images: what is optimised
    (pixels, the code of ``generator``, or the spectrum), how (optimizer, schedules, iCNN
    steps), within which bounds, and with which loss. The keyword arguments of
    ``build_reconstruction``."""

    optimizer: OptimizerFactory
    n_iter: int
    generator: nn.Module | None = None
    init: Any = "uniform"
    code_bounds: tuple[Bound, Bound] = (None, None)
    pixel_bounds: bool = False
    schedules: Mapping[str, Linear] = field(default_factory=dict)
    steps: GDSteps | None = None
    loss_type: str | Mapping[str, str] = "l2"
    masks: Mapping[str, Any] | None = None
    channels: Mapping[str, Sequence[int]] | None = None
    return_last_forward: bool = False
    fourier: Mapping[str, Any] | None = None  # FourierImage options: optimise the spectrum
    transforms: RandomTransforms | None = None

    @property
    def runs_to_completion(self) -> bool:
        """One optimizer step runs the whole minimisation (L-BFGS-B)."""
        return runs_to_completion(self.optimizer)

    def build(self, targets: Mapping[str, torch.Tensor], encoder: FeatureEncoder, *,
              weights: str | Mapping[str, Any] = "inverse_norm",
              labels: Sequence[str] | None = None, seed: int = 0) -> Reconstruction:
        """A reconstruction of the images whose stacked targets are ``targets``."""
        return build_reconstruction(targets, encoder, weights=weights, labels=labels,
                                    seed=seed, **vars(self))


def _one(init: Any, i: int) -> Any:
    """Image ``i``'s initial value: a name, one array shared by all, or row i of a batch."""
    if isinstance(init, str):
        return init
    arr = init.detach().cpu().numpy() if isinstance(init, torch.Tensor) else np.asarray(init)
    return arr[i] if arr.ndim in (2, 4) else arr
