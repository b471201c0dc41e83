"""icnn_dgn_gd: optimise the input code of a deep generator network by gradient descent
with momentum (the paper's Fig 2 method).

    img, loss_list = reconstruct_image(features, net, net_gen, iter_n=200, ...)
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
import torch

from icnn_pl.engine.functional import layer_weight_mode, reconstruct
from icnn_pl.engine.icnn_steps import GDSteps
from icnn_pl.engine.schedules import Linear


def reconstruct_image(
    features: Mapping[str, Any], net: torch.nn.Module, net_gen: torch.nn.Module, *,
    layer_weight: Any = None, channel: Mapping | None = None, mask: Mapping | None = None,
    initial_gen_feat: Any = "normal", feat_lower_bound: Any = 0.0,
    feat_upper_bound: Any = 100.0, loss_type: str = "l2", iter_n: int = 200,
    lr_start: float = 2.0, lr_end: float = 1e-10,
    momentum_start: float = 0.9, momentum_end: float = 0.9,
    decay_start: float = 0.01, decay_end: float = 0.01,
    layer_mapping: Mapping[str, str] | None = None, img_mean: Any = None,
    input_size: tuple[int, int] | None = None, seed: int = 0,
    return_gen_feat: bool = False, logger: Any = False,
) -> tuple[np.ndarray, ...]:
    """Returns the image of the last forward pass (H, W, 3) RGB float32 0-255, the loss
    before each update, and with ``return_gen_feat`` the code that made that image.
    ``initial_gen_feat``: "normal" (library), "zeros" (paper script) or a vector;
    ``feat_upper_bound``: a scalar or the act_range vector (paper)."""
    res = reconstruct(
        features, net, layer_mapping=layer_mapping, img_mean=img_mean, input_size=input_size,
        logger=logger,
        generator=net_gen,
        optimizer=partial(torch.optim.SGD, lr=lr_start, momentum=momentum_start),
        n_iter=iter_n,
        schedules={"lr": Linear(lr_start, lr_end),
                   "momentum": Linear(momentum_start, momentum_end)},
        steps=GDSteps(normalize_grad=True, decay=Linear(decay_start, decay_end)),
        init=initial_gen_feat, code_bounds=(feat_lower_bound, feat_upper_bound),
        return_last_forward=True, weights=layer_weight_mode(layer_weight),
        loss_type=loss_type, masks=mask, channels=channel, seed=seed,
    )
    out = (res.images[0], res.loss_history[0])
    return (*out, res.codes[0]) if return_gen_feat else out
