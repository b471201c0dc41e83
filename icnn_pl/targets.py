"""Target features: validation against the encoder, batching, and decoded-feature scaling.

Targets are matched to layers by *name*, never by dict order, and are returned in the
order the network computes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from icnn_pl.errors import ConfigError, DataError
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


# -- decoded-feature std correction ------------------------------------------------------
def feature_std(f: np.ndarray, ddof: int = 0) -> float:
    """The lab's feature std: per-channel std averaged over channels for conv (C, H, W)
    features, the std over all units for fc features."""
    f = np.asarray(f, dtype=np.float64)
    if f.ndim == 3 and f.shape[1] * f.shape[2] > 1:
        return float(f.reshape(f.shape[0], -1).std(axis=1, ddof=ddof).mean())
    return float(f.std(ddof=ddof))


STD_MODES = ("none", "paper", "centered")


def std_correct(
    features: Mapping[str, np.ndarray], ref_std: Mapping[str, float] | None,
    mode: str = "paper", train_mean: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Rescale decoded features to the std of true features.

    * ``paper`` (every Caffe-era "decoded" script, the default):
      ``f / std(f) * std_ref`` with ddof 0, no centring.
    * ``centered`` (the PyTorch demo): ``(f - m) / std(f - m) * std_ref + m`` with ddof 1,
      ``m`` the training mean of the layer's features.
    * ``none``: features used as they are.
    """
    if mode not in STD_MODES:
        raise ConfigError(f"unknown std correction {mode!r}", f"use one of {STD_MODES}")
    if mode == "none":
        return {k: np.asarray(v, dtype=np.float32) for k, v in features.items()}
    if ref_std is None:
        raise ConfigError(
            f"std correction {mode!r} needs reference feature stds",
            "set data.std_ref=<file .mat with one std per layer> or data.std_correction=none",
        )
    if mode == "centered" and train_mean is None:
        raise ConfigError(
            "std correction 'centered' needs the training mean of each layer",
            "set data.train_mean=<.mat file> or use data.std_correction=paper",
        )
    out = {}
    for name, f in features.items():
        if name not in ref_std:
            raise DataError(f"no reference std for layer {name}", "use a std file with that layer")
        f = np.asarray(f, dtype=np.float64)
        if mode == "paper":
            s = feature_std(f, ddof=0)
            g = f / s * ref_std[name] if s > 0 else f
        else:
            m = np.asarray(train_mean[name], dtype=np.float64).reshape(f.shape)
            s = feature_std(f - m, ddof=1)
            g = (f - m) / s * ref_std[name] + m if s > 0 else f
        out[name] = g.astype(np.float32)
    return out
