"""The feature-matching objective: ``loss = sum_l w_l * loss_l(f_l(x), t_l, m_l)``.

Everything is batched: targets are (B, ...) per layer, layer weights (B,), and the
objective returns one loss per image so B images can be reconstructed at once without
coupling (their gradients never mix).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from icnn_pl.errors import ConfigError, DataError

Tensor = torch.Tensor


# -- per-layer losses: (features, target, mask) -> loss per image (B,) ------------------
def _flat(x: Tensor) -> Tensor:
    return x.flatten(1)


def l2_loss(f: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
    """Sum of squares, not a mean (as the reference)."""
    d = f - t if mask is None else (f - t) * mask
    return _flat(d * d).sum(1)


def l1_loss(f: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
    d = f - t if mask is None else (f - t) * mask
    return _flat(d.abs()).sum(1)


def inner_loss(f: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
    p = f * t if mask is None else f * t * mask
    return -_flat(p).sum(1)


def gram_loss(f: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
    """``||G - G0||^2 / (4 N^2 M^2)`` with G = F F^T, F the (N channels x M positions) matrix."""
    if f.dim() != 4:
        raise ConfigError("the gram loss needs conv features (C, H, W)", "use l2 for fc layers")
    if mask is not None:
        f, t = f * mask, t * mask
    n, m = f.shape[1], f.shape[2] * f.shape[3]
    F, F0 = f.flatten(2), t.flatten(2)
    d = F @ F.transpose(1, 2) - F0 @ F0.transpose(1, 2)
    return _flat(d * d).sum(1) / (4.0 * n * n * m * m)


LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "l2": l2_loss, "l1": l1_loss, "inner": inner_loss, "gram": gram_loss,
}


LAYER_WEIGHTINGS = ("inverse_norm", "uniform")


def check_loss_type(loss_type: str | Mapping[str, str], key: str = "loss_type") -> None:
    """A loss name of ``LOSSES``, or a dict layer -> loss name."""
    kinds = list(loss_type.values()) if isinstance(loss_type, Mapping) else [loss_type]
    if any(k not in LOSSES for k in kinds):
        raise ConfigError(f"{key}={loss_type!r} is not a loss type",
                          f"use one of {sorted(LOSSES)} (or a dict layer -> loss type)")


def check_layer_weighting(mode: str | Mapping[str, float], key: str = "layer_weight") -> None:
    """``inverse_norm``, ``uniform`` or a dict layer -> weight."""
    if not (isinstance(mode, Mapping) or mode in LAYER_WEIGHTINGS):
        raise ConfigError(f"{key}={mode!r} is not a layer weighting",
                          "use inverse_norm, uniform or a dict layer -> weight"
                          " (pipeline: layer_weights=inverse_norm or layer_weights=uniform)")


# -- masks --------------------------------------------------------------------------------
def make_mask(
    layer: str, shape: Sequence[int], mask: np.ndarray | Tensor | None = None,
    channels: Sequence[int] | None = None,
) -> Tensor | None:
    """A feature mask of ``shape`` (per image), or None for "use every unit".

    Accepts a full mask (C, H, W) or (N,); a 2-D (H, W) mask, tiled over channels and
    centre-aligned when its size differs; or ``channels``, a list of channel indices.
    Any other shape is an error (Caffe iCNN silently zeroed the layer instead).
    """
    shape = tuple(int(s) for s in shape)
    if mask is not None and channels is not None:
        raise ConfigError(f"layer {layer}: both a mask and channels given", "give one of them")
    if channels is not None:
        idx = [int(c) for c in np.asarray(channels).ravel()]
        if not idx or min(idx) < 0 or max(idx) >= shape[0]:
            raise ConfigError(
                f"layer {layer}: channel indices {idx[:5]}... outside 0..{shape[0] - 1}",
                "give channel indices of that layer",
            )
        out = torch.zeros(shape)
        out[idx] = 1.0
        return out
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if tuple(m.shape) == shape:
        return m.clone()
    if m.dim() == 2 and len(shape) == 3:
        return _tile_2d(m, shape)
    raise ConfigError(
        f"layer {layer}: mask of shape {tuple(m.shape)} does not fit features of shape {shape}",
        f"give a mask of shape {shape}, a 2-D (H, W) spatial mask, or channel indices",
    )


def _tile_2d(m: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Centre-align a 2-D mask on the (H, W) grid (ones outside it) and tile over channels."""
    c, h, w = shape
    out = torch.ones(h, w)
    nh, nw = min(h, m.shape[0]), min(w, m.shape[1])
    sh, sw = round((m.shape[0] - nh) / 2), round((m.shape[1] - nw) / 2)
    dh, dw = round((h - nh) / 2), round((w - nw) / 2)
    out[dh:dh + nh, dw:dw + nw] = m[sh:sh + nh, sw:sw + nw]
    return out.expand(c, h, w).clone()


# -- layer weights ------------------------------------------------------------------------
def layer_weights(
    targets: Mapping[str, Tensor], mode: str | Mapping[str, float] = "inverse_norm",
    labels: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Per-image layer weights (B,) for each layer.

    ``inverse_norm`` (every reference demo and paper script): ``(1/||t_l||^2) / sum_k
    (1/||t_k||^2)``, per image; ``uniform``: 1/L (the library default); a mapping gives
    explicit weights.
    """
    check_layer_weighting(mode)
    names = list(targets)
    batch = next(iter(targets.values())).shape[0]
    if isinstance(mode, Mapping):
        unknown = sorted(set(mode) - set(names))
        missing = [n for n in names if n not in mode]
        if unknown or missing:
            raise ConfigError(
                f"explicit layer weights do not match the target layers (missing {missing},"
                f" unknown {unknown})", "give one weight per target layer",
            )
        # Scalars, or per-image weights (B,) computed upstream (e.g. by the DataModule).
        return {n: torch.as_tensor(mode[n], dtype=torch.float32).expand(batch).clone()
                for n in names}
    if mode == "uniform":
        return {n: torch.full((batch,), 1.0 / len(names)) for n in names}
    sq = {n: targets[n].double().flatten(1).pow(2).sum(1) for n in names}
    for n, s in sq.items():
        zero = (s == 0).nonzero().flatten().tolist()
        if zero:
            who = [labels[i] for i in zero] if labels else zero
            raise DataError(
                f"target of layer {n} is all zeros for image(s) {who}: inverse-norm layer"
                " weights would divide by zero (the original's black-image bug)",
                "check the feature file, drop that layer, or use layer_weights=uniform",
            )
    inv = {n: 1.0 / s for n, s in sq.items()}
    total = sum(inv.values())
    return {n: (inv[n] / total).float() for n in names}


# -- the objective ------------------------------------------------------------------------
class Objective(nn.Module):
    """Weighted per-layer feature losses; targets, weights and masks live as buffers.

    Buffers move with the module, so on a GPU the targets are copied there once per
    reconstruction, not once per iteration.
    """

    def __init__(
        self,
        targets: Mapping[str, Tensor],
        weights: Mapping[str, Tensor],
        masks: Mapping[str, Tensor | None] | None = None,
        loss_type: str | Mapping[str, str] = "l2",
    ) -> None:
        super().__init__()
        self.layers = list(targets)
        masks = masks or {}
        check_loss_type(loss_type)
        self._loss_fns = []
        for i, name in enumerate(self.layers):
            kind = loss_type if isinstance(loss_type, str) else loss_type.get(name, "l2")
            self._loss_fns.append(LOSSES[kind])
            self.register_buffer(f"target_{i}", targets[name].float())
            self.register_buffer(f"weight_{i}", weights[name].float())
            mask = masks.get(name)
            self.register_buffer(f"mask_{i}", None if mask is None else mask.float())

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Loss per image (B,) for ``features`` (name -> (B, ...))."""
        total = None
        for i, name in enumerate(self.layers):
            term = self._loss_fns[i](
                features[name], getattr(self, f"target_{i}"), getattr(self, f"mask_{i}")
            ) * getattr(self, f"weight_{i}")
            total = term if total is None else total + term
        return total
