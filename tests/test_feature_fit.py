"""Feature-space fit: correlations with targets / true features and identification."""

import numpy as np
import pytest
from engine_helpers import rgb_image, tiny_encoder, tiny_targets

from icnn_pl.review.feature_fit import identification_by_features, image_feature_fit, summarize_fit


def test_perfect_reconstruction_fits_targets_and_true_features():
    true = rgb_image(3)
    targets = tiny_targets(rgb=true)
    rows, ident = image_feature_fit(tiny_encoder(), true, targets, true, ident_layer="fc")
    assert [r["layer"] for r in rows] == list(targets)
    for r in rows:
        assert r["corr_target"] == pytest.approx(1.0, abs=1e-5)
        assert r["corr_true"] == pytest.approx(1.0, abs=1e-5)
    assert summarize_fit(rows) == pytest.approx({"feat_corr_target": 1.0, "feat_corr_true": 1.0},
                                                abs=1e-5)
    assert ident["recon"].shape == ident["true"].shape


def test_unrelated_reconstruction_fits_worse_and_without_true_image():
    true, other = rgb_image(3), rgb_image(9)
    targets = tiny_targets(rgb=true)
    rows, ident = image_feature_fit(tiny_encoder(), other, targets)
    assert "corr_true" not in rows[0] and ident == {}
    assert summarize_fit(rows)["feat_corr_target"] < 0.999
    assert "feat_corr_true" not in summarize_fit(rows)


def test_identification_by_features():
    enc = tiny_encoder()
    images = {f"im{i}": rgb_image(i) for i in range(4)}
    ident = {}
    for lab, img in images.items():
        _, ident[lab] = image_feature_fit(enc, img, tiny_targets(rgb=img), img, "fc")
    acc = identification_by_features(ident)
    assert acc == {lab: 1.0 for lab in images}  # each is its own best match
    # swap two reconstructions: those two are now misidentified against each other
    ident["im0"]["recon"], ident["im1"]["recon"] = ident["im1"]["recon"], ident["im0"]["recon"]
    acc = identification_by_features(ident)
    assert acc["im2"] == 1.0 and acc["im0"] < 1.0 and acc["im1"] < 1.0
    assert identification_by_features({"a": ident["im0"]}) == {}
    assert np.isfinite(list(acc.values())).all()
