"""Feature readers: each test writes files in the exact on-disk format and reads them back."""

from __future__ import annotations

from pathlib import Path

import h5py
import hdf5storage
import numpy as np
import pytest
import scipy.io
from mat_writers import write_v5, write_v73

from icnn_pl.data.matio import load_mat, load_mat_dict, mat_shape, save_mat
from icnn_pl.data.readers import (
    CaffeDecodedFeatures,
    DecodedFeatures,
    TrueFeatures,
    load_act_range,
    load_reference_std,
    subject_id,
)
from icnn_pl.errors import ConfigError, DataError

ACT_RANGE = Path("/work/shared/reference/act_range_3x_fc7.txt")
LABELS = ["n01443537_22563", "n01621127_19020"]
LAYERS = ["conv1_1", "fc7"]


def conv_feat(seed: int = 0) -> np.ndarray:
    # every axis a different length, so any axis permutation changes the shape
    return np.random.default_rng(seed).standard_normal((1, 2, 3, 5)).astype(np.float32)


def fc_feat(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 7)).astype(np.float32)


def feat_for(layer: str, seed: int) -> np.ndarray:
    return conv_feat(seed) if layer.startswith("conv") else fc_feat(seed)


WRITERS = {"v5": write_v5, "v7.3": write_v73}


# --- matio ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("make", [conv_feat, fc_feat])
def test_load_mat_roundtrip_exact(tmp_path, fmt, make):
    arr = make(3)
    path = WRITERS[fmt](tmp_path / "x.mat", feat=arr)
    got = load_mat(path)
    assert got.shape == arr.shape
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, arr)
    assert mat_shape(path) == arr.shape  # from the headers, as a job checks before any work


def test_v73_axes_match_scipy_loadmat(tmp_path):
    # the same array written both ways must read back identically
    arr = np.arange(2 * 3 * 5, dtype=np.float64).reshape(2, 3, 5)
    a = load_mat(write_v5(tmp_path / "a.mat", feat=arr))
    b = load_mat(write_v73(tmp_path / "b.mat", feat=arr))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, arr.astype(np.float32))


def test_v73_written_with_hdf5storage_write(tmp_path):
    arr = conv_feat(4)
    path = tmp_path / "w.mat"
    hdf5storage.write(arr, path="/feat", filename=str(path), matlab_compatible=True)
    np.testing.assert_array_equal(load_mat(path), arr)


def test_plain_hdf5_without_matlab_marks_is_read_row_major(tmp_path):
    # a file written straight with h5py carries no MATLAB header or attributes:
    # its data is already in C order and must not be transposed
    arr = conv_feat(5)
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as fh:
        fh["feat"] = arr
    np.testing.assert_array_equal(load_mat(path), arr)


def test_v5_files_read_where_the_file_system_cannot_map_them(tmp_path, monkeypatch):
    """The v5 structure check maps the file; where mapping fails it reads the file."""
    from icnn_pl.data import matio

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "f.mat"
    scipy.io.savemat(path, {"feat": x}, do_compression=True)
    mapped = matio._check_v5_structure(path, keep=True)

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(matio.mmap, "mmap", no_mmap)
    assert matio._check_v5_structure(path, keep=True) == mapped
    np.testing.assert_array_equal(load_mat(path), x)
    assert mat_shape(path) == (2, 3, 4)


def test_load_mat_returns_independent_float32_copy(tmp_path):
    path = write_v5(tmp_path / "i.mat", feat=np.arange(6, dtype=np.int16).reshape(2, 3))
    got = load_mat(path)
    assert got.dtype == np.float32
    got[0, 0] = 99
    assert load_mat(path)[0, 0] == 0


def test_load_mat_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.mat"):
        load_mat(tmp_path / "nope.mat")


@pytest.mark.parametrize(
    "content", [b"", b"hello, this is not a mat file", b"MATLAB 5.0 MAT-file" + b"\0" * 20]
)
def test_load_mat_not_a_mat_file(tmp_path, content):
    path = tmp_path / "bad.mat"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.mat") as info:
        load_mat(path)
    assert "re-export" in info.value.fix


@pytest.mark.parametrize("fmt", WRITERS)
def test_load_mat_truncated(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / "t.mat", feat=np.ones((1, 64, 8, 8), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.mat") as info:
        load_mat(path)
    assert "re-export" in info.value.fix


@pytest.mark.parametrize("fmt", WRITERS)
def test_load_mat_missing_key_lists_present(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / "k.mat", features=fc_feat(), other=fc_feat(1))
    for read in (load_mat, mat_shape):
        with pytest.raises(DataError) as info:
            read(path, "feat")
        msg = str(info.value)
        assert "'feat'" in msg and "k.mat" in msg
        assert "features" in msg and "other" in msg


def test_load_mat_rejects_non_numeric(tmp_path):
    path = write_v5(tmp_path / "s.mat", feat="text")
    with pytest.raises(DataError, match="not a real numeric"):
        load_mat(path)


def test_save_mat_is_v5_at_exact_path(tmp_path):
    path = tmp_path / "out" / "recon_image-x"  # no .mat suffix: must not grow one
    save_mat(path, {"recon_image": np.ones((4, 5, 3), np.float32), "loss": 1.5, "note": "hi"})
    assert path.is_file() and not path.with_name("recon_image-x.mat").exists()
    assert path.read_bytes().startswith(b"MATLAB 5.0")
    assert [p.name for p in path.parent.iterdir()] == ["recon_image-x"]  # no temp left
    back = scipy.io.loadmat(str(path))
    np.testing.assert_array_equal(back["recon_image"], np.ones((4, 5, 3)))
    assert back["loss"][0, 0] == 1.5 and back["note"][0] == "hi"


@pytest.mark.parametrize("fmt", WRITERS)
def test_load_mat_dict(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / "d.mat", conv1_1=np.float32(2.5), fc7=np.array([[0.5]]))
    got = load_mat_dict(path)
    assert sorted(got) == ["conv1_1", "fc7"]
    assert got["conv1_1"].shape == (1, 1) and float(got["conv1_1"][0, 0]) == 2.5


# --- subject ids ---------------------------------------------------------------------


@pytest.mark.parametrize("given", [1, "1", "01", "sub-01", "sub01", "S1", "s1"])
def test_subject_id(given):
    assert subject_id(given, "bdpy") == "sub-01"
    assert subject_id(given, "caffe") == "S1"


def test_subject_id_two_digits():
    assert subject_id(12, "bdpy") == "sub-12" and subject_id("sub-12", "caffe") == "S12"


@pytest.mark.parametrize("bad", [0, -1, "sub-00", "subject one", "", "S", True, 1.0, None])
def test_subject_id_rejects(bad):
    with pytest.raises(ConfigError, match=repr(bad).replace("(", r"\(")):
        subject_id(bad, "bdpy")


def test_subject_id_unknown_layout():
    with pytest.raises(ConfigError, match="matlab"):
        subject_id(1, "matlab")


# --- bdpy-era decoded features -------------------------------------------------------


def make_bdpy(root: Path, pattern: str, fmt: str = "v5", fold: str = "cv-fold1") -> None:
    """Write LAYERS x LABELS for sub-01/VC in one of the three bdpy path patterns."""
    for li, layer in enumerate(LAYERS):
        roi_dir = root / layer / "sub-01" / "VC"
        d = {
            "fold": roi_dir / fold / "decoded_features",
            "decoded_features": roi_dir / "decoded_features",
            "flat": roi_dir,
        }[pattern]
        for i, label in enumerate(LABELS):
            WRITERS[fmt](d / f"{label}.mat", feat=feat_for(layer, 10 * li + i))


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("pattern", ["fold", "decoded_features", "flat"])
def test_decoded_features_patterns(tmp_path, pattern, fmt):
    make_bdpy(tmp_path, pattern, fmt)
    df = DecodedFeatures(tmp_path, 1, "VC", LAYERS)
    assert df.labels() == LABELS
    feats = df.read(LABELS[1])
    assert list(feats) == LAYERS
    assert feats["conv1_1"].shape == (2, 3, 5) and feats["fc7"].shape == (7,)
    np.testing.assert_array_equal(feats["conv1_1"], conv_feat(1)[0])
    np.testing.assert_array_equal(feats["fc7"], fc_feat(11)[0])


def test_decoded_features_explicit_fold_and_layer_order(tmp_path):
    make_bdpy(tmp_path, "fold", fold="cv-fold2")
    df = DecodedFeatures(tmp_path, "sub-01", "VC", ["fc7", "conv1_1"], fold="cv-fold2")
    assert list(df.read(LABELS[0])) == ["fc7", "conv1_1"]


def test_decoded_features_fold_preferred_over_plain(tmp_path):
    make_bdpy(tmp_path, "fold")
    for layer in LAYERS:  # decoy in a lower-priority location
        write_v5(tmp_path / layer / "sub-01" / "VC" / "decoded_features" / "decoy.mat", feat=1.0)
    assert DecodedFeatures(tmp_path, 1, "VC", LAYERS).labels() == LABELS


def test_decoded_features_several_folds_need_a_choice(tmp_path):
    make_bdpy(tmp_path, "fold", fold="cv-fold1")
    make_bdpy(tmp_path, "fold", fold="cv-fold2")
    with pytest.raises(ConfigError) as info:
        DecodedFeatures(tmp_path, 1, "VC", LAYERS)
    assert "cv-fold1" in str(info.value) and "cv-fold2" in str(info.value)
    assert DecodedFeatures(tmp_path, 1, "VC", LAYERS, fold="cv-fold2").labels() == LABELS


def test_decoded_features_unknown_fold(tmp_path):
    make_bdpy(tmp_path, "fold", fold="cv-fold1")
    with pytest.raises(DataError, match="cv-fold9") as info:
        DecodedFeatures(tmp_path, 1, "VC", LAYERS, fold="cv-fold9")
    assert "cv-fold1" in str(info.value)


def test_decoded_features_missing_root(tmp_path):
    with pytest.raises(DataError, match="no_such_root") as info:
        DecodedFeatures(tmp_path / "no_such_root", 1, "VC", LAYERS)
    assert "data.root=" in info.value.fix


def test_decoded_features_missing_layer_lists_layers(tmp_path):
    make_bdpy(tmp_path, "flat")
    with pytest.raises(DataError, match="conv5_4") as info:
        DecodedFeatures(tmp_path, 1, "VC", ["conv5_4"])
    assert "conv1_1" in str(info.value) and "fc7" in str(info.value)


def test_decoded_features_missing_subject_lists_subjects(tmp_path):
    make_bdpy(tmp_path, "flat")
    with pytest.raises(DataError, match="sub-03") as info:
        DecodedFeatures(tmp_path, 3, "VC", LAYERS)
    assert "sub-01" in str(info.value)


def test_decoded_features_missing_roi_lists_rois(tmp_path):
    make_bdpy(tmp_path, "flat")
    with pytest.raises(DataError, match="LOC") as info:
        DecodedFeatures(tmp_path, 1, "LOC", LAYERS)
    assert "VC" in str(info.value)


def test_decoded_features_label_missing_for_one_layer(tmp_path):
    make_bdpy(tmp_path, "flat")
    (tmp_path / "fc7" / "sub-01" / "VC" / f"{LABELS[1]}.mat").unlink()
    df = DecodedFeatures(tmp_path, 1, "VC", LAYERS)
    with pytest.raises(DataError) as info:
        df.labels()
    assert LABELS[1] in str(info.value) and "fc7" in str(info.value)
    with pytest.raises(DataError, match=LABELS[1]):
        df.read(LABELS[1])


def test_decoded_features_no_files(tmp_path):
    for layer in LAYERS:
        (tmp_path / layer / "sub-01" / "VC").mkdir(parents=True)
    with pytest.raises(DataError, match="no decoded features"):
        DecodedFeatures(tmp_path, 1, "VC", LAYERS).labels()


def test_decoded_features_ignores_hidden_and_other_files(tmp_path):
    make_bdpy(tmp_path, "flat")
    vc = tmp_path / "conv1_1" / "sub-01" / "VC"
    (vc / ".n0_1.mat.tmp").write_bytes(b"")
    (vc / "._n0_1.mat").write_bytes(b"")
    (vc / "notes.txt").write_text("x")
    assert DecodedFeatures(tmp_path, 1, "VC", LAYERS).labels() == LABELS


@pytest.mark.parametrize("layers", ["conv1_1", [], ["fc7", "fc7"]])
def test_decoded_features_bad_layers(tmp_path, layers):
    make_bdpy(tmp_path, "flat")
    with pytest.raises(ConfigError):
        DecodedFeatures(tmp_path, 1, "VC", layers)


def test_read_rejects_bad_shapes_and_nan(tmp_path):
    make_bdpy(tmp_path, "flat")
    vc = tmp_path / "fc7" / "sub-01" / "VC"
    write_v5(vc / "batch.mat", feat=np.ones((3, 7), np.float32))
    write_v5(vc / "nan.mat", feat=np.full((1, 7), np.nan, np.float32))
    df = DecodedFeatures(tmp_path, 1, "VC", ["fc7"])
    with pytest.raises(DataError, match="batch.mat"):
        df.read("batch")
    with pytest.raises(DataError, match="NaN"):
        df.read("nan")


def test_read_keeps_single_channel_conv_axis(tmp_path):
    # (C,H,W) with C == 1 is already one sample: the channel axis must survive
    d = tmp_path / "conv1_1" / "sub-01" / "VC"
    write_v5(d / "x.mat", feat=np.ones((1, 4, 6), np.float32))
    write_v5(tmp_path / "fc7" / "sub-01" / "VC" / "x.mat", feat=np.ones((7, 1), np.float32))
    feats = DecodedFeatures(tmp_path, 1, "VC", LAYERS).read("x")
    assert feats["conv1_1"].shape == (1, 4, 6) and feats["fc7"].shape == (7,)


# --- Caffe-era decoded features ------------------------------------------------------


def make_caffe(root: Path, fmt: str = "v5", subject: str = "S2", roi: str = "VC") -> None:
    for li, layer in enumerate(LAYERS):
        d = root / "natural" / "VGG19" / layer / subject / roi
        for i, label in enumerate(LABELS):
            # Caffe-era files hold (C,H,W) or (N,): no sample axis
            arr = feat_for(layer, 10 * li + i)[0]
            name = f"natural-VGG19-{layer}-{subject}-{roi}-{label}.mat"
            WRITERS[fmt](d / name, feat=arr)


@pytest.mark.parametrize("fmt", WRITERS)
def test_caffe_decoded_features(tmp_path, fmt):
    make_caffe(tmp_path, fmt)
    df = CaffeDecodedFeatures(tmp_path, "sub-02", "VC", LAYERS)
    assert df.labels() == LABELS
    feats = df.read(LABELS[0])
    np.testing.assert_array_equal(feats["conv1_1"], conv_feat(0)[0])
    np.testing.assert_array_equal(feats["fc7"], fc_feat(10)[0])
    assert feats["fc7"].shape == (7,)


def test_caffe_label_with_dashes_and_other_prefixes_ignored(tmp_path):
    make_caffe(tmp_path)
    for layer in LAYERS:
        d = tmp_path / "natural" / "VGG19" / layer / "S2" / "VC"
        write_v5(d / f"natural-VGG19-{layer}-S2-VC-img-with-dash.mat", feat=feat_for(layer, 0)[0])
        # another ROI's file in the same directory must not count as a label
        write_v5(d / f"natural-VGG19-{layer}-S2-V1-{LABELS[0]}.mat", feat=feat_for(layer, 0)[0])
    df = CaffeDecodedFeatures(tmp_path, 2, "VC", LAYERS)
    assert df.labels() == sorted([*LABELS, "img-with-dash"])
    assert df.read("img-with-dash")["fc7"].shape == (7,)


@pytest.mark.parametrize(
    ("kwargs", "bad", "present"),
    [
        ({"feature_type": "alphabet"}, "alphabet", "natural"),
        ({"net": "AlexNet"}, "AlexNet", "VGG19"),
        ({"layers": ["conv5_4"]}, "conv5_4", "conv1_1"),
        ({"subject": 3}, "S3", "S2"),
        ({"roi": "FFA"}, "FFA", "VC"),
    ],
)
def test_caffe_missing_levels(tmp_path, kwargs, bad, present):
    make_caffe(tmp_path)
    args = {"root": tmp_path, "subject": 2, "roi": "VC", "layers": LAYERS, **kwargs}
    with pytest.raises(DataError, match=bad) as info:
        CaffeDecodedFeatures(**args)
    assert present in str(info.value)


def test_caffe_missing_root(tmp_path):
    with pytest.raises(DataError, match="decodedfeatures"):
        CaffeDecodedFeatures(tmp_path / "decodedfeatures", 1, "VC", LAYERS)


def test_caffe_rejects_free_form_subject(tmp_path):
    make_caffe(tmp_path)
    with pytest.raises(ConfigError, match="sub-AM"):
        CaffeDecodedFeatures(tmp_path, "sub-AM", "VC", LAYERS)


# --- true features -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", WRITERS)
def test_true_features(tmp_path, fmt):
    for li, layer in enumerate(LAYERS):
        for i, label in enumerate(LABELS):
            WRITERS[fmt](tmp_path / layer / f"{label}.mat", feat=feat_for(layer, 10 * li + i))
    tf = TrueFeatures(tmp_path, LAYERS)
    assert tf.labels() == LABELS
    feats = tf.read(LABELS[1])
    np.testing.assert_array_equal(feats["conv1_1"], conv_feat(1)[0])
    np.testing.assert_array_equal(feats["fc7"], fc_feat(11)[0])


def test_true_features_errors(tmp_path):
    with pytest.raises(DataError, match="missing_root"):
        TrueFeatures(tmp_path / "missing_root", LAYERS)
    write_v5(tmp_path / "conv1_1" / "a.mat", feat=conv_feat())
    with pytest.raises(DataError, match="fc7") as info:
        TrueFeatures(tmp_path, LAYERS)
    assert "conv1_1" in str(info.value)


# --- reference std -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", WRITERS)
def test_reference_std(tmp_path, fmt):
    # sio.savemat turns scalars into (1,1); hdf5storage keeps a 0-d float
    path = WRITERS[fmt](
        tmp_path / "estimated_vgg19_cnn_feat_std.mat",
        conv1_1=np.float32(12.5),
        fc7=np.array([[0.75]]),
        fc8=np.array([3.0]),
    )
    assert load_reference_std(path, ["fc7", "conv1_1"]) == {"fc7": 0.75, "conv1_1": 12.5}


def test_reference_std_missing_layer_lists_present(tmp_path):
    path = write_v5(tmp_path / "std.mat", conv1_1=1.0, fc7=2.0)
    with pytest.raises(DataError, match="fc8") as info:
        load_reference_std(path, ["conv1_1", "fc8"])
    assert "fc7" in str(info.value) and "std.mat" in str(info.value)


@pytest.mark.parametrize("value", [0.0, -1.0, np.nan, np.array([1.0, 2.0])])
def test_reference_std_bad_values(tmp_path, value):
    path = write_v5(tmp_path / "std.mat", fc7=value)
    with pytest.raises(DataError, match="fc7"):
        load_reference_std(path, ["fc7"])


def test_reference_std_missing_file(tmp_path):
    with pytest.raises(DataError, match="std.mat"):
        load_reference_std(tmp_path / "std.mat", ["fc7"])


# --- act_range -----------------------------------------------------------------------


def test_act_range_real_file():
    arr = load_act_range(ACT_RANGE)
    assert arr.shape == (4096,) and arr.dtype == np.float32
    assert abs(float(arr.mean()) - 3.37) < 0.01
    assert arr.min() >= 2 and arr.max() <= 6


def test_act_range_other_length_and_newlines(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("1.5\n2\n  3e0\n")
    np.testing.assert_array_equal(load_act_range(path, expected_len=None), [1.5, 2, 3])
    np.testing.assert_array_equal(load_act_range(path, expected_len=3), [1.5, 2, 3])


@pytest.mark.parametrize(
    ("content", "expected_len", "needle"),
    [
        ("1 2 x 4", None, "'x'"),
        ("1 2 3", 4096, "expected 4096 values, found 3"),
        ("", None, "empty"),
        ("", 4096, "found 0"),
        ("1 -2 3", None, "negative"),
        ("1 nan 3", None, "NaN"),
        ("1 inf 3", None, "NaN or inf"),
    ],
)
def test_act_range_errors(tmp_path, content, expected_len, needle):
    path = tmp_path / "act.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=needle) as info:
        load_act_range(path, expected_len=expected_len)
    assert "act.txt" in str(info.value)


def test_act_range_missing_file(tmp_path):
    with pytest.raises(DataError, match="act_missing.txt"):
        load_act_range(tmp_path / "act_missing.txt")
