"""A reconstruction whose loss never fell returned (nearly) its initial image: detect it
and say so, in the pipeline (log, summary) and in the functional API (``warnings``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


class LossDidNotFallWarning(UserWarning):
    """The optimiser stopped without lowering the loss: the result is the initial image."""


def loss_fell(history: np.ndarray) -> bool:
    """Whether any evaluation after the first had a lower loss: False is a reconstruction
    that returned (nearly) its initial image, e.g. L-BFGS stopped after one evaluation."""
    h = np.ravel(history)
    return bool(h.size > 1 and np.nanmin(h[1:]) < h[0])


def warn_if_flat(histories: Sequence[np.ndarray] | np.ndarray, stop_reason: str,
                 stacklevel: int = 3) -> None:
    """One ``LossDidNotFallWarning`` for a call whose loss did not fall (for any image of
    the batch), naming the stop reason and the way out."""
    flat = [i for i, h in enumerate(histories) if not loss_fell(h)]
    if not flat:
        return
    n_evals = len(np.ravel(histories[flat[0]]))
    which = "" if len(histories) == 1 else f" for image(s) {flat} of the batch"
    warnings.warn(
        f"the loss did not fall{which} ({n_evals} evaluation(s); optimiser stopped:"
        f" {stop_reason or '?'}): the result is the initial image; try another initial"
        " image/code or check the targets and the network (e.g. all-zero biases from a"
        " constant start give a zero gradient)",
        LossDidNotFallWarning, stacklevel=stacklevel)
