"""Scores and comparisons of finished runs (methods, subjects, ROIs), as tables and a gallery.

Scores are computed from the raw reconstructions, either on the display image
(``on="display"``: 2/98 percentile clip + min-max to 0..255, as the lab scores) or on the raw
values (``on="raw"``). The same code scores a job's images when the job ends (from memory)
and a run re-read from disk (``python -m icnn_pl.evaluate``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from icnn_pl.errors import ConfigError, DataError
from icnn_pl.image import display_image
from icnn_pl.pipeline.outputs import write_table
from icnn_pl.review.gallery import make_gallery
from icnn_pl.review.metrics import (
    SCORING_MODES,
    check_scoring_mode,
    mean_ci95,
    pixel_correlation,
    score_images,
)
from icnn_pl.review.runs import Run, finished_labels, load_run, read_info

__all__ = [
    "METRICS",
    "SCORED_ON_NOTE",
    "comparison_gallery",
    "comparison_markdown",
    "compare",
    "format_cell",
    "metrics_table",
    "score_run",
    "summarize",
    "write_job_metrics",
]

#: Per-image metric columns of :func:`icnn_pl.review.metrics.score_images`, plus the final loss.
METRICS = ("pixel_corr", "ident_corr", "ident_euclid", "ssim", "rmse")
#: Feature-space fit columns a job adds (icnn_pl.review.feature_fit), summarised when present.
FEATURE_KEYS = ("feat_corr_target", "feat_corr_true", "ident_feat")
SUMMARY_KEYS = (*METRICS, *FEATURE_KEYS, "final_loss")
#: The line printed under the comparison table, per scoring mode.
SCORED_ON_NOTE = {
    "display": "scores on display images (2/98 percentile clip, min-max), as the lab scores",
    "raw": "scores on raw images (reconstructed values as optimised, not clipped)",
}
#: Columns of the gallery when no labels are given (a run may hold hundreds of images).
MAX_GALLERY_LABELS = 20


def _score(run: Run, on: str) -> list[dict[str, Any]]:
    check_scoring_mode(on)
    scores: dict[str, dict[str, Any]] = {}
    if run.trues:
        recons = {lab: run.recons[lab] for lab in run.trues}
        scores = {s.pop("label"): s for s in score_images(recons, run.trues, on=on)}
    rows = []
    for lab in run.recons:
        row: dict[str, Any] = {"label": lab, **run.ident, "layers": run.layers}
        if lab in scores:
            row["scored_on"] = on
            row.update(scores[lab])
        row["final_loss"] = run.final_loss[lab]
        if lab not in scores:
            row["note"] = run.note
        rows.append(row)
    return rows


def score_run(run_dir: str | os.PathLike, on: str = "display") -> list[dict[str, Any]]:
    """Re-score a run's finished images against its stimuli, one row per image.

    Rows hold ``label, method, subject, roi, layers, scored_on``, the :data:`METRICS` and
    ``final_loss``. Images without a true image (e.g. ``stimuli`` is null) get only
    ``final_loss`` and a ``note``. ``on`` is ``"display"`` or ``"raw"``.
    """
    check_scoring_mode(on)
    return _score(load_run(run_dir), on)


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Means and 95% intervals of each metric over one run's image rows.

    Returns ``n_images`` and, for every key of :data:`SUMMARY_KEYS` found in the rows,
    ``<key>``, ``<key>_ci95_low`` and ``<key>_ci95_high`` (NaN values are ignored).
    Rows labelled ``"mean"`` (summary rows) are skipped.
    """
    rows = [r for r in rows if r.get("label") != "mean"]
    modes = {r["scored_on"] for r in rows if r.get("scored_on")}
    if len(modes) > 1:
        raise DataError(f"rows mix scoring modes {sorted(modes)}",
                        "summarise the rows of one scored_on value at a time")
    summary: dict[str, Any] = {"n_images": len(rows)}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in rows if _is_number(r.get(key))]
        if values:
            m, lo, hi = mean_ci95(values)
            summary.update({key: m, f"{key}_ci95_low": lo, f"{key}_ci95_high": hi})
    return summary


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.floating | np.integer) and not isinstance(v, bool)


def _mean_row(rows: Sequence[Mapping[str, Any]], on: str | None) -> dict[str, Any]:
    first = rows[0]
    row = {"label": "mean", **{k: first.get(k) for k in ("method", "subject", "roi", "layers")}}
    if on is not None:
        row["scored_on"] = on
    return {**row, **summarize(rows)}


def metrics_table(run: Run, on: Sequence[str] | str = SCORING_MODES) -> list[dict[str, Any]]:
    """The rows of ``metrics.csv``: per-image rows for each scoring mode in ``on`` (column
    ``scored_on``), each mode followed by a summary row (label ``"mean"``, ``n_images`` and
    ``<metric>_ci95_low/high``). A run without true images gets its unscored rows once and
    one mean row (final loss only)."""
    modes = [on] if isinstance(on, str) else list(on)
    if not modes:
        raise ConfigError("metrics_table got no scoring modes", "use on=('display', 'raw')")
    for m in modes:
        check_scoring_mode(m)
    if not run.trues:
        rows = _score(run, modes[0])
        return [*rows, _mean_row(rows, None)]
    table: list[dict[str, Any]] = []
    for m in modes:
        rows = _score(run, m)
        table += [*rows, _mean_row([r for r in rows if "scored_on" in r], m)]
    return table


def write_job_metrics(run: str | os.PathLike | Run,
                      on: Sequence[str] | str = SCORING_MODES) -> list[dict[str, Any]]:
    """Write ``<run dir>/metrics.csv`` and ``metrics.json`` (:func:`metrics_table`); return
    their rows. ``run`` is a run directory (read back; call it after the job has written
    ``run_info.json``) or a :class:`~icnn_pl.review.runs.Run` already in memory (a job's own
    images at its end: nothing is read again)."""
    run = run if isinstance(run, Run) else load_run(run)
    table = metrics_table(run, on)
    write_table(run.path / "metrics.csv", table)
    write_table(run.path / "metrics.json", table)
    return table


# --------------------------------------------------------------------------- comparison


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def compare(run_dirs: Sequence[str | os.PathLike], on: str = "display",
            root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One summary row per run, sorted by method, subject, roi, layers (then run).

    Columns: ``method, subject, roi, layers, n_images, scored_on, pixel_corr,
    pixel_corr_ci95_low, pixel_corr_ci95_high, ident_corr, ident_euclid, ssim, rmse,
    final_loss, run``; metrics a run cannot have (no stimuli) are NaN. ``run`` is the path
    relative to ``root`` (default: the common parent of the run directories).
    """
    check_scoring_mode(on)
    paths = [Path(p).resolve() for p in run_dirs]
    if not paths:
        raise DataError("compare got no run directories", "pass at least one (see find_runs)")
    base = Path(root).resolve() if root is not None else Path(
        os.path.commonpath([p.parent for p in paths]))
    out = []
    for path in paths:
        run = load_run(path)
        s = summarize(_score(run, on))
        nan = float("nan")
        out.append({
            **run.ident, "layers": run.layers, "n_images": s["n_images"],
            "scored_on": on if "pixel_corr" in s else None,
            "pixel_corr": s.get("pixel_corr", nan),
            "pixel_corr_ci95_low": s.get("pixel_corr_ci95_low", nan),
            "pixel_corr_ci95_high": s.get("pixel_corr_ci95_high", nan),
            **{k: s.get(k, nan) for k in ("ident_corr", "ident_euclid", "ssim", "rmse",
                                            "final_loss")},
            "run": _relative(path, base),
        })
    return sorted(out, key=lambda r: (r["method"], r["subject"], r["roi"], r["layers"], r["run"]))


def format_cell(v: Any, spec: str) -> str:
    """A table cell: a number with ``spec``, a string as it is, "-" for missing / NaN."""
    if isinstance(v, str):
        return v
    return "-" if not _is_number(v) or not math.isfinite(v) else format(v, spec)


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The :func:`compare` rows as a Markdown table (identification accuracy in percent)."""
    head = ["method", "subject", "ROI", "layers", "n", "pixel r (95% CI)",
            "ident. acc. (corr)", "ident. acc. (euclid)", "SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        r_ci = format_cell(r.get("pixel_corr"), ".3f")
        if r_ci != "-":
            r_ci += (f" ({format_cell(r.get('pixel_corr_ci95_low'), '.3f')}.."
                     f"{format_cell(r.get('pixel_corr_ci95_high'), '.3f')})")
        cells = [r["method"], r["subject"], r["roi"], r["layers"], str(r["n_images"]), r_ci,
                 format_cell(r.get("ident_corr"), ".1%"), format_cell(r.get("ident_euclid"), ".1%"),
                 format_cell(r.get("ssim"), ".3f")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_gallery(run_dirs: Sequence[str | os.PathLike],
                       labels: Sequence[str] | None = None, cell: int = 96,
                       on: str = "display") -> Image.Image:
    """The same images as reconstructed by each run.

    First row ``"true"`` (when any run has stimuli), then one row per run titled
    ``"<method> <subject> <roi> [<layers>]"``; columns are ``labels`` or the labels every run
    has finished (first :data:`MAX_GALLERY_LABELS`). Each cell is captioned with its pixel
    correlation (on the display or raw image per ``on``), or the final loss when unscored.
    """
    check_scoring_mode(on)
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise DataError("comparison_gallery got no run directories",
                        "pass at least one (see find_runs)")
    if labels is None:
        finished = [finished_labels(p, read_info(p)) for p in paths]
        common = [lab for lab in finished[0] if all(lab in f for f in finished[1:])]
        if not common:
            raise DataError("the runs have no finished image label in common",
                            "compare runs of the same images, or pass labels=[...]")
        labels = common[:MAX_GALLERY_LABELS]
    labels = list(labels)
    if not labels:
        raise DataError("comparison_gallery got an empty label list", "pass at least one label")
    runs = [load_run(p, labels) for p in paths]

    trues: dict[str, np.ndarray] = {}
    for run in runs:
        for lab, t in run.trues.items():
            trues.setdefault(lab, t)
    grid: list[tuple[str, list[np.ndarray | None]]] = []
    captions: list[list[str | None]] = []
    if trues:
        grid.append(("true", [None if lab not in trues else
                              np.clip(trues[lab], 0, 255).astype(np.uint8) for lab in labels]))
        captions.append([None] * len(labels))
    for run in sorted(runs, key=lambda r: (*r.ident.values(), r.layers, str(r.path))):
        grid.append((run.title, [run.recons[lab] for lab in labels]))
        row_captions: list[str | None] = []
        for lab in labels:
            recon = run.recons[lab]
            if lab in run.trues:
                shown = display_image(recon) if on == "display" else recon
                row_captions.append(f"r={pixel_correlation(shown, run.trues[lab]):.2f}")
            else:
                row_captions.append(f"loss={run.final_loss[lab]:.3g}")
        captions.append(row_captions)
    return make_gallery(grid, labels, captions, cell=cell)
