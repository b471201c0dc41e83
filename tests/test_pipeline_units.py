"""Pipeline parts in-process: label selection, output files (atomic), result tables, image
seeds, and ``run_job`` end to end on a tiny network with an in-memory feature source."""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from pipeline_helpers import TINY_SIZE, MemorySource, tiny_encoder, tiny_job

from icnn_pl.data.datamodule import select_labels
from icnn_pl.data.images import ImageFolder
from icnn_pl.engine import recipe as build_mod
from icnn_pl.engine.fit import fit
from icnn_pl.engine.reconstruction import Reconstruction
from icnn_pl.engine.targets import expected_shapes
from icnn_pl.errors import ConfigError, DataError
from icnn_pl.pipeline import job as pipeline_mod
from icnn_pl.pipeline.job import run_job
from icnn_pl.pipeline.outputs import ReconOutputs, read_table, write_table

LABELS = ["img_a", "img_b", "img_c"]
LAYERS = ["c1", "c2", "fc"]


def leftovers(folder: Path) -> list[str]:
    """Hidden files (atomic-write temporaries are ``.<name>.<random>.tmp``)."""
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """Run from a scratch directory: with logger=None Lightning writes ./lightning_logs
    (see test_run_job_without_logger_writes_nothing_in_cwd)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# -- select_labels ------------------------------------------------------------------------------
ALL = [f"n{i:02d}" for i in range(10)]


def test_select_labels_explicit_keeps_the_given_order():
    assert select_labels(ALL, ["n05", "n01"]) == ["n05", "n01"]
    assert select_labels(ALL) == ALL and select_labels(ALL, []) == ALL


def test_select_labels_missing_is_a_data_error():
    with pytest.raises(DataError, match="nope") as err:
        select_labels(ALL, ["n01", "nope"])
    assert err.value.fix and "n00" in err.value.fix


def test_select_labels_limit():
    assert select_labels(ALL, limit=3) == ALL[:3]
    assert select_labels(ALL, ["n09", "n08", "n07"], limit=2) == ["n09", "n08"]
    assert select_labels(ALL, limit=100) == ALL
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="data.limit"):
            select_labels(ALL, limit=bad)


@pytest.mark.parametrize("labels", [None, ALL[:7]])
def test_select_labels_shards_are_disjoint_and_cover_everything(labels):
    expected = labels or ALL
    shards = [select_labels(ALL, labels, num_shards=3, shard=s) for s in range(3)]
    assert all(shards)
    assert sum(len(s) for s in shards) == len(expected)
    assert set().union(*shards) == set(expected)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(shards[i]) & set(shards[j])
    # deterministic
    assert shards == [select_labels(ALL, labels, num_shards=3, shard=s) for s in range(3)]


@pytest.mark.parametrize(("num_shards", "shard"), [(0, 0), (3, 3), (3, -1)])
def test_select_labels_bad_shard(num_shards, shard):
    with pytest.raises(ConfigError, match="shard"):
        select_labels(ALL, num_shards=num_shards, shard=shard)


# -- ReconOutputs -------------------------------------------------------------------------------
def _image(seed=0):
    return np.random.default_rng(seed).uniform(-20, 270, (8, 10, 3)).astype(np.float32)


def test_outputs_round_trip(tmp_path):
    out = ReconOutputs(tmp_path / "run", "sub-01", "VC")
    assert out.dir == tmp_path / "run" / "sub-01" / "VC" and out.dir.is_dir()
    assert not out.is_done("cat")
    img, hist, code = _image(), np.array([3.0, 2.0, 1.5]), np.arange(5, dtype=np.float64)
    out.write("cat", img, hist, code, meta={"method": "icnn_dgn_gd", "subject": "sub-01"})
    assert out.is_done("cat") and not out.is_done("dog")
    assert out.mat_path("cat").name == "recon_image-cat.mat"
    data = out.read("cat")
    assert data["recon_image"].dtype == np.float32 and data["recon_image"].shape == (8, 10, 3)
    np.testing.assert_array_equal(data["recon_image"], img)
    np.testing.assert_allclose(np.ravel(data["loss_history"]), hist)
    np.testing.assert_allclose(np.ravel(data["recon_gen_feat"]), code)
    assert str(np.ravel(data["method"])[0]) == "icnn_dgn_gd"
    # readable by plain scipy, as users will
    raw = scipy.io.loadmat(out.mat_path("cat"))
    assert raw["recon_image"].shape == (8, 10, 3)
    png = np.asarray(Image.open(out.png_path("cat")))
    assert png.dtype == np.uint8 and png.shape == (8, 10, 3) and len(np.unique(png)) > 10
    assert leftovers(tmp_path) == []


def test_outputs_without_code(tmp_path):
    out = ReconOutputs(tmp_path, "true", "VC")
    out.write("x", _image(), np.ones(4))
    assert "recon_gen_feat" not in out.read("x")


def test_outputs_failed_write_leaves_no_final_file(tmp_path, monkeypatch):
    out = ReconOutputs(tmp_path, "sub-01", "VC")

    def half_then_crash(fh, *args, **kwargs):
        fh.write(b"MATLAB 5.0 MAT-file, half written")
        raise OSError("disk full")

    monkeypatch.setattr(scipy.io, "savemat", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        out.write("cat", _image(), np.ones(3))
    assert not out.mat_path("cat").exists()
    assert not out.is_done("cat")  # a re-run recomputes it
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    out.write("cat", _image(), np.ones(3))  # the re-run succeeds
    assert out.is_done("cat")


def test_outputs_overwrite_is_atomic(tmp_path):
    out = ReconOutputs(tmp_path, "sub-01", "VC")
    out.write("cat", _image(0), np.ones(3))
    out.write("cat", _image(1), np.zeros(2))
    np.testing.assert_array_equal(out.read("cat")["recon_image"], _image(1))
    assert leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    """A writer killed mid-write leaves its temporary; the next job removes it, but never
    the temporary of a live writer (a shard beside it) or of another host."""
    import subprocess
    import sys

    from icnn_pl.atomic import _HOST

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    out_dir = tmp_path / "sub-01" / "VC"
    out_dir.mkdir(parents=True)
    names = {"dead": f".recon_image-a.mat.{_HOST}-{dead}-k2j4h6.tmp",
             "live": f".recon_image-b.mat.{_HOST}-{os.getpid()}-k2j4h6.tmp",
             "other_host": f".recon_image-c.mat.elsewhere-{dead}-k2j4h6.tmp",
             "table": f".results.csv.{_HOST}-{dead}-k2j4h6.tmp"}
    for name in names.values():
        (tmp_path / name if name.startswith(".results") else out_dir / name).write_text("x")
    ReconOutputs(tmp_path, "sub-01", "VC")
    assert leftovers(tmp_path) == sorted([names["live"], names["other_host"]])


def test_ctrl_c_first_requests_a_stop_second_interrupts():
    import signal

    from icnn_pl.engine import interrupt

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with interrupt.deferred_sigint():
            handler = signal.getsignal(signal.SIGINT)
            interrupt.check()  # nothing asked yet
            handler(signal.SIGINT, None)  # first Ctrl-C: a request, checked between iterations
            with pytest.raises(KeyboardInterrupt):
                interrupt.check()
            with pytest.raises(KeyboardInterrupt):  # second Ctrl-C: at once
                handler(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        interrupt.check()  # the request ends with the job
    finally:
        signal.signal(signal.SIGINT, outer)


def test_outputs_read_missing_or_corrupt(tmp_path):
    out = ReconOutputs(tmp_path, "sub-01", "VC")
    with pytest.raises(DataError):
        out.read("nothing")
    out.mat_path("bad").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="bad"):
        out.read("bad")


def test_outputs_unwritable_dir_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="hydra.run.dir"):
        ReconOutputs(blocker, "sub-01", "VC")


# -- write_table --------------------------------------------------------------------------------
ROWS = [
    {"label": "a", "final_loss": 1.5, "seconds": float("nan"), "iterations": np.int64(3)},
    {"label": "b", "final_loss": np.float32(0.25), "seconds": 2.0, "iterations": 3,
     "pixel_corr": 0.5},
]


def test_write_table_csv_with_nan(tmp_path):
    import csv

    write_table(tmp_path / "results.csv", ROWS)
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["label", "final_loss", "seconds", "iterations", "pixel_corr"]
    assert rows[0]["seconds"] == "" and rows[0]["pixel_corr"] == ""
    assert float(rows[1]["final_loss"]) == 0.25 and rows[1]["pixel_corr"] == "0.5"
    assert leftovers(tmp_path) == []


def test_write_table_json_with_nan(tmp_path):
    path = tmp_path / "results.json"
    write_table(path, ROWS)
    text = path.read_text()
    assert "NaN" not in text
    rows = json.loads(text)  # strict JSON
    assert rows[0]["seconds"] is None and rows[0]["iterations"] == 3
    assert rows[1]["final_loss"] == 0.25 and rows[1]["pixel_corr"] == 0.5
    assert read_table(path) == rows
    assert read_table(tmp_path / "none.json") == []
    path.write_text("{broken")
    with pytest.raises(DataError):
        read_table(path)
    write_table(path, [])
    assert json.loads(path.read_text()) == []


# -- image seeds --------------------------------------------------------------------------------
def image_seed(seed: int, label: str) -> int:
    return build_mod.image_seed(seed, label)


def test_image_seed_is_deterministic_and_distinct():
    seeds = {lab: image_seed(0, lab) for lab in LABELS}
    assert seeds == {lab: image_seed(0, lab) for lab in reversed(LABELS)}
    assert len(set(seeds.values())) == len(LABELS)
    assert image_seed(1, "img_a") != image_seed(0, "img_a")
    assert all(0 <= s < 2**31 for s in seeds.values())
    assert isinstance(seeds["img_a"], int)


# -- run_job on a tiny setup --------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder(0)


def make_job(encoder, run_dir, *, labels=LABELS, broken=(), stimuli=None, resume=True,
             fail_fast=False, order=None, n_iter=3, batch_size=1):
    source = MemorySource(encoder, labels, LAYERS, broken=broken)
    job = tiny_job(encoder, run_dir, layers=LAYERS, source=source, n_iter=n_iter,
                   data_kw={"stimuli": stimuli, "labels": order, "batch_size": batch_size},
                   logger=None, resume=resume, fail_fast=fail_fast, seed=0)
    return job, source


def test_run_job_rows_summary_objective_and_resume(encoder, tmp_path):
    job, source = make_job(encoder, tmp_path)
    summary = run_job(job)
    assert [r["label"] for r in summary.rows] == LABELS
    assert summary.failures == {} and summary.skipped == []
    for r in summary.rows:
        assert (r["method"], r["subject"], r["roi"]) == ("tiny_gd", "sub-01", "VC")
        assert r["iterations"] == 3 and r["function_evals"] == 3
        assert math.isfinite(r["final_loss"]) and r["seconds"] >= 0
        data = job.outputs.read(r["label"])
        assert data["recon_image"].shape == (*TINY_SIZE, 3)
        assert np.ravel(data["loss_history"]).shape == (3,)
        assert np.isclose(np.ravel(data["loss_history"])[-1], r["final_loss"], rtol=1e-5)
    assert summary.summary["n_images"] == 3
    mean_loss = np.mean([r["final_loss"] for r in summary.rows])
    assert summary.summary["final_loss"] == pytest.approx(mean_loss)
    assert summary.objective == pytest.approx(mean_loss)  # no true images: mean final loss
    assert "pixel_corr" not in summary.summary
    for name in ("results.csv", "results.json", "gallery.png", "loss_curves.png"):
        assert (tmp_path / name).is_file(), name
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3
    assert sorted(source.reads) == sorted(LABELS)
    mtimes = {lab: job.outputs.mat_path(lab).stat().st_mtime_ns for lab in LABELS}

    # Same outputs again: everything is skipped, nothing is read or rewritten.
    again, source2 = make_job(encoder, tmp_path)
    summary2 = run_job(again)
    assert sorted(summary2.skipped) == sorted(LABELS) and source2.reads == []
    assert [r["label"] for r in summary2.rows] == LABELS
    assert all(math.isnan(r["seconds"]) for r in summary2.rows)
    assert [r["final_loss"] for r in summary2.rows] == pytest.approx(
        [r["final_loss"] for r in summary.rows])
    assert mtimes == {lab: job.outputs.mat_path(lab).stat().st_mtime_ns for lab in LABELS}

    # Only a missing image is recomputed; resume=False recomputes everything.
    job.outputs.mat_path("img_b").unlink()
    partial, source3 = make_job(encoder, tmp_path)
    summary3 = run_job(partial)
    assert source3.reads == ["img_b"] and sorted(summary3.skipped) == ["img_a", "img_c"]
    assert job.outputs.mat_path("img_a").stat().st_mtime_ns == mtimes["img_a"]
    fresh, source4 = make_job(encoder, tmp_path, resume=False)
    assert run_job(fresh).skipped == [] and sorted(source4.reads) == sorted(LABELS)


def test_run_job_frees_each_image_before_the_next(encoder, tmp_path, monkeypatch):
    """A finished module sits in a reference cycle with its Trainer, holding its targets
    (~60 MB per image at 224 px); it must be gone before the next image starts, not when
    Python's rare full collection runs, or a long job's memory grows image by image."""
    alive = []

    def counting_fit(module, **kwargs):
        result = fit(module, **kwargs)
        alive.append(sum(type(o) is Reconstruction for o in gc.get_objects()))
        return result

    monkeypatch.setattr(pipeline_mod, "fit", counting_fit)
    gc.disable()  # only explicit collections: the outcome must not depend on gc timing
    try:
        run_job(make_job(encoder, tmp_path)[0])
    finally:
        gc.enable()
    assert alive == [1] * len(LABELS)  # the module just run, and no earlier one


def test_run_job_scores_against_true_images(encoder, tmp_path):
    job, source = make_job(encoder, tmp_path / "run", labels=LABELS[:2])
    folder = tmp_path / "stimuli"
    folder.mkdir()
    for lab, img in source.images.items():
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{lab}.png")
    job.datamodule.stimuli = ImageFolder(folder, TINY_SIZE)
    summary = run_job(job)
    assert all("pixel_corr" in r and -1 <= r["pixel_corr"] <= 1 for r in summary.rows)
    assert summary.objective == pytest.approx(summary.summary["pixel_corr"])
    assert summary.objective == pytest.approx(np.mean([r["pixel_corr"] for r in summary.rows]))


def test_run_job_results_do_not_depend_on_order(encoder, tmp_path):
    job1, _ = make_job(encoder, tmp_path / "fwd", order=["img_a", "img_b"])
    job2, _ = make_job(encoder, tmp_path / "rev", order=["img_b", "img_a"])
    run_job(job1)
    run_job(job2)
    for lab in ("img_a", "img_b"):
        np.testing.assert_array_equal(job1.outputs.read(lab)["recon_image"],
                                      job2.outputs.read(lab)["recon_image"])
    assert not np.array_equal(job1.outputs.read("img_a")["recon_image"],
                              job1.outputs.read("img_b")["recon_image"])


def test_run_job_bad_image_is_reported_and_the_others_finish(encoder, tmp_path):
    job, _ = make_job(encoder, tmp_path, broken=["img_b"])
    summary = run_job(job)
    assert list(summary.failures) == ["img_b"] and "corrupt" in summary.failures["img_b"]
    assert [r["label"] for r in summary.rows] == ["img_a", "img_c"]
    assert job.outputs.is_done("img_a") and job.outputs.is_done("img_c")
    assert not job.outputs.is_done("img_b")
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2
    assert summary.summary["n_images"] == 2


def test_run_job_fail_fast_raises(encoder, tmp_path):
    job, _ = make_job(encoder, tmp_path, broken=["img_b"], fail_fast=True)
    with pytest.raises(DataError, match="img_b"):
        run_job(job)
    assert job.outputs.is_done("img_a") and not job.outputs.is_done("img_c")


def test_run_job_without_logger_writes_nothing_in_cwd(encoder, tmp_path, _in_tmp_cwd):
    job, _ = make_job(encoder, tmp_path / "run", labels=LABELS[:1], n_iter=1)
    run_job(job)
    assert list(_in_tmp_cwd.iterdir()) == []


def test_encoder_probe_after_set_layers():
    # a probe of new layers must not trip the early stop of the layers set before
    enc = tiny_encoder(0)
    enc.set_layers(["c1"])
    assert enc.feature_shapes(["c2", "fc"]) == {"c2": (6, 8, 8), "fc": (10,)}
    assert list(enc(torch.zeros(1, 3, *TINY_SIZE))) == ["c1"]


def test_demo_second_subject_after_cached_true_features(tmp_path):
    from icnn_pl.data.demo import Demo
    from icnn_pl.data.readers import DecodedFeatures

    enc = tiny_encoder(0)
    demo = Demo(tmp_path / "demo", enc, "tiny|random-seed0")
    demo.ensure(["astronaut"], subject=1)  # writes the true features, then sub-01
    demo.ensure(["astronaut"], subject=2)  # reads the cached true features for sub-02
    shapes = expected_shapes(enc, LAYERS)
    for sub in ("sub-01", "sub-02"):
        feats = DecodedFeatures(demo.decoded_dir, sub, "VC", LAYERS).read("astronaut")
        assert {n: f.shape for n, f in feats.items()} == shapes, sub


def test_demo_negative_limit_fails_before_writing(tmp_path):
    from hydra import compose, initialize_config_dir
    from pipeline_helpers import CONF

    from icnn_pl.pipeline.factory import build_datamodule, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["layers.names=[c1,c2,fc]", "data.limit=-1",
                                           f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="data.limit"):
        dm, _ = build_datamodule(cfg, tiny_encoder(0), "tiny|random-seed0")
        dm.setup("predict")
    assert sorted(p.name for p in tmp_path.rglob("*.mat")) == []
