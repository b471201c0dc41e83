"""Re-score finished runs against their stimuli and compare runs (methods, subjects, ROIs).

A run directory is what one ``train_recon.py`` job leaves: ``run_info.json``,
``results.csv/json`` and ``<outputs>/recon_image-<label>.mat`` (raw reconstruction). A Hydra
multirun directory holds several run directories; :func:`find_runs` finds them all.

Scores are computed from the raw ``.mat`` reconstructions, either on the display image
(``on="display"``: 2/98 percentile clip + min-max to 0..255, as the lab scores) or on the raw
values (``on="raw"``). True images are the stimulus files resized (bicubic) to the encoder's
input size, read through :class:`icnn_pl.data.images.ImageFolder` as the pipeline does.

Command line::

    python -m icnn_pl.evaluate PATH [PATH ...] [--out DIR] [--on display|raw] [--labels a,b]

writes ``comparison.csv``, ``comparison.md`` and ``comparison_gallery.png`` into ``--out``
(default: the first PATH) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from icnn_pl.atomic import write_text_atomic
from icnn_pl.data.images import ImageFolder
from icnn_pl.data.matio import load_mat_dict
from icnn_pl.errors import ConfigError, DataError, IcnnError
from icnn_pl.gallery import make_gallery, save_png
from icnn_pl.image import display_image
from icnn_pl.metrics import mean_ci95, pixel_correlation, score_images
from icnn_pl.outputs import recon_mat_path, write_table

__all__ = [
    "METRICS",
    "SCORED_ON_NOTE",
    "comparison_gallery",
    "comparison_markdown",
    "compare",
    "find_runs",
    "main",
    "score_run",
    "summarize",
    "write_job_metrics",
]

RUN_INFO = "run_info.json"
#: Per-image metric columns of :func:`icnn_pl.metrics.score_images`, plus the final loss.
METRICS = ("pixel_corr", "ident_corr", "ident_euclid", "ssim", "rmse")
#: Feature-space fit columns a job adds (icnn_pl.feature_fit), summarised when present.
FEATURE_KEYS = ("feat_corr_target", "feat_corr_true", "ident_feat")
SUMMARY_KEYS = (*METRICS, *FEATURE_KEYS, "final_loss")
SCORING_MODES = ("display", "raw")
#: The line printed under the comparison table, per scoring mode.
SCORED_ON_NOTE = {
    "display": "scores on display images (2/98 percentile clip, min-max), as the lab scores",
    "raw": "scores on raw images (reconstructed values as optimised, not clipped)",
}
#: Columns of the gallery when no labels are given (a run may hold hundreds of images).
MAX_GALLERY_LABELS = 20


# --------------------------------------------------------------------------- loading


@dataclass
class _Run:
    """One run directory, read: settings, raw reconstructions, losses and true images."""

    path: Path
    info: dict[str, Any]
    recons: dict[str, np.ndarray] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)
    trues: dict[str, np.ndarray] = field(default_factory=dict)
    note: str | None = None  # why (some) images are not scored

    @property
    def layers(self) -> str:
        return _layers_str(self.info.get("layers"))

    @property
    def ident(self) -> dict[str, str]:
        return {k: str(self.info.get(k, "?")) for k in ("method", "subject", "roi")}

    @property
    def title(self) -> str:
        i = self.ident
        return f"{i['method']} {i['subject']} {i['roi']} [{self.layers}]"


def _layers_str(layers: Any) -> str:
    if layers is None:
        return "-"
    if isinstance(layers, list | tuple):
        return ",".join(str(x) for x in layers)
    return str(layers)


def _read_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_INFO
    if not path.is_file():
        raise DataError(f"{run_dir} is not a run directory (no {RUN_INFO})",
                        "pass a directory written by train_recon.py (or a multirun parent)")
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}",
                        "re-run the job (its run_info.json is written at the end)") from exc
    if not isinstance(info, dict):
        raise DataError(f"{path} does not hold a JSON object", "re-run the job")
    return info


def _outputs_dir(run_dir: Path, info: Mapping[str, Any]) -> Path:
    rel = info.get("outputs") or Path(str(info.get("subject", ""))) / str(info.get("roi", ""))
    return run_dir / rel


def _finished_labels(run_dir: Path, info: Mapping[str, Any]) -> list[str]:
    """Labels whose ``.mat`` exists: run_info's list, or every ``recon_image-*.mat``."""
    out = _outputs_dir(run_dir, info)
    listed = info.get("labels")
    if isinstance(listed, list) and listed:
        labels = [str(lab) for lab in listed]
    else:
        labels = sorted(p.stem.removeprefix("recon_image-") for p in out.glob("recon_image-*.mat"))
    labels = [lab for lab in labels if recon_mat_path(out, lab).is_file()]
    if not labels:
        raise DataError(f"run {run_dir} has no finished images in {out}",
                        "run (or resume) the job until at least one image is finished")
    return labels


def _load_run(run_dir: str | os.PathLike, labels: Sequence[str] | None = None) -> _Run:
    """Read a run's reconstructions (all finished ones, or ``labels``) and true images."""
    path = Path(run_dir)
    info = _read_info(path)
    run = _Run(path, info)
    finished = _finished_labels(path, info)
    if labels is not None:
        missing = [lab for lab in labels if lab not in finished]
        if missing:
            raise DataError(f"run {path} has no finished image(s) {missing[:5]}",
                            "pick labels that every compared run has finished")
        finished = list(labels)
    out = _outputs_dir(path, info)
    for lab in finished:
        data = load_mat_dict(recon_mat_path(out, lab))
        if "recon_image" not in data:
            raise DataError(f"{recon_mat_path(out, lab)} has no variable 'recon_image'",
                            "delete the file and resume the job to redo the image")
        run.recons[lab] = np.asarray(data["recon_image"], dtype=np.float64)
        hist = np.ravel(np.asarray(data.get("loss_history", []), dtype=np.float64))
        run.final_loss[lab] = float(hist[-1]) if hist.size else float("nan")

    stimuli = info.get("stimuli")
    if not stimuli:
        run.note = "no stimulus images (run_info.json 'stimuli' is null): not scored"
        return run
    first = next(iter(run.recons.values()))
    size = tuple(info.get("input_size") or first.shape[:2])
    try:
        folder = ImageFolder(stimuli, (int(size[0]), int(size[1])))
    except DataError as exc:
        raise DataError(f"run {path}: {exc.problem}",
                        f"restore the stimulus folder or edit 'stimuli' in {path / RUN_INFO}"
                        ) from exc
    run.trues = {lab: folder.image(lab) for lab in finished if lab in folder}
    if len(run.trues) < len(finished):
        run.note = f"no true image in {folder.folder}: not scored"
    return run


# --------------------------------------------------------------------------- scoring


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Every directory at or below ``paths`` that holds a ``run_info.json``, sorted."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"path not found: {p}",
                            "pass a run directory or a Hydra multirun directory that exists")
        if p.is_file():
            if p.name != RUN_INFO:
                raise DataError(f"{p} is a file, not a run directory",
                                "pass a run directory or a Hydra multirun directory")
            found.add(p.parent.resolve())
            continue
        found.update(f.parent.resolve() for f in p.rglob(RUN_INFO) if f.is_file())
    if not found:
        raise DataError(f"no run directories ({RUN_INFO}) found under "
                        f"{', '.join(str(p) for p in paths)}",
                        "pass the output directory of finished train_recon.py job(s)")
    return sorted(found)


def _check_on(on: str) -> None:
    if on not in SCORING_MODES:
        raise ConfigError(f"unknown scoring mode on={on!r}", "use on='display' or on='raw'")


def _score(run: _Run, on: str) -> list[dict[str, Any]]:
    _check_on(on)
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
    _check_on(on)
    return _score(_load_run(run_dir), on)


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


def write_job_metrics(run_dir: str | os.PathLike,
                      on: Sequence[str] = SCORING_MODES) -> list[dict[str, Any]]:
    """Write ``<run dir>/metrics.csv`` and ``metrics.json``; return their rows.

    Per-image rows for each scoring mode in ``on`` (column ``scored_on``), each mode followed
    by a summary row (label ``"mean"``, ``n_images`` and ``<metric>_ci95_low/high``). A run
    without true images gets its unscored rows once and one mean row (final loss only).
    Call it after the job has written ``run_info.json``.
    """
    modes = [on] if isinstance(on, str) else list(on)
    if not modes:
        raise ConfigError("write_job_metrics got no scoring modes", "use on=('display', 'raw')")
    for m in modes:
        _check_on(m)
    run = _load_run(run_dir)
    table: list[dict[str, Any]] = []
    if not run.trues:
        rows = _score(run, modes[0])
        table = [*rows, _mean_row(rows, None)]
    else:
        for m in modes:
            rows = _score(run, m)
            table += [*rows, _mean_row([r for r in rows if "scored_on" in r], m)]
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
    _check_on(on)
    paths = [Path(p).resolve() for p in run_dirs]
    if not paths:
        raise DataError("compare got no run directories", "pass at least one (see find_runs)")
    base = Path(root).resolve() if root is not None else Path(
        os.path.commonpath([p.parent for p in paths]))
    out = []
    for path in paths:
        run = _load_run(path)
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


def _fmt(v: Any, spec: str) -> str:
    return "-" if not _is_number(v) or not math.isfinite(v) else format(v, spec)


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The :func:`compare` rows as a Markdown table (identification accuracy in percent)."""
    head = ["method", "subject", "ROI", "layers", "n", "pixel r (95% CI)",
            "ident. acc. (corr)", "ident. acc. (euclid)", "SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        r_ci = _fmt(r.get("pixel_corr"), ".3f")
        if r_ci != "-":
            r_ci += (f" ({_fmt(r.get('pixel_corr_ci95_low'), '.3f')}.."
                     f"{_fmt(r.get('pixel_corr_ci95_high'), '.3f')})")
        cells = [r["method"], r["subject"], r["roi"], r["layers"], str(r["n_images"]), r_ci,
                 _fmt(r.get("ident_corr"), ".1%"), _fmt(r.get("ident_euclid"), ".1%"),
                 _fmt(r.get("ssim"), ".3f")]
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
    _check_on(on)
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise DataError("comparison_gallery got no run directories",
                        "pass at least one (see find_runs)")
    if labels is None:
        finished = [_finished_labels(p, _read_info(p)) for p in paths]
        common = [lab for lab in finished[0] if all(lab in f for f in finished[1:])]
        if not common:
            raise DataError("the runs have no finished image label in common",
                            "compare runs of the same images, or pass labels=[...]")
        labels = common[:MAX_GALLERY_LABELS]
    labels = list(labels)
    if not labels:
        raise DataError("comparison_gallery got an empty label list", "pass at least one label")
    runs = [_load_run(p, labels) for p in paths]

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


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m icnn_pl.evaluate",
        description="Compare finished reconstruction runs: writes comparison.csv, "
                    "comparison.md and comparison_gallery.png.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="run directories or Hydra multirun directories (searched recursively)")
    p.add_argument("--out", default=None, help="output directory (default: the first PATH)")
    p.add_argument("--on", choices=SCORING_MODES, default="display",
                   help="score the display image (default, as the lab) or the raw image")
    p.add_argument("--labels", default=None,
                   help="comma-separated image labels for the gallery (default: common ones)")
    p.add_argument("--cell", type=int, default=96, help="gallery cell size in pixels")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a data or config error)."""
    args = _parser().parse_args(argv)
    try:
        runs = find_runs(args.paths)
        out = Path(args.out) if args.out else Path(args.paths[0])
        if out.is_file():
            out = out.parent
        labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
        rows = compare(runs, on=args.on)
        table = comparison_markdown(rows)
        gallery = comparison_gallery(runs, labels=labels, cell=args.cell, on=args.on)
        write_table(out / "comparison.csv", rows)
        write_text_atomic(out / "comparison.md",
                          f"{table}\n{SCORED_ON_NOTE[args.on]}.\n")
        save_png(gallery, out / "comparison_gallery.png")
    except (DataError, ConfigError) as exc:
        fix = f" (fix: {exc.fix})" if exc.fix else ""
        print(f"error: {exc.problem}{fix}".replace("\n", " "), file=sys.stderr)
        return 2
    except IcnnError as exc:  # e.g. WeightsError: still a one-line message
        print(f"error: {str(exc)}".replace("\n", " "), file=sys.stderr)
        return 1
    print(table)
    print(f"{SCORED_ON_NOTE[args.on]}.")
    print(f"{len(rows)} run(s); wrote comparison.csv, comparison.md, comparison_gallery.png "
          f"to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
