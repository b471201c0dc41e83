"""Target features: validation against the encoder, and batching.

Targets are matched to layers by *name*, never by dict order, and are returned in the
order the network computes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from icnn_pl.errors import DataError
from icnn_pl.nets.encoder import FeatureEncoder

ArrayLike = np.ndarray | torch.Tensor
FeatureSet = Mapping[str, ArrayLike]


def expected_shapes(encoder: FeatureEncoder, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of each named layer, in the network's forward order.
    Unknown names fail here, before any work starts."""
    return encoder.feature_shapes(encoder.forward_order(names))


def stack_targets(
    feature_sets: Sequence[FeatureSet], shapes: Mapping[str, tuple[int, ...]],
    labels: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Validate B feature sets (name -> array, with or without a leading axis of 1) against
    the layers' ``shapes`` and stack them into name -> (B, ...) float32 tensors, in the
    order of ``shapes`` (matched by name, whatever the dict order)."""
    if not feature_sets:
        raise DataError("no target features given", "pass a dict of layer name -> features")
    labels = list(labels) if labels is not None else [str(i) for i in range(len(feature_sets))]
    for label, fs in zip(labels, feature_sets, strict=True):
        if set(fs) != set(shapes):
            raise DataError(
                f"image {label}: target layers {sorted(fs)} differ from {sorted(shapes)}",
                "give features for exactly the target layers",
            )
    return {
        name: torch.stack([_as_feature(fs[name], name, shape, lab)
                           for lab, fs in zip(labels, feature_sets, strict=True)])
        for name, shape in shapes.items()
    }


def _as_feature(value: ArrayLike, name: str, shape: tuple[int, ...], label: str) -> torch.Tensor:
    t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(
        np.asarray(value, dtype=np.float32))
    t = t.float()
    if tuple(t.shape) != shape and t.dim() == len(shape) + 1 and t.shape[0] == 1:
        t = t[0]
    if tuple(t.shape) != shape:
        raise DataError(
            f"image {label}, layer {name}: target shape {tuple(np.shape(value))} does not match the"
            f" layer's output {shape}",
            "use features computed with the same network and input size (or check the layer"
            " name / network.input_size)",
        )
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise DataError(
            f"image {label}, layer {name}: {bad} NaN or inf values in the target features",
            "fix or re-export the feature file (decoders sometimes write NaN for empty voxels)",
        )
    return t.contiguous()
