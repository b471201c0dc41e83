"""icnn_lbfgs: reconstruct the pixels with L-BFGS-B inside the raw pixel box [0, 255].

    img, loss_list = reconstruct_image(features, net, maxiter=500, ...)
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
import torch

from icnn_pl.engine.functional import layer_weight_mode, reconstruct
from icnn_pl.engine.lbfgsb import ScipyLBFGSB


def reconstruct_image(
    features: Mapping[str, Any], net: torch.nn.Module, *,
    layer_weight: Any = None, channel: Mapping | None = None, mask: Mapping | None = None,
    initial_image: Any = "uniform", loss_type: str = "l2", maxiter: int = 500, m: int = 10,
    ftol: float = 2.220446049250313e-09, gtol: float = 1e-05, maxls: int = 20,
    loss_scale: str = "grad",
    layer_mapping: Mapping[str, str] | None = None, img_mean: Any = None,
    input_size: tuple[int, int] | None = None, seed: int = 0,
    logger: Any = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the image (H, W, 3) RGB float32 0-255 and the loss of every function
    evaluation. ``initial_image``: "uniform" (library default), "mean" (paper scripts)."""
    res = reconstruct(
        features, net, layer_mapping=layer_mapping, img_mean=img_mean, input_size=input_size,
        logger=logger,
        optimizer=partial(ScipyLBFGSB, maxiter=maxiter, m=m, ftol=ftol, gtol=gtol,
                          maxls=maxls, loss_scale=loss_scale),
        n_iter=maxiter, pixel_bounds=True, init=initial_image,
        weights=layer_weight_mode(layer_weight), loss_type=loss_type, masks=mask,
        channels=channel, seed=seed,
    )
    return res.images[0], res.loss_history[0]
