"""Shared body of the functional API (``icnn_pl.icnn_gd.reconstruct_image`` and friends).

The four method modules only translate the reference option names into a recipe's
objects; this file turns user inputs (feature dicts of arrays, any ``nn.Module``) into a
``Reconstruction`` and fits it on the network's device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from icnn_pl.engine.fit import device_trainer_args, fit
from icnn_pl.engine.flat_loss import warn_if_flat
from icnn_pl.engine.recipe import build_reconstruction
from icnn_pl.engine.reconstruction import ReconResult
from icnn_pl.engine.targets import expected_shapes, stack_targets
from icnn_pl.errors import ConfigError, DataError
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.nets.vgg import PAPER_MEAN_BGR


def as_encoder(
    net: nn.Module, layer_mapping: Mapping[str, str] | None = None,
    img_mean: Sequence[float] | None = None, input_size: tuple[int, int] | None = None,
) -> FeatureEncoder:
    """``net`` itself when it is a ``FeatureEncoder``; else wrap it with ``layer_mapping``."""
    if isinstance(net, FeatureEncoder):
        if layer_mapping:
            net.layer_mapping.update(layer_mapping)
        if img_mean is not None or input_size is not None:
            raise ConfigError("img_mean / input_size are set on the icnn_pl encoder itself",
                              "build the encoder with them (build_encoder(mean_bgr=..., "
                              "input_size=...)) and leave these options unset")
        return net
    if not isinstance(net, nn.Module):
        raise ConfigError(f"net must be an nn.Module, got {type(net).__name__}",
                          "pass an icnn_pl encoder or a torch module with layer_mapping")
    return FeatureEncoder(net, layer_mapping,
                          PAPER_MEAN_BGR if img_mean is None else img_mean,
                          (224, 224) if input_size is None else input_size)


def layer_weight_mode(layer_weight: Any) -> str | Mapping[str, float]:
    """The reference's ``layer_weight`` option: None means inverse-norm weights (every
    reference demo and paper script), "uniform" the library's 1/L, a dict explicit ones."""
    return "inverse_norm" if layer_weight is None else layer_weight


def reconstruct(
    features: Mapping[str, np.ndarray | torch.Tensor],
    net: nn.Module,
    *,
    layer_mapping: Mapping[str, str] | None = None,
    img_mean: Sequence[float] | None = None,
    input_size: tuple[int, int] | None = None,
    logger: Any = False,
    **build_kwargs: Any,
) -> ReconResult:
    """Validate ``features`` against ``net``, build the reconstruction, fit it, return it
    (with its stop reason); warns (``LossDidNotFallWarning``) when the loss did not fall."""
    init = build_kwargs.get("init")
    if input_size is None and not isinstance(net, FeatureEncoder) and not isinstance(init, str) \
            and init is not None and np.ndim(init) == 3:
        input_size = tuple(np.shape(init)[:2])  # a raw module's input size from the image
    encoder = as_encoder(net, layer_mapping, img_mean, input_size)
    if not features:
        raise DataError("no target features given", "pass a dict of layer name -> features")
    targets = stack_targets([features], expected_shapes(encoder, list(features)))
    module = build_reconstruction(targets, encoder, **build_kwargs)
    result = fit(module, logger=logger, **device_trainer_args(encoder.device))
    # a gradient method's history lacks the loss after its last step: one entry says
    # nothing; L-BFGS-B after one evaluation took no step (stacklevel 4: the user's call)
    if module.n_iter > 0 and (module.runs_to_completion or result.loss_history.shape[1] > 1):
        warn_if_flat(result.loss_history, result.stop_reason, stacklevel=4)
    return result
