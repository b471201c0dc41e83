"""Evaluation of reconstructed images (reference section 5).

Images are ``H x W x 3`` RGB arrays on the 0-255 scale (float or uint8). Everything here is
plain numpy / scipy / scikit-image so that it can run without torch.

Conventions, following the lab's code (bdpy ``pairwise_identification`` and the iCNN
``clip_extreme_value`` / ``normalise_img`` helpers):

* pixel pattern correlation is Pearson r over all ``H*W*3`` values;
* pairwise identification counts a candidate as correctly rejected only when it is
  *strictly* less similar than the matching true image (ties count as failures);
* the display image is the raw image clipped to its 2nd/98th percentiles and min-max scaled
  to 0..255, truncated to uint8 (``np.uint8`` semantics, as in the lab's ``normalise_img``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial.distance import cdist
from skimage.metrics import structural_similarity

from icnn_pl.errors import ConfigError, DataError
from icnn_pl.image import display_image

__all__ = [
    "SCORING_MODES",
    "check_scoring_mode",
    "correlation_matrix",
    "display_image",
    "euclidean_distance_matrix",
    "feature_identification",
    "identification_accuracy",
    "mean_ci95",
    "pairwise_identification",
    "pixel_correlation",
    "rmse",
    "score_images",
    "ssim",
]

_SSIM_MIN_SIDE = 7  # skimage's default window is 7x7
#: Scores are computed on the display image (as the lab scores) or on the raw values.
SCORING_MODES = ("display", "raw")


def check_scoring_mode(on: str) -> None:
    """``on`` names a scoring mode (the one check of it, for the library and the CLI)."""
    if on not in SCORING_MODES:
        raise ConfigError(f"unknown scoring mode on={on!r}", "use on='display' or on='raw'")


# --------------------------------------------------------------------------- validation


def _as_float(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{name} cannot be converted to a numeric array ({exc})",
            f"pass {name} as a numeric numpy array",
        ) from exc
    if arr.size == 0:
        raise DataError(f"{name} is empty (shape {arr.shape})", f"pass a non-empty {name}")
    if not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise DataError(
            f"{name} contains {n_bad} NaN/inf value(s)",
            f"check how {name} was produced (diverged optimisation? missing features?)",
        )
    return arr


def _image(x: Any, name: str) -> np.ndarray:
    arr = _as_float(x, name)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataError(
            f"{name} has shape {arr.shape}, expected an H x W x 3 RGB image",
            "pass images as HxWx3 (channels last, RGB); transpose CHW arrays with "
            "img.transpose(1, 2, 0)",
        )
    return arr


def _image_pair(recon: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    r = _image(recon, "recon")
    t = _image(true, "true")
    if r.shape != t.shape:
        raise DataError(
            f"reconstruction shape {r.shape} does not match true image shape {t.shape}",
            "resize the true image to the reconstruction size before scoring",
        )
    return r, t


def _matrix_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    A = _as_float(a, "a")
    B = _as_float(b, "b")
    if A.ndim != 2 or B.ndim != 2:
        raise DataError(
            f"expected 2-D (n, d) arrays, got shapes {A.shape} and {B.shape}",
            "flatten each sample to one row: x.reshape(len(x), -1)",
        )
    if A.shape[1] != B.shape[1]:
        raise DataError(
            f"feature dimensions differ: {A.shape[1]} vs {B.shape[1]}",
            "compare features of the same layer / images of the same size",
        )
    return A, B


def _image_stack(x: Any, name: str) -> np.ndarray:
    if isinstance(x, list | tuple):
        shapes = {np.shape(i) for i in x}
        if len(shapes) > 1:
            raise DataError(
                f"{name} holds images of different shapes {sorted(shapes)}",
                "resize all images to one size before identification",
            )
        x = np.stack([np.asarray(i) for i in x]) if x else np.empty((0,))
    arr = _as_float(x, name)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(
            f"{name} has shape {arr.shape}, expected (n, H, W, 3)",
            "pass a list of HxWx3 images or an (n, H, W, 3) array",
        )
    return arr


# --------------------------------------------------------------------------- correlations


def pixel_correlation(recon: np.ndarray, true: np.ndarray) -> float:
    """Pearson r between the flattened reconstruction and true image (all H*W*3 values).

    Returns ``nan`` (no exception) when either image is constant, since r is undefined.
    Raises :class:`DataError` on shape mismatch, NaN/inf or empty input.
    """
    r, t = _image_pair(recon, true)
    return float(correlation_matrix(r.reshape(1, -1), t.reshape(1, -1))[0, 0])


def correlation_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlations between the rows of ``a`` (n, d) and of ``b`` (m, d) -> (n, m).

    Vectorised: each row is centred and scaled to unit norm, then one matrix product.
    Entries involving a constant row are ``nan``.
    """
    A, B = _matrix_pair(a, b)

    def _unit_rows(x: np.ndarray) -> np.ndarray:
        xc = x - x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(xc, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            # a row counts as constant when its spread is at rounding level of its values
            scale = np.abs(x).max(axis=1, keepdims=True)
            tiny = norm <= 1e-12 * scale * np.sqrt(x.shape[1])
            out = xc / np.where(tiny, 1.0, norm)
        out[tiny[:, 0]] = np.nan
        return out

    r = _unit_rows(A) @ _unit_rows(B).T
    return np.clip(r, -1.0, 1.0)


def euclidean_distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` (n, d) and of ``b`` (m, d) -> (n, m)."""
    A, B = _matrix_pair(a, b)
    return cdist(A, B, metric="euclidean")


# --------------------------------------------------------------------------- identification


def pairwise_identification(similarity: np.ndarray, higher_is_similar: bool = True) -> np.ndarray:
    """Per-reconstruction pairwise identification accuracy (chance 0.5).

    ``similarity`` is ``(n_recon, n_true)`` with the true image matching reconstruction
    ``i`` in column ``i`` (extra columns, ``n_true > n_recon``, are extra candidates).
    For row ``i`` the accuracy is the fraction of candidates ``j != i`` that are
    *strictly* less similar than the match: ``S[i, j] < S[i, i]`` (for distances,
    ``higher_is_similar=False``: ``S[i, j] > S[i, i]``). **Ties count as failures**
    (the lab's definition). NaN candidates are left out of the comparison (as bdpy's
    ``remove_nan_dist``); a NaN ``S[i, i]`` or a row without non-NaN candidates gives ``nan``.

    Raises :class:`DataError` when fewer than 2 candidates exist or shapes are wrong.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2:
        raise DataError(
            f"similarity matrix must be 2-D (n_recon, n_true), got shape {sim.shape}",
            "build it with correlation_matrix(recon_flat, true_flat)",
        )
    n, m = sim.shape
    if n < 1 or m < 2:
        raise DataError(
            f"pairwise identification needs at least 2 candidates, got shape {sim.shape}",
            "score at least 2 images (identification against itself is meaningless)",
        )
    if m < n:
        raise DataError(
            f"similarity has {n} rows but only {m} columns; column i must be the match of row i",
            "pass an (n_recon, n_true) matrix with n_true >= n_recon",
        )
    diag = sim[np.arange(n), np.arange(n)][:, None]
    better = sim < diag if higher_is_similar else sim > diag
    valid = ~np.isnan(sim)
    valid[np.arange(n), np.arange(n)] = False
    n_valid = valid.sum(axis=1)
    n_correct = (better & valid).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = n_correct / n_valid.astype(np.float64)
    acc[(n_valid == 0) | np.isnan(diag[:, 0])] = np.nan
    return acc


def identification_accuracy(
    recons: Sequence[np.ndarray] | np.ndarray,
    trues: Sequence[np.ndarray] | np.ndarray,
    metric: str = "correlation",
) -> np.ndarray:
    """Pairwise identification of images by pixel ``"correlation"`` or ``"euclidean"`` distance.

    ``recons`` and ``trues`` are lists of HxWx3 images or ``(n, H, W, 3)`` arrays in matching
    order. Returns per-image accuracies in [0, 1]; ties count as failures.
    """
    if metric not in ("correlation", "euclidean"):
        raise ConfigError(
            f"unknown identification metric {metric!r}",
            "use metric='correlation' or metric='euclidean'",
        )
    R = _image_stack(recons, "recons")
    T = _image_stack(trues, "trues")
    if R.shape[1:] != T.shape[1:]:
        raise DataError(
            f"reconstruction size {R.shape[1:]} does not match true image size {T.shape[1:]}",
            "resize the true images to the reconstruction size before scoring",
        )
    if len(R) != len(T):
        raise DataError(
            f"{len(R)} reconstructions but {len(T)} true images",
            "pass one true image per reconstruction, in the same order",
        )
    if len(R) < 2:
        raise DataError(
            f"pairwise identification needs at least 2 images, got {len(R)}",
            "score at least 2 images",
        )
    r, t = R.reshape(len(R), -1), T.reshape(len(T), -1)
    if metric == "correlation":
        return pairwise_identification(correlation_matrix(r, t), higher_is_similar=True)
    return pairwise_identification(euclidean_distance_matrix(r, t), higher_is_similar=False)


def feature_identification(recon_feats: np.ndarray, true_feats: np.ndarray) -> np.ndarray:
    """Pairwise identification by feature correlation; inputs are (n, d), rows matched."""
    R, T = _matrix_pair(recon_feats, true_feats)
    if len(R) != len(T):
        raise DataError(
            f"{len(R)} reconstructed feature rows but {len(T)} true feature rows",
            "pass one true feature row per reconstruction, in the same order",
        )
    return pairwise_identification(correlation_matrix(R, T), higher_is_similar=True)


# --------------------------------------------------------------------------- image scores


def rmse(recon: np.ndarray, true: np.ndarray) -> float:
    """Root-mean-square pixel error; both images are taken to be on the 0-255 scale."""
    r, t = _image_pair(recon, true)
    return float(np.sqrt(np.mean((r - t) ** 2)))


def ssim(recon: np.ndarray, true: np.ndarray) -> float:
    """Structural similarity (skimage, ``channel_axis=-1``, ``data_range=255``).

    Both images are cast to float64 and taken to be on the 0-255 scale. Images need
    height and width >= 7 (skimage's default window).
    """
    r, t = _image_pair(recon, true)
    if min(r.shape[:2]) < _SSIM_MIN_SIDE:
        raise DataError(
            f"SSIM needs images of at least {_SSIM_MIN_SIDE}x{_SSIM_MIN_SIDE} pixels, "
            f"got {r.shape[0]}x{r.shape[1]}",
            "score full-size reconstructions, not thumbnails",
        )
    return float(structural_similarity(r, t, channel_axis=-1, data_range=255.0))


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% confidence interval ``(mean, low, high)``, NaNs ignored.

    Uses the t-distribution: ``mean +/- t.ppf(0.975, n-1) * sd(ddof=1) / sqrt(n)``.
    One finite value gives ``(mean, mean, mean)``; only NaNs give ``(nan, nan, nan)``;
    an empty input raises :class:`DataError`.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise DataError("mean_ci95 got no values", "pass at least one value")
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (float("nan"),) * 3
    m = float(v.mean())
    if v.size == 1:
        return m, m, m
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - half, m + half


def _scored_pairs(recons: Mapping[str, np.ndarray], trues: Mapping[str, np.ndarray], on: str
                  ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Labels, reconstructions (as scored: display or raw) and true images, checked."""
    check_scoring_mode(on)
    labels = list(recons)
    if not labels:
        raise DataError("no reconstructions to score", "pass at least one reconstruction")
    missing = [lab for lab in labels if lab not in trues]
    if missing:
        raise DataError(
            f"no true image for label(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}",
            "load the true images for every reconstructed label (check label spelling)",
        )
    R, T = [], []
    for lab in labels:
        try:
            r, t = _image_pair(recons[lab], trues[lab])
        except DataError as exc:
            raise DataError(f"image {lab!r}: {exc.problem}", exc.fix) from exc
        if on == "display":
            r = display_image(r).astype(np.float64)
        R.append(r)
        T.append(t)
    return labels, R, T


def score_images(
    recons: Mapping[str, np.ndarray],
    trues: Mapping[str, np.ndarray],
    on: str = "display",
) -> list[dict[str, Any]]:
    """Score reconstructions against true images, one row per label of ``recons``.

    Each row has ``label, pixel_corr, ssim, rmse, ident_corr, ident_euclid``. The
    identification columns are pairwise identification among the given set (by pixel
    correlation and by Euclidean distance); with a single image they are ``nan``.
    With ``on="display"`` reconstructions are first converted with :func:`display_image`;
    true images are used as they are (already 0-255). ``on="raw"`` scores raw values.
    Labels only in ``trues`` are ignored; a label missing from ``trues`` is an error.
    """
    labels, R, T = _scored_pairs(recons, trues, on)
    shapes = {r.shape for r in R}
    if len(R) >= 2 and len(shapes) == 1:
        ident_c = identification_accuracy(R, T, metric="correlation")
        ident_e = identification_accuracy(R, T, metric="euclidean")
    elif len(R) >= 2:
        raise DataError(
            f"images have different sizes {sorted(shapes)}; identification needs one size",
            "resize all reconstructions and true images to one size",
        )
    else:
        ident_c = ident_e = np.full(len(R), np.nan)
    return [
        {
            "label": lab,
            "pixel_corr": pixel_correlation(r, t),
            "ssim": ssim(r, t),
            "rmse": rmse(r, t),
            "ident_corr": float(ic),
            "ident_euclid": float(ie),
        }
        for lab, r, t, ic, ie in zip(labels, R, T, ident_c, ident_e, strict=True)
    ]
