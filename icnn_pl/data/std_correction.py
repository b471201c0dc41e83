"""Decoded-feature scaling: rescale decoded features to the std of true features.

Every Caffe-era "decoded" script uses ``f / std(f) * std_ref`` (``paper``); the PyTorch
demo centres on the training mean first (``centered``). The mode is an explicit option.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from icnn_pl.errors import ConfigError, DataError


def feature_std(f: np.ndarray, ddof: int = 0) -> float:
    """The lab's feature std: per-channel std averaged over channels for conv (C, H, W)
    features, the std over all units for fc features."""
    f = np.asarray(f, dtype=np.float64)
    if f.ndim == 3 and f.shape[1] * f.shape[2] > 1:
        return float(f.reshape(f.shape[0], -1).std(axis=1, ddof=ddof).mean())
    return float(f.std(ddof=ddof))


STD_MODES = ("none", "paper", "centered")


def check_std_correction(mode: str, has_ref_std: bool, has_train_mean: bool) -> None:
    """The one check of a std-correction setting: a known mode with what it needs (the
    config checks call it before any work, ``std_correct`` on every use)."""
    if mode not in STD_MODES:
        raise ConfigError(f"data.std_correction={mode!r} is not valid",
                          f"use one of {STD_MODES}")
    if mode == "centered" and not has_train_mean:
        raise ConfigError(
            "data.std_correction=centered needs the training mean of each layer",
            "set data.train_mean=<.mat file> or use data.std_correction=paper",
        )
    if mode != "none" and not has_ref_std:
        raise ConfigError(
            f"data.std_correction={mode} needs reference feature stds",
            "set data.std_ref=<estimated_vgg19_cnn_feat_std.mat> (one std per layer) or"
            " data.std_correction=none",
        )


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
    check_std_correction(mode, ref_std is not None, train_mean is not None)
    if mode == "none":
        return {k: np.asarray(v, dtype=np.float32) for k, v in features.items()}
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
