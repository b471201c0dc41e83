"""icnn_dgn_lbfgs: optimise the input code of a deep generator network with L-BFGS-B
inside the code bounds (lower, upper).

    img, loss_list = reconstruct_image(features, net, net_gen, maxiter=500, ...)
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
    features: Mapping[str, Any], net: torch.nn.Module, net_gen: torch.nn.Module, *,
    layer_weight: Any = None, channel: Mapping | None = None, mask: Mapping | None = None,
    initial_gen_feat: Any = "normal", feat_lower_bound: Any = 0.0,
    feat_upper_bound: Any = 100.0, loss_type: str = "l2", maxiter: int = 500, m: int = 10,
    ftol: float = 2.220446049250313e-09, gtol: float = 1e-05, maxls: int = 20,
    loss_scale: str = "grad",
    layer_mapping: Mapping[str, str] | None = None, img_mean: Any = None,
    input_size: tuple[int, int] | None = None, seed: int = 0,
    return_gen_feat: bool = False, logger: Any = False,
) -> tuple[np.ndarray, ...]:
    """Returns the image of the final code (H, W, 3) RGB float32 0-255, the loss of every
    function evaluation, and with ``return_gen_feat`` the final code. The initial code is
    projected into the bounds (scipy does the same; N(0, 1) is infeasible at lower 0)."""
    res = reconstruct(
        features, net, layer_mapping=layer_mapping, img_mean=img_mean, input_size=input_size,
        logger=logger,
        generator=net_gen,
        optimizer=partial(ScipyLBFGSB, maxiter=maxiter, m=m, ftol=ftol, gtol=gtol,
                          maxls=maxls, loss_scale=loss_scale),
        n_iter=maxiter, init=initial_gen_feat,
        code_bounds=(feat_lower_bound, feat_upper_bound),
        weights=layer_weight_mode(layer_weight), loss_type=loss_type, masks=mask,
        channels=channel, seed=seed,
    )
    out = (res.images[0], res.loss_history[0])
    return (*out, res.codes[0]) if return_gen_feat else out
