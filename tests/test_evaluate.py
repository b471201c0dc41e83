"""Re-scoring and comparing finished runs (icnn_pl.evaluate) on synthetic run directories."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icnn_pl.evaluate import main
from icnn_pl.image import load_rgb
from icnn_pl.pipeline.outputs import ReconOutputs, write_table
from icnn_pl.review.compare import (
    SCORED_ON_NOTE,
    compare,
    comparison_gallery,
    score_run,
    summarize,
    write_job_metrics,
)
from icnn_pl.review.gallery import gallery_size
from icnn_pl.review.metrics import score_images
from icnn_pl.review.runs import find_runs

LABELS = ["img_a", "img_b", "img_c", "img_d", "img_e"]
SIZE = (32, 32)
METRIC_KEYS = ("pixel_corr", "ssim", "rmse", "ident_corr", "ident_euclid")


def _stimuli(root: Path) -> Path:
    """Distinct random 40x40 stimulus PNGs (resized to 32x32 when scored)."""
    folder = root / "stimuli"
    folder.mkdir()
    rng = np.random.default_rng(123)
    for lab in LABELS:
        img = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{lab}.png")
    return folder


def _make_run(run_dir: Path, stimuli: Path | None, noise: float, method: str,
              subject: str = "sub-01", roi: str = "VC", layers: object = "all",
              seed: int = 0, true_dir: Path | None = None) -> Path:
    """A run directory with the layout train_recon.py leaves."""
    rng = np.random.default_rng(seed)
    out = ReconOutputs(run_dir, subject, roi)
    rows = []
    source = stimuli or true_dir
    assert source is not None
    for lab in LABELS:
        true = load_rgb(source / f"{lab}.png", SIZE)
        recon = (true + rng.normal(0, noise, size=true.shape)).astype(np.float32) if noise \
            else true.copy()
        history = np.linspace(10.0, 1.0 + noise, 7)
        out.write(lab, recon, history)
        rows.append({"label": lab, "method": method, "subject": subject, "roi": roi,
                     "final_loss": float(history[-1]), "iterations": 7, "function_evals": 7,
                     "seconds": 0.1})
    write_table(run_dir / "results.csv", rows)
    write_table(run_dir / "results.json", rows)
    info = {"method": method, "subject": subject, "roi": roi, "outputs": f"{subject}/{roi}",
            "stimuli": None if stimuli is None else str(stimuli.resolve()),
            "input_size": list(SIZE), "labels": LABELS, "failures": {}, "layers": layers,
            "network": "vgg19", "data": "demo", "optimizer": "sgd_momentum", "n_iter": 7,
            "generator": None, "seed": seed}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
    return run_dir


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """multirun/{0,1,2}: low noise (icnn_gd), high noise (icnn_lbfgs), perfect (icnn_dgn_gd)."""
    base = tmp_path_factory.mktemp("evaluate")
    stim = _stimuli(base)
    root = base / "multirun" / "2024-01-01" / "12-00-00"
    _make_run(root / "0", stim, 10.0, "icnn_gd", seed=1)
    _make_run(root / "1", stim, 70.0, "icnn_lbfgs", subject="sub-02", seed=2)
    _make_run(root / "2", stim, 0.0, "icnn_dgn_gd", layers=["conv1_1", "fc8"])
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return base


@pytest.fixture
def multirun(_template: Path, tmp_path: Path) -> dict[str, Path]:
    """A private copy of the template multirun (tests may write into it)."""
    shutil.copytree(_template / "multirun", tmp_path / "multirun")
    runs = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    return {"root": tmp_path / "multirun", "stimuli": _template / "stimuli",
            "low": runs / "0", "high": runs / "1", "perfect": runs / "2"}


def test_find_runs(multirun):
    found = find_runs([multirun["root"]])
    assert found == sorted(multirun[k].resolve() for k in ("low", "high", "perfect"))
    assert find_runs([multirun["low"]]) == [multirun["low"].resolve()]
    assert find_runs([multirun["low"] / "run_info.json"]) == [multirun["low"].resolve()]


def test_find_runs_errors(tmp_path):
    from icnn_pl.errors import DataError

    with pytest.raises(DataError, match="not found"):
        find_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no run directories") as exc:
        find_runs([tmp_path / "empty"])
    assert exc.value.fix


def test_score_run_rows_and_noise_order(multirun):
    low, high = score_run(multirun["low"]), score_run(multirun["high"])
    assert [r["label"] for r in low] == LABELS
    row = low[0]
    assert {"label", "method", "subject", "roi", "layers", "scored_on", "final_loss",
            *METRIC_KEYS} <= set(row)
    assert row["method"] == "icnn_gd" and row["layers"] == "all" and row["scored_on"] == "display"
    for key in ("pixel_corr", "ssim"):
        assert np.mean([r[key] for r in low]) > np.mean([r[key] for r in high])
    assert np.mean([r["rmse"] for r in low]) < np.mean([r["rmse"] for r in high])
    assert all(r["final_loss"] == pytest.approx(11.0) for r in low)


def test_score_run_matches_score_images(multirun):
    """Rows equal score_images on the .mat images and load_rgb-resized stimuli."""
    out = ReconOutputs(multirun["high"], "sub-02", "VC")
    recons = {lab: out.read(lab)["recon_image"] for lab in LABELS}
    trues = {lab: load_rgb(multirun["stimuli"] / f"{lab}.png", SIZE) for lab in LABELS}
    for on in ("display", "raw"):
        expected = {r["label"]: r for r in score_images(recons, trues, on=on)}
        for r in score_run(multirun["high"], on=on):
            for key in METRIC_KEYS:
                assert r[key] == pytest.approx(expected[r["label"]][key], nan_ok=True)


def test_perfect_run(multirun):
    raw = score_run(multirun["perfect"], on="raw")
    assert all(r["pixel_corr"] == pytest.approx(1.0) for r in raw)
    assert all(r["rmse"] == pytest.approx(0.0, abs=1e-4) for r in raw)
    disp = score_run(multirun["perfect"], on="display")
    assert all(r["pixel_corr"] > 0.95 for r in disp)
    for rows in (raw, disp):
        assert all(r["ident_corr"] == 1.0 and r["ident_euclid"] == 1.0 for r in rows)
    assert raw[0]["layers"] == "conv1_1,fc8"


def test_score_run_rejects_bad_mode(multirun):
    from icnn_pl.errors import ConfigError

    with pytest.raises(ConfigError):
        score_run(multirun["low"], on="clipped")


def test_summarize(multirun):
    rows = score_run(multirun["low"])
    s = summarize(rows)
    assert s["n_images"] == len(LABELS)
    for key in (*METRIC_KEYS, "final_loss"):
        assert s[f"{key}_ci95_low"] <= s[key] <= s[f"{key}_ci95_high"]
    assert s["pixel_corr"] == pytest.approx(np.mean([r["pixel_corr"] for r in rows]))


def test_compare_sorted_and_complete(multirun):
    runs = find_runs([multirun["root"]])
    rows = compare(runs)
    assert [r["method"] for r in rows] == ["icnn_dgn_gd", "icnn_gd", "icnn_lbfgs"]
    keys = {"method", "subject", "roi", "layers", "n_images", "pixel_corr",
            "pixel_corr_ci95_low", "pixel_corr_ci95_high", "ident_corr", "ident_euclid",
            "ssim", "rmse", "final_loss", "run"}
    for r in rows:
        assert keys <= set(r)
        assert r["n_images"] == len(LABELS)
        assert all(math.isfinite(r[k]) for k in keys - {"method", "subject", "roi", "layers",
                                                          "run", "n_images"})
        assert r["pixel_corr_ci95_low"] <= r["pixel_corr"] <= r["pixel_corr_ci95_high"]
    by = {r["method"]: r for r in rows}
    assert by["icnn_dgn_gd"]["pixel_corr"] > by["icnn_gd"]["pixel_corr"] > \
        by["icnn_lbfgs"]["pixel_corr"]
    assert by["icnn_dgn_gd"]["ident_corr"] == 1.0
    assert by["icnn_gd"]["run"] == "0"  # relative to the common parent of the runs
    assert by["icnn_dgn_gd"]["layers"] == "conv1_1,fc8"


def test_write_job_metrics(multirun):
    rows = write_job_metrics(multirun["low"])
    for name in ("metrics.csv", "metrics.json"):
        assert (multirun["low"] / name).is_file()
    saved = json.loads((multirun["low"] / "metrics.json").read_text())
    assert len(saved) == len(rows) == 2 * (len(LABELS) + 1)
    for on in ("display", "raw"):
        images = [r for r in saved if r["scored_on"] == on and r["label"] != "mean"]
        means = [r for r in saved if r["scored_on"] == on and r["label"] == "mean"]
        assert [r["label"] for r in images] == LABELS
        assert len(means) == 1
        m = means[0]
        assert m["n_images"] == len(LABELS)
        assert m["pixel_corr"] == pytest.approx(np.mean([r["pixel_corr"] for r in images]))
        assert m["pixel_corr_ci95_low"] <= m["pixel_corr"] <= m["pixel_corr_ci95_high"]
        assert m["ssim_ci95_low"] <= m["ssim"] <= m["ssim_ci95_high"]
    with open(multirun["low"] / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(saved)
    assert {"scored_on", "pixel_corr_ci95_low", "pixel_corr_ci95_high"} <= set(table[0])
    raw_mean = next(r for r in saved if r["scored_on"] == "raw" and r["label"] == "mean")
    disp_mean = next(r for r in saved if r["scored_on"] == "display" and r["label"] == "mean")
    assert raw_mean["pixel_corr"] != disp_mean["pixel_corr"]


def test_comparison_gallery(multirun):
    runs = find_runs([multirun["root"]])
    img = comparison_gallery(runs, labels=["img_b", "img_d"], cell=40)
    assert img.size == gallery_size(4, 2, 40)  # true + 3 runs, 2 labels
    assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 50


def test_cli_writes_outputs(multirun, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(multirun["root"]), "--out", str(out), "--cell", "32"]) == 0
    printed = capsys.readouterr().out
    for name in ("comparison.csv", "comparison.md", "comparison_gallery.png"):
        assert (out / name).is_file()
    md = (out / "comparison.md").read_text()
    assert md.startswith("| method | subject | ROI | layers | n | pixel r (95% CI) | "
                         "ident. acc. (corr) | ident. acc. (euclid) | SSIM |")
    assert "| icnn_dgn_gd | sub-01 | VC | conv1_1,fc8 | 5 | 0.9" in md
    assert "100.0%" in md
    assert md.splitlines()[0] in printed
    assert SCORED_ON_NOTE["display"] in printed
    with open(out / "comparison.csv", newline="") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == ["icnn_dgn_gd", "icnn_gd",
                                                             "icnn_lbfgs"]
    with Image.open(out / "comparison_gallery.png") as im:
        gallery = np.asarray(im.convert("RGB"))
    assert (gallery.shape[1], gallery.shape[0]) == gallery_size(4, len(LABELS), 32)
    assert gallery.std() > 10  # not blank


def test_cli_default_out_raw_and_labels(multirun, capsys):
    assert main([str(multirun["root"]), "--on", "raw", "--labels", "img_a,img_c"]) == 0
    assert SCORED_ON_NOTE["raw"] in capsys.readouterr().out
    with Image.open(multirun["root"] / "comparison_gallery.png") as im:
        assert im.size == gallery_size(4, 2, 96)


def test_run_without_stimuli(multirun, capsys):
    nostim = _make_run(multirun["root"] / "nostim", None, 20.0, "icnn_gd", roi="FFA",
                       true_dir=multirun["stimuli"])
    rows = score_run(nostim)
    assert len(rows) == len(LABELS)
    for r in rows:
        assert not set(METRIC_KEYS) & set(r)
        assert r["final_loss"] == pytest.approx(21.0)
        assert "stimul" in r["note"]
    s = summarize(rows)
    assert "pixel_corr" not in s and s["final_loss"] == pytest.approx(21.0)

    table = write_job_metrics(nostim)
    assert len(table) == len(LABELS) + 1 and table[-1]["label"] == "mean"

    runs = find_runs([multirun["root"]])
    assert len(runs) == 4
    cmp = {r["roi"]: r for r in compare(runs)}
    assert math.isnan(cmp["FFA"]["pixel_corr"]) and math.isnan(cmp["FFA"]["ident_corr"])
    assert cmp["FFA"]["final_loss"] == pytest.approx(21.0)

    assert main([str(multirun["root"]), "--cell", "24"]) == 0
    md = (multirun["root"] / "comparison.md").read_text()
    assert "| icnn_gd | sub-01 | FFA | all | 5 | - | - | - | - |" in md
    with Image.open(multirun["root"] / "comparison_gallery.png") as im:
        assert im.size == gallery_size(5, len(LABELS), 24)


def test_cli_missing_path(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "path not found" in err and "fix:" in err
    assert "\n" not in err and "Traceback" not in err


def test_cli_missing_stimulus_folder(multirun, capsys):
    info_path = multirun["low"] / "run_info.json"
    info = json.loads(info_path.read_text())
    info["stimuli"] = str(multirun["root"] / "moved")
    info_path.write_text(json.dumps(info))
    assert main([str(multirun["low"])]) == 2
    assert "run_info.json" in capsys.readouterr().err
