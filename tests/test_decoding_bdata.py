"""The BData reader against files bdpy 0.26 writes, and our writer read back by bdpy."""

from __future__ import annotations

import numpy as np
import pytest

from icnn_pl.decoding.bdata import Trials, read_bdata, write_bdata
from icnn_pl.errors import ConfigError, DataError

bdpy_bdata = pytest.importorskip("bdpy.bdata")


def _bdpy_file(path, rng):
    """12 samples: 3 stimuli with 5 / 4 / 3 repeats; 10 voxels, ROI_V1 = 0-3, ROI_VC = 0-7."""
    labels = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 1], dtype=float)
    X = rng.standard_normal((12, 10))
    bd = bdpy_bdata.BData()
    bd.add(X, "VoxelData")
    bd.add(np.arange(12) // 6 + 1.0, "Run")
    bd.add(labels, "stimulus_name")
    n = bd.dataset.shape[1]
    for roi, stop in (("V1", 4), ("VC", 8), ("FFA", 0)):
        flag = np.full(n, np.nan)
        flag[:10] = 0
        flag[:stop] = 1
        bd.add_metadata(f"ROI_{roi}", flag, f"1 = ROI {roi}")
    bd.add_vmap("stimulus_name", {1.0: "n01443537_22563", 2.0: "n01621127_19020",
                                  3.0: "n04572121_3262"})
    bd.save(str(path))
    return X, labels


def test_reads_what_bdpy_writes(tmp_path):
    X, labels = _bdpy_file(tmp_path / "sub-01.h5", np.random.default_rng(0))
    t = read_bdata(tmp_path / "sub-01.h5", "VC")
    np.testing.assert_array_equal(t.X, X[:, :8])
    names = {1.0: "n01443537_22563", 2.0: "n01621127_19020", 3.0: "n04572121_3262"}
    assert t.labels == [names[v] for v in labels]
    assert read_bdata(tmp_path / "sub-01.h5", "V1").X.shape == (12, 4)
    # bdpy's own selection agrees
    bd = bdpy_bdata.BData(str(tmp_path / "sub-01.h5"))
    np.testing.assert_array_equal(bd.select("ROI_VC = 1"), t.X)
    assert bd.get_label("stimulus_name") == t.labels


def test_unequal_repeats_are_averaged_per_label():
    X = np.arange(12.0).reshape(6, 2)
    avg = Trials(X, ["b", "a", "b", "b", "a", "c"]).averaged()
    assert avg.labels == ["b", "a", "c"]
    np.testing.assert_allclose(avg.X, [X[[0, 2, 3]].mean(0), X[[1, 4]].mean(0), X[5]])


def test_bdpy_reads_what_we_write(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6, 5))
    roi = np.array([1, 1, 0, 1, 0, np.nan, np.nan])
    write_bdata(tmp_path / "ours.h5",
                [("VoxelData", X, ""), ("Run", np.array([1, 1, 1, 2, 2, 2.0]), ""),
                 ("stimulus_name", np.array([1, 2, 1, 2, 1, 2.0]), "")],
                flags=[("ROI_VC", roi, "1 = ROI VC")],
                vmaps={"stimulus_name": {1.0: "cat", 2.0: "dog"}})
    bd = bdpy_bdata.BData(str(tmp_path / "ours.h5"))
    np.testing.assert_array_equal(bd.select("ROI_VC = 1"), X[:, [0, 1, 3]])
    assert bd.get_label("stimulus_name") == ["cat", "dog"] * 3
    t = read_bdata(tmp_path / "ours.h5", "VC")
    np.testing.assert_array_equal(t.X, X[:, [0, 1, 3]])


def test_bad_roi_files(tmp_path):
    _bdpy_file(tmp_path / "s.h5", np.random.default_rng(2))
    with pytest.raises(DataError, match="ROI 'FFA' has no voxels"):
        read_bdata(tmp_path / "s.h5", "FFA")
    with pytest.raises(ConfigError, match=r"no ROI 'LOC'.*\n.*\['FFA', 'V1', 'VC'\]"):
        read_bdata(tmp_path / "s.h5", "LOC")
    with pytest.raises(DataError, match="not found"):
        read_bdata(tmp_path / "missing.h5", "VC")
