"""icnn_gd: reconstruct the pixels by gradient descent with momentum (Caffe iCNN defaults).

    img, loss_list = reconstruct_image(features, net, iter_n=200, ...)
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
import torch

from icnn_pl.engine.functional import layer_weight_mode, reconstruct
from icnn_pl.engine.icnn_steps import Clipping, GDSteps, Regularizer
from icnn_pl.engine.schedules import Linear


def reconstruct_image(
    features: Mapping[str, Any], net: torch.nn.Module, *,
    layer_weight: Any = None, channel: Mapping | None = None, mask: Mapping | None = None,
    initial_image: Any = "uniform", loss_type: str = "l2", iter_n: int = 200,
    lr_start: float = 2.0, lr_end: float = 1e-10,
    momentum_start: float = 0.9, momentum_end: float = 0.9,
    decay_start: float = 0.2, decay_end: float = 1e-10, grad_normalize: bool = True,
    image_jitter: bool = False, jitter_size: int = 32,
    image_blur: bool = True, sigma_start: float = 2.0, sigma_end: float = 0.5,
    use_p_norm_reg: bool = False, p: float = 3, lamda_start: float = 0.5, lamda_end: float = 0.5,
    use_TV_norm_reg: bool = False, TVbeta: float = 2,
    TVlamda_start: float = 0.5, TVlamda_end: float = 0.5,
    clip_extreme: bool = False, clip_extreme_every: int = 4,
    e_pct_start: float = 1, e_pct_end: float = 1,
    clip_small_norm: bool = False, clip_small_norm_every: int = 4,
    n_pct_start: float = 5.0, n_pct_end: float = 5.0,
    clip_small_contribution: bool = False, clip_small_contribution_every: int = 4,
    c_pct_start: float = 5.0, c_pct_end: float = 5.0,
    layer_mapping: Mapping[str, str] | None = None, img_mean: Any = None,
    input_size: tuple[int, int] | None = None, seed: int = 0,
    logger: Any = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the image (H, W, 3) RGB float32 on the 0-255 scale (not clipped) and the
    loss before each update (iter_n,). ``initial_image``: "uniform" (random integers
    0..255), "mean" (mean colour, the paper scripts) or an RGB array."""
    regs = []
    if use_p_norm_reg:
        regs.append(Regularizer("p_norm", p, Linear(lamda_start, lamda_end)))
    if use_TV_norm_reg:
        regs.append(Regularizer("tv", TVbeta, Linear(TVlamda_start, TVlamda_end)))
    steps = GDSteps(
        normalize_grad=grad_normalize,
        decay=Linear(decay_start, decay_end),
        blur_sigma=Linear(sigma_start, sigma_end) if image_blur else None,
        jitter=jitter_size if image_jitter else 0,
        regularizers=regs,
        clip_extreme=Clipping(clip_extreme_every, Linear(e_pct_start, e_pct_end))
        if clip_extreme else None,
        clip_small_norm=Clipping(clip_small_norm_every, Linear(n_pct_start, n_pct_end))
        if clip_small_norm else None,
        clip_small_contribution=Clipping(
            clip_small_contribution_every, Linear(c_pct_start, c_pct_end))
        if clip_small_contribution else None,
    )
    res = reconstruct(
        features, net, layer_mapping=layer_mapping, img_mean=img_mean, input_size=input_size,
        logger=logger,
        optimizer=partial(torch.optim.SGD, lr=lr_start, momentum=momentum_start),
        n_iter=iter_n,
        schedules={"lr": Linear(lr_start, lr_end),
                   "momentum": Linear(momentum_start, momentum_end)},
        steps=steps, init=initial_image, weights=layer_weight_mode(layer_weight),
        loss_type=loss_type, masks=mask, channels=channel, seed=seed,
    )
    return res.images[0], res.loss_history[0]
