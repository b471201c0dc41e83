"""Evaluation metrics: hand-computed values on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from icnn_pl.errors import ConfigError, DataError
from icnn_pl.review.metrics import (
    correlation_matrix,
    display_image,
    euclidean_distance_matrix,
    feature_identification,
    identification_accuracy,
    mean_ci95,
    pairwise_identification,
    pixel_correlation,
    rmse,
    score_images,
    ssim,
)


def _img(values) -> np.ndarray:
    """Six values as a 1 x 2 x 3 image (pixel-major, channel-minor)."""
    return np.asarray(values, dtype=np.float64).reshape(1, 2, 3)


def _rand_images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=(n, size, size, 3))


# --------------------------------------------------------------------------- pixel correlation


def test_pixel_correlation_perfect_and_negated():
    img = _rand_images(1)[0]
    assert pixel_correlation(img, img) == pytest.approx(1.0)
    assert pixel_correlation(-img, img) == pytest.approx(-1.0)
    # invariant to affine intensity changes, e.g. a display rescale
    assert pixel_correlation(2.0 * img + 7.0, img) == pytest.approx(1.0)


def test_pixel_correlation_by_hand():
    x = _img([0, 1, 2, 0, 1, 2])  # mean 1, deviations -1 0 1 -1 0 1, sum sq 4
    # orthogonal deviations (-1 0 1 1 0 -1): r = 0
    assert pixel_correlation(x, _img([0, 1, 2, 2, 1, 0])) == pytest.approx(0.0, abs=1e-12)
    # y = 0 2 4 0 1 2: mean 1.5, dev -1.5 .5 2.5 -1.5 -.5 .5; sum dx*dy = 6, sum dy^2 = 11.5
    expected = 6.0 / math.sqrt(4.0 * 11.5)
    assert pixel_correlation(x, _img([0, 2, 4, 0, 1, 2])) == pytest.approx(expected)
    assert pixel_correlation(x, _img([0, 2, 4, 0, 1, 2])) == pytest.approx(
        np.corrcoef([0, 1, 2, 0, 1, 2], [0, 2, 4, 0, 1, 2])[0, 1]
    )


def test_pixel_correlation_constant_is_nan():
    x = _img([0, 1, 2, 0, 1, 2])
    assert math.isnan(pixel_correlation(np.full_like(x, 0.1), x))
    assert math.isnan(pixel_correlation(x, np.zeros_like(x)))


def test_pixel_correlation_accepts_uint8():
    img = _rand_images(1)[0]
    u8 = img.astype(np.uint8)
    assert pixel_correlation(u8, u8) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("recon", "true"),
    [
        (np.zeros((4, 4, 3)), np.zeros((4, 5, 3))),  # shape mismatch
        (np.zeros((4, 4)), np.zeros((4, 4))),  # not RGB
        (np.full((4, 4, 3), np.nan), np.zeros((4, 4, 3))),  # NaN
        (np.zeros((0, 4, 3)), np.zeros((0, 4, 3))),  # empty
    ],
)
def test_pixel_correlation_bad_input(recon, true):
    with pytest.raises(DataError) as err:
        pixel_correlation(recon, true)
    assert err.value.fix


# --------------------------------------------------------------------------- matrices


def test_correlation_matrix_matches_corrcoef():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 20)), rng.normal(size=(4, 20))
    expected = np.corrcoef(a, b)[:3, 3:]
    np.testing.assert_allclose(correlation_matrix(a, b), expected, atol=1e-12)
    assert correlation_matrix(a, b).shape == (3, 4)


def test_correlation_matrix_constant_row_nan():
    a = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    r = correlation_matrix(a, a)
    assert r[0, 0] == pytest.approx(1.0)
    assert np.isnan(r[1]).all() and np.isnan(r[:, 1]).all()


def test_euclidean_distance_matrix_by_hand():
    a = np.array([[0.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 0.0], [6.0, 8.0], [3.0, 0.0]])
    expected = np.array([[0.0, 10.0, 3.0], [5.0, 5.0, 4.0]])
    np.testing.assert_allclose(euclidean_distance_matrix(a, b), expected)


def test_matrices_reject_dimension_mismatch():
    with pytest.raises(DataError):
        correlation_matrix(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(DataError):
        euclidean_distance_matrix(np.ones(3), np.ones((2, 3)))


# --------------------------------------------------------------------------- identification

S3 = np.array(
    [
        [0.9, 0.1, 0.9],  # j=1 less similar (ok), j=2 tie (fails) -> 0.5
        [0.2, 0.5, 0.3],  # both less similar -> 1.0
        [0.8, 0.7, 0.1],  # both more similar -> 0.0
    ]
)


def test_pairwise_identification_similarity_with_tie():
    np.testing.assert_allclose(pairwise_identification(S3), [0.5, 1.0, 0.0])


def test_pairwise_identification_distance_direction():
    # as distances: a candidate is rejected when it is strictly farther than the match
    # row 0: 0.1 closer, 0.9 tie -> 0; row 1: both closer -> 0; row 2: both farther -> 1
    np.testing.assert_allclose(
        pairwise_identification(S3, higher_is_similar=False), [0.0, 0.0, 1.0]
    )


def test_pairwise_identification_nan_and_extra_candidates():
    s = S3.copy()
    s[0, 1] = np.nan  # left out: row 0 keeps only the tie -> 0.0
    s[2, 2] = np.nan  # no match score -> nan
    acc = pairwise_identification(s)
    assert acc[0] == 0.0 and acc[1] == 1.0 and np.isnan(acc[2])
    # 2 reconstructions, 3 candidates: row 0 beats both others, row 1 beats one of two
    rect = np.array([[0.9, 0.1, 0.2], [0.3, 0.5, 0.6]])
    np.testing.assert_allclose(pairwise_identification(rect), [1.0, 0.5])


@pytest.mark.parametrize("shape", [(1, 1), (3,), (3, 2)])
def test_pairwise_identification_bad_shapes(shape):
    with pytest.raises(DataError):
        pairwise_identification(np.zeros(shape))


def test_identification_perfect_reconstructions():
    imgs = _rand_images(4)
    for metric in ("correlation", "euclidean"):
        np.testing.assert_array_equal(identification_accuracy(imgs, imgs, metric=metric), 1.0)
    # list input works too, and a swapped pair is identified as wrong
    swapped = [imgs[1], imgs[0], imgs[2], imgs[3]]
    acc = identification_accuracy(swapped, list(imgs))
    assert acc[0] < 1.0 and acc[1] < 1.0 and acc[2] == 1.0


def test_identification_errors():
    imgs = _rand_images(3)
    with pytest.raises(DataError):
        identification_accuracy(imgs[:1], imgs[:1])  # n < 2
    with pytest.raises(DataError):
        identification_accuracy(imgs, imgs[:2])  # count mismatch
    with pytest.raises(DataError):
        identification_accuracy(imgs, _rand_images(3, size=6))  # size mismatch
    with pytest.raises(ConfigError):
        identification_accuracy(imgs, imgs, metric="cosine")


def test_feature_identification():
    rng = np.random.default_rng(2)
    true = rng.normal(size=(5, 50))
    np.testing.assert_array_equal(feature_identification(true, true), 1.0)
    noisy = true + rng.normal(scale=2.0, size=true.shape)
    np.testing.assert_allclose(
        feature_identification(noisy, true),
        pairwise_identification(correlation_matrix(noisy, true)),
    )
    with pytest.raises(DataError):
        feature_identification(true[:1], true[:1])
    with pytest.raises(DataError):
        feature_identification(true[:3], true)


# --------------------------------------------------------------------------- image scores


def test_rmse_known_offset():
    true = _rand_images(1)[0]
    assert rmse(true + 3.0, true) == pytest.approx(3.0)
    assert rmse(true, true) == 0.0
    # uint8 inputs are cast before subtracting (no wrap-around)
    a = np.full((2, 2, 3), 10, np.uint8)
    b = np.full((2, 2, 3), 250, np.uint8)
    assert rmse(a, b) == pytest.approx(240.0)


def test_ssim_identical_and_different():
    img = _rand_images(1, size=16)[0]
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img.astype(np.uint8), img.astype(np.uint8)) == pytest.approx(1.0)
    assert ssim(_rand_images(1, size=16, seed=5)[0], img) < 0.5
    with pytest.raises(DataError):
        ssim(np.zeros((5, 5, 3)), np.zeros((5, 5, 3)))


def test_display_image_percentiles():
    x = np.arange(101, dtype=np.float64)  # percentiles 2 and 98 are exactly 2 and 98
    out = display_image(x)
    assert out.dtype == np.uint8
    expected = (np.clip(x, 2, 98) - 2) * 255.0 / 96.0
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    assert out[0] == 0 and out[2] == 0 and out[3] == 2  # (3-2)*255/96 = 2.66 -> 2
    assert out[50] == 127  # 48*255/96 = 127.5, truncated like np.uint8
    assert out[98] == 255 and out[100] == 255


def test_display_image_rgb_and_constant():
    img = _rand_images(1)[0] * 3 - 100
    out = display_image(img)
    assert out.shape == img.shape and out.min() == 0 and out.max() == 255
    const = display_image(np.full((4, 4, 3), 42.0))
    assert const.dtype == np.uint8 and not const.any()


def test_mean_ci95_formula():
    vals = [1.0, 2.0, np.nan, 3.0, 4.0]  # NaN ignored
    mean, lo, hi = mean_ci95(vals)
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in (1, 2, 3, 4)) / 3)  # ddof=1
    half = 3.182446305284263 * sd / math.sqrt(4)  # t_{0.975, 3}
    assert mean == pytest.approx(2.5)
    assert lo == pytest.approx(2.5 - half) and hi == pytest.approx(2.5 + half)


def test_mean_ci95_edge_cases():
    assert mean_ci95([5.0]) == (5.0, 5.0, 5.0)
    assert all(math.isnan(v) for v in mean_ci95([np.nan, np.nan]))
    with pytest.raises(DataError):
        mean_ci95([])


def test_score_images_rows():
    imgs = _rand_images(3)
    labels = ["a", "b", "c"]
    trues = {k: v for k, v in zip(labels, imgs, strict=True)}
    recons = {k: v * 0.5 + 20 for k, v in trues.items()}
    rows = score_images(recons, trues, on="raw")
    assert [r["label"] for r in rows] == labels
    keys = {"label", "pixel_corr", "ssim", "rmse", "ident_corr", "ident_euclid"}
    assert all(set(r) == keys for r in rows)
    for r, (k, v) in zip(rows, trues.items(), strict=True):
        assert r["pixel_corr"] == pytest.approx(1.0)
        assert r["rmse"] == pytest.approx(rmse(recons[k], v))
        assert r["ident_corr"] == 1.0
        assert isinstance(r["ssim"], float)
    # display mode stretches the reconstruction: rmse changes, correlation stays high
    disp = score_images(recons, trues)
    assert disp[0]["rmse"] == pytest.approx(rmse(display_image(recons["a"]), imgs[0]))
    assert disp[0]["pixel_corr"] > 0.9


def test_score_images_single_and_errors():
    img = _rand_images(1)[0]
    (row,) = score_images({"x": img}, {"x": img, "unused": img})
    assert math.isnan(row["ident_corr"]) and math.isnan(row["ident_euclid"])
    assert row["pixel_corr"] > 0.999  # display clip + uint8 truncation: nearly 1
    with pytest.raises(DataError):
        score_images({"x": img}, {"y": img})  # missing true image
    with pytest.raises(DataError):
        score_images({"x": img}, {"x": img[:4]})  # shape mismatch
    with pytest.raises(DataError):
        score_images({}, {})
    with pytest.raises(ConfigError):
        score_images({"x": img}, {"x": img}, on="png")
