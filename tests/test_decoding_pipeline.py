"""The decoding stage: BData + features tree -> decoded features in train_recon's layout,
resume, bad input, multirun, and the demo end to end (decode, then reconstruct)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from icnn_pl.data.matio import load_mat, load_mat_dict, save_mat
from icnn_pl.data.readers import DecodedFeatures
from icnn_pl.decoding import stage
from icnn_pl.decoding.bdata import write_bdata
from icnn_pl.decoding.decoder import TopKRidge, zscore_stats
from icnn_pl.errors import ConfigError, DataError
from tests.pipeline_helpers import CONF, REPO, child_env

SHAPE = (4, 3, 3)      # conv-like units of the tiny features tree
TRAIN = [f"img_{i:02d}" for i in range(30)]
TEST = ["test_a", "test_b", "test_c"]


def make_data(root, nan=False):
    """Features tree (one layer) and BData files: 40 voxels (V1 = first 15, VC = all,
    FFA = none), 2 repeats of the 30 training images, 3 repeats of 3 test images."""
    rng = np.random.default_rng(0)
    feats = {lab: rng.standard_normal(SHAPE) for lab in TRAIN + TEST}
    for lab, f in feats.items():
        save_mat(root / "features" / "conv1_1" / f"{lab}.mat", {"feat": f[None].astype(np.float32)})
    mix = rng.standard_normal((int(np.prod(SHAPE)), 40)) * (rng.random((36, 40)) < 0.2)
    for split, labels, reps in (("train", TRAIN, 2), ("test", TEST, 3)):
        order = np.concatenate([rng.permutation(len(labels)) for _ in range(reps)])
        X = np.stack([feats[labels[i]].reshape(-1) for i in order]) @ mix
        X += rng.standard_normal(X.shape) * 0.5
        if nan and split == "train":
            X[3, 5] = np.nan
        flags = [(f"ROI_{r}", np.r_[[1.0 if r == "VC" or (r == "V1" and j < 15) else 0.0
                                     for j in range(40)], np.nan], f"1 = ROI {r}")
                 for r in ("V1", "VC", "FFA")]
        write_bdata(root / f"sub-01_{split}.h5",
                    [("VoxelData", X, ""), ("stimulus_name", order + 1.0, "")], flags=flags,
                    vmaps={"stimulus_name": {i + 1.0: lab for i, lab in enumerate(labels)}})
    return feats


def overrides(root, *extra):
    return ["fmri=bdata", f"fmri.train='{root}/{{subject}}_train.h5'",
            f"fmri.test='{root}/{{subject}}_test.h5'", f"features.root={root}/features",
            f"out_dir={root}/out", "layers.names=[conv1_1]", "decoder.k=10", "device=cpu",
            *extra]


def cfg_of(*ov):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("decoder", overrides=list(ov))


def test_decoded_features_in_the_layout_train_recon_reads(tmp_path):
    feats = make_data(tmp_path)
    rows = stage.run(cfg_of(*overrides(tmp_path, "decoder.chunk_units=7")))
    assert len(rows) == 1 and rows[0]["chunks"] == 6  # 36 units in chunks of 7
    out = tmp_path / "out"
    reader = DecodedFeatures(out, "sub-01", "VC", ["conv1_1"])
    assert sorted(reader.labels()) == sorted(TEST)
    got = reader.read("test_b")["conv1_1"]
    assert got.shape == (1, *SHAPE) or got.shape == SHAPE
    # the same numbers as the decoder on its own (trials averaged per test label)
    from icnn_pl.decoding.bdata import read_bdata
    tr = read_bdata(tmp_path / "sub-01_train.h5", "VC")
    te = read_bdata(tmp_path / "sub-01_test.h5", "VC").averaged()
    Y = np.stack([feats[lab].reshape(-1) for lab in tr.labels])
    ym, yn = zscore_stats(Y)
    pred = TopKRidge(tr.X, te.X, 100.0, 10).fit_predict(Y, ym, yn).pred.numpy()
    np.testing.assert_allclose(got.reshape(-1), pred[te.labels.index("test_b")], atol=1e-5)
    model = out / "conv1_1" / "sub-01" / "VC" / "model"
    for name in ("x_mean", "x_norm", "y_mean", "y_norm", "b"):
        assert (model / f"{name}.mat").exists()
    np.testing.assert_allclose(load_mat(model / "y_mean.mat", "y_mean").reshape(-1), ym, atol=1e-5)
    w = load_mat_dict(model / "W" / "000000.mat")
    assert w["index"].shape == (7, 10) and w["weight"].shape == (7, 10)
    # what std_correction=centered and paper read
    assert load_mat_dict(out / "train_mean" / "sub-01-VC.mat")["conv1_1"].shape == SHAPE
    assert "conv1_1" in load_mat_dict(out / "feat_std.mat")
    table = (out / "evaluation.csv").read_text()
    assert "conv1_1,sub-01,VC,36,40,10" in table and (out / "evaluation.png").exists()
    assert rows[0]["profile_r"] > 0.3 and rows[0]["ident_acc"] > 0.5


def test_rerun_resumes_per_layer_and_chunk(tmp_path, monkeypatch):
    make_data(tmp_path)
    calls = []
    real = TopKRidge.fit_predict

    def counting(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the third chunk
        return real(self, *a)

    monkeypatch.setattr(TopKRidge, "fit_predict", counting)
    cfg = cfg_of(*overrides(tmp_path, "decoder.chunk_units=6"))
    with pytest.raises(KeyboardInterrupt):
        stage.run(cfg)
    rows = stage.run(cfg)
    assert len(calls) == 3 + 4 and rows[0]["chunks"] == 6  # 2 chunks kept, 4 redone
    assert stage.run(cfg) == [] and len(calls) == 7          # a finished layer is skipped


@pytest.mark.parametrize("extra,error,match", [
    (["roi=FFA"], DataError, "ROI 'FFA' has no voxels"),
    (["roi=LOC"], ConfigError, "no ROI 'LOC'"),
    (["decoder.k=41"], ConfigError, "decoder.k=41 is larger than the ROI's 40 voxels"),
    (["roi=V1", "decoder.k=16"], ConfigError, "larger than the ROI's 15 voxels"),
    (["decoder.memory_gb=0.00001"], ConfigError, "a chunk does not fit"),
    (["decoder.save_weights=all"], ConfigError, "save_weights='all' is not valid"),
])
def test_bad_input_one_line_before_work(tmp_path, extra, error, match, monkeypatch):
    make_data(tmp_path)
    monkeypatch.setattr(TopKRidge, "__init__", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(error, match=match):
        stage.run(cfg_of(*overrides(tmp_path, *extra)))


def test_nan_voxels_and_mismatched_labels(tmp_path, monkeypatch):
    make_data(tmp_path, nan=True)
    monkeypatch.setattr(TopKRidge, "__init__", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(DataError, match=r"1 NaN/inf value\(s\) in 1 voxel\(s\) \(columns \[5\]\)"):
        stage.run(cfg_of(*overrides(tmp_path)))
    make_data(tmp_path)
    (tmp_path / "features" / "conv1_1" / "img_07.mat").unlink()
    with pytest.raises(DataError, match="1 of 30 image.* no features.*img_07"):
        stage.run(cfg_of(*overrides(tmp_path)))


def _cli(*args, timeout=400):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env())


@pytest.mark.slow
def test_multirun_over_rois(tmp_path):
    make_data(tmp_path)
    proc = _cli("train_decoder.py", "-m", *overrides(tmp_path, "roi=VC,V1"),
                f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for roi in ("VC", "V1"):
        assert (tmp_path / "out" / "conv1_1" / "sub-01" / roi / "test_a.mat").exists()


@pytest.mark.slow
def test_demo_decode_then_reconstruct(tmp_path):
    """The README's two commands on tiny settings: simulated fMRI -> decoded conv1 ->
    train_recon.py experiment=fmri_demo on them."""
    out = tmp_path / "decoded"
    proc = _cli("train_decoder.py", "layers=conv1", f"out_dir={out}", f"fmri.root={tmp_path}/fmri",
                "fmri.n_train=24", "fmri.voxels_per_area=12", "decoder.k=8", "device=cpu",
                f"hydra.run.dir={tmp_path}/run1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "conv1_2" / "sub-01" / "VC" / "astronaut.mat").exists()
    proc = _cli("train_recon.py", "experiment=fmri_demo", "layers=conv1", f"data.root={out}",
                f"data.std_ref={out}/feat_std.mat", f"data.stimuli={out}/stimuli",
                "method.n_iter=2", "data.limit=2", "logger=none", "trainer=cpu",
                "progress=false", f"hydra.run.dir={tmp_path}/run2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pixel_corr" in (tmp_path / "run2" / "results.csv").read_text()
