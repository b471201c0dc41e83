"""icnn_fourier: reconstruct an image through a weight-free prior, its decorrelated,
1/f-scaled Fourier spectrum (Olah et al. 2017, lucid), with Adam or L-BFGS.

    img, loss_list = reconstruct_image(features, net, iter_n=200, ...)

Not in the reference library: the pixels are ``sigmoid(colour @ irfft2(spectrum / f))``
mapped to 0-255, so natural images are easy to reach and no generator weights are needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from icnn_pl.engine.functional import layer_weight_mode, reconstruct
from icnn_pl.engine.lbfgsb import ScipyLBFGSB
from icnn_pl.engine.schedules import Linear
from icnn_pl.engine.transforms import RandomTransforms
from icnn_pl.errors import ConfigError

OPTIMIZERS = ("adam", "lbfgs")


def reconstruct_image(
    features: Mapping[str, Any], net: torch.nn.Module, *,
    layer_weight: Any = None, channel: Mapping | None = None, mask: Mapping | None = None,
    initial_image: Any = "normal", loss_type: str = "l2", iter_n: int = 200,
    optimizer: str = "adam", lr_start: float = 0.4, lr_end: float = 0.4,
    decay_power: float = 1.0, colour: str | Sequence[Sequence[float]] = "imagenet",
    squash: str = "sigmoid", transforms: RandomTransforms | None = None,
    layer_mapping: Mapping[str, str] | None = None, img_mean: Any = None,
    input_size: tuple[int, int] | None = None, seed: int = 0,
    logger: Any = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the image (H, W, 3) RGB float32 0-255 (inside [0, 255] by construction) and
    the loss before each update (Adam) or of every function evaluation (L-BFGS).

    ``initial_image``: "normal" (lucid's random spectrum, almost grey), "zeros" (grey),
    "uniform" / "mean" / an RGB array (carried into the spectrum by the inverse).
    ``optimizer``: "adam" (``icnn_fourier``, linear lr schedule) or "lbfgs"
    (``icnn_fourier_lbfgs``: scipy L-BFGS-B without bounds, maxiter ``iter_n``).
    ``decay_power``, ``colour``, ``squash``: see ``icnn_pl.engine.params.FourierImage``.
    ``transforms``: random jitter/scale/rotation before the encoder (Adam only).
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r} is not known", f"use one of {OPTIMIZERS}")
    if optimizer == "adam":
        update = {"optimizer": partial(torch.optim.Adam, lr=lr_start),
                  "schedules": {"lr": Linear(lr_start, lr_end)}}
    else:
        update = {"optimizer": partial(ScipyLBFGSB, maxiter=iter_n)}
    res = reconstruct(
        features, net, layer_mapping=layer_mapping, img_mean=img_mean, input_size=input_size,
        logger=logger, n_iter=iter_n, init=initial_image,
        fourier={"decay": decay_power, "colour": colour, "squash": squash},
        transforms=transforms, weights=layer_weight_mode(layer_weight), loss_type=loss_type,
        masks=mask, channels=channel, seed=seed, **update,
    )
    return res.images[0], res.loss_history[0]
