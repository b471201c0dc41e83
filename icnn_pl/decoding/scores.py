"""The lab's decoding scores, a table over every decoded layer and a figure.

- profile correlation: per unit, Pearson r across the test images (units constant in
  either the prediction or the truth are left out), averaged;
- pattern correlation: per image, r across units after subtracting the training mean
  ``y_mean`` from both, averaged;
- pairwise identification: per image, the fraction of the other test images whose true
  features correlate less with its prediction than its own (chance 50 %).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from icnn_pl.atomic import atomic_path, write_text_atomic
from icnn_pl.review.metrics import correlation_matrix, pairwise_identification


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of ``a`` with the same row of ``b`` (NaN for a constant row)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / den, np.nan)


def decoding_scores(pred: np.ndarray, true: np.ndarray, y_mean: np.ndarray) -> dict[str, float]:
    """Profile r, pattern r and pairwise identification of ``pred`` vs ``true`` (images x
    units)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    profile = _corr_rows(pred.T, true.T)
    p, t = pred - y_mean, true - y_mean
    # images x images correlations: the pattern r on the diagonal, and the lab's pairwise
    # identification (review.metrics: ties count as failures, constant rows left out)
    S = correlation_matrix(p, t)
    pattern = np.diag(S)
    ident = np.nanmean(pairwise_identification(S)) if len(S) > 1 else np.nan
    return {"profile_r": float(np.nanmean(profile)) if np.isfinite(profile).any() else np.nan,
            "pattern_r": float(np.nanmean(pattern)), "ident_acc": float(ident)}


COLUMNS = ("layer", "subject", "roi", "units", "voxels", "k", "alpha", "profile_r",
           "pattern_r", "ident_acc", "seconds", "device")


def collect(out: Path) -> list[dict]:
    """Every finished layer's ``model/info.json`` under ``out``."""
    rows = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*/*/*/model/info.json"))]
    return rows


def write_table(out: Path, layer_order: list[str]) -> Path:
    """``<out>/evaluation.csv`` (and ``.png``) over every finished layer, subject and ROI."""
    rank = {n: i for i, n in enumerate(layer_order)}
    rows = sorted(collect(out), key=lambda r: (r["subject"], r["roi"],
                                               rank.get(r["layer"], 99), r["layer"]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(Path(out) / "evaluation.csv", buf.getvalue())
    scored = [r for r in rows if "profile_r" in r]
    if scored:
        figure(scored, Path(out) / "evaluation.png", rank)
    return Path(out) / "evaluation.csv"


def figure(rows: list[dict], path: Path, rank: dict[str, int]) -> None:
    """Profile r, pattern r and identification by layer, one line per subject/ROI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["subject"], r["roi"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    titles = {"profile_r": "profile correlation", "pattern_r": "pattern correlation",
              "ident_acc": "pairwise identification"}
    for ax, (col, title) in zip(axes, titles.items(), strict=True):
        for key in keys:
            sel = sorted((r for r in rows if (r["subject"], r["roi"]) == key),
                         key=lambda r: rank.get(r["layer"], 99))
            ax.plot([r["layer"] for r in sel], [r[col] for r in sel], marker="o",
                    label=" ".join(key))
        if col == "ident_acc":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=70, labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
