"""Galleries and loss-curve plots (Pillow only)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from icnn_pl.errors import DataError
from icnn_pl.review.gallery import (
    MISSING,
    gallery_size,
    loss_curves_image,
    make_gallery,
    save_png,
)


def _n_colours(img: Image.Image) -> int:
    arr = np.asarray(img.convert("RGB")).reshape(-1, 3)
    return len(np.unique(arr, axis=0))


def _grid():
    rng = np.random.default_rng(0)
    trues = [rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8) for _ in range(3)]
    recons = [rng.normal(100, 40, size=(24, 24, 3)) for _ in range(2)] + [None]
    rows = [("true", trues), ("icnn_gd sub-01 with a long title", recons)]
    labels = ["n01443537_22563", "n01621127_19020", "n04572121_3262"]
    captions = [["", "", ""], ["r=0.42", "r=0.17", None]]
    return rows, labels, captions


def test_gallery_size_formula():
    # TITLE_W 132 + 3 * (cell 32 + PAD 4) + PAD 4; HEADER_H 18 + 2 * (32 + CAPTION_H 14 + 4) + 4
    assert gallery_size(2, 3, cell=32) == (244, 122)


def test_make_gallery_size_and_content():
    rows, labels, captions = _grid()
    img = make_gallery(rows, labels, captions, cell=32)
    assert img.mode == "RGB"
    assert img.size == gallery_size(2, 3, cell=32) == (244, 122)
    assert _n_colours(img) > 50  # photos + text, not a blank canvas
    arr = np.asarray(img)
    assert (arr == MISSING).all(axis=-1).sum() > 32 * 32 // 2  # the None cell is grey
    assert (arr[0, 0] == 255).all()  # white background


def test_make_gallery_defaults_and_non_finite():
    rng = np.random.default_rng(1)
    bad = rng.normal(size=(8, 8, 3))
    bad[0, 0, 0] = np.nan
    grey = rng.uniform(0, 255, size=(8, 8))  # HxW grey image is accepted
    img = make_gallery([("run", [bad, grey])], ["a", "b"])
    assert img.size == gallery_size(1, 2)


def test_make_gallery_errors():
    rows, labels, captions = _grid()
    with pytest.raises(DataError):
        make_gallery(rows, labels[:2])  # row length != labels
    with pytest.raises(DataError):
        make_gallery(rows, labels, captions[:1])  # captions shape
    with pytest.raises(DataError):
        make_gallery([], labels)
    with pytest.raises(DataError):
        make_gallery([("x", [np.zeros((3, 8, 8))] * 3)], labels)  # CHW, not HWC


def test_save_png_atomic(tmp_path):
    rows, labels, captions = _grid()
    img = make_gallery(rows, labels, captions, cell=32)
    out = tmp_path / "sub" / "gallery.png"
    save_png(img, out)
    with Image.open(out) as back:
        assert back.format == "PNG"
        assert back.size == img.size
        np.testing.assert_array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
    assert [p.name for p in out.parent.iterdir()] == ["gallery.png"]  # no temp file left


def test_loss_curves_image():
    it = np.arange(200)
    curves = {
        "icnn_gd": 1e6 * np.exp(-it / 50) + 10,
        "icnn_lbfgs": 5e5 * np.exp(-it / 20) + 1,
        "short": np.array([1e3, np.nan, 5e2, 4e2]),
    }
    img = loss_curves_image(curves)
    assert img.size == (640, 400)
    assert _n_colours(img) >= 5  # background, text, 3 line colours
    # linear axis (non-positive values), many curves -> "+N more" legend, tiny curves
    many = {f"c{i}": np.linspace(-1, 1, 10) * i for i in range(15)}
    many["one"] = np.array([3.0])
    many["empty"] = np.array([np.nan, np.nan])
    img2 = loss_curves_image(many, size=(300, 200))
    assert img2.size == (300, 200) and _n_colours(img2) > 5
    with pytest.raises(DataError):
        loss_curves_image({})
    with pytest.raises(DataError):
        loss_curves_image({"x": np.ones((2, 2))})
