"""The end of a job: its tables, scores, figures, logged summary and printed table.

Every finished image of the job is reported, other shards' too: shards share the job's
directory and whichever ends last leaves complete tables. Each image is scored once, from
memory, by the same code that re-scores finished runs (``icnn_pl.review``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from icnn_pl.atomic import write_text_atomic
from icnn_pl.engine.flat_loss import loss_fell
from icnn_pl.image import display_image
from icnn_pl.pipeline import loggers
from icnn_pl.pipeline.outputs import RUN_INFO, write_table
from icnn_pl.review.compare import METRICS, format_cell, summarize, write_job_metrics
from icnn_pl.review.feature_fit import from_mat_vars, identification_by_features, summarize_fit
from icnn_pl.review.gallery import loss_curves_image, make_gallery, save_png
from icnn_pl.review.runs import Run

if TYPE_CHECKING:
    from icnn_pl.pipeline.job import Job

Variables = dict[str, Any]  # the variables of a finished image's .mat


@dataclass
class JobSummary:
    rows: list[dict[str, Any]]
    failures: dict[str, str]
    skipped: list[str]
    summary: dict[str, float]
    objective: float  # mean pixel correlation when true images exist, else mean final loss


def result_row(job: Job, label: str, history: np.ndarray, n_evals: int,
               seconds: float = float("nan"), stop_reason: str = "") -> dict[str, Any]:
    """An image's row of ``results.csv`` (scores are added when the job ends)."""
    return {"label": label, "method": job.method, "subject": job.subject, "roi": job.roi,
            "final_loss": float(np.ravel(history)[-1]), "iterations": job.recipe.n_iter,
            "function_evals": int(n_evals), "seconds": seconds,
            "stop_reason": stop_reason,
            # None where nothing was optimised (dgn_direct): not a loss that failed to fall
            "loss_fell": loss_fell(history) if job.recipe.n_iter > 0 else None}


def mat_text(value: Any) -> str:
    """A string variable as read back from a .mat (a 1-element array), "" if absent."""
    return "" if value is None else str(np.ravel(value)[0]) if np.size(value) else ""



def write_report(job: Job, images: dict[str, Variables], rows: dict[str, dict[str, Any]],
                 failures: dict[str, str], done: list[str],
                 job_failures: Mapping[str, str],
                 held_trues: Mapping[str, np.ndarray | None]) -> JobSummary:
    """Tables, scores and figures over every finished image of the job. ``images`` holds
    the variables of the images this process finished or read; those of other shards are
    read here, once. ``failures`` are this process's (its exit code); ``job_failures``
    every shard's, listed in ``run_info.json`` and the printed summary. ``held_trues``: the
    true images already loaded with this process's batches; the others are read here."""
    dm, out = job.datamodule, job.outputs
    labels = [lab for lab in dm.job_labels
              if lab in images or (lab not in failures and out.is_done(lab))]
    for lab in labels:
        if lab not in images:  # finished by another shard
            images[lab] = out.read(lab)
    recons = {lab: images[lab]["recon_image"] for lab in labels}
    histories = {lab: np.ravel(images[lab]["loss_history"]) for lab in labels}
    for lab in labels:
        if lab not in rows:  # finished by an earlier run
            rows[lab] = result_row(job, lab, histories[lab], len(histories[lab]),
                                   stop_reason=mat_text(images[lab].get("stop_reason")))
    trues = {lab: t for lab in labels if (t := held_trues[lab] if lab in held_trues
                                          else dm.true_image(lab)) is not None}
    table = [rows[lab] for lab in labels]
    info = _run_info(job, labels, job_failures)
    if trues:  # per-image and mean scores on display and raw images, with 95% intervals
        run = Run(out.run_dir, info, recons=recons, trues=trues,
                  final_loss={lab: float(h[-1]) for lab, h in histories.items()},
                  note=None if len(trues) == len(labels) else
                  f"no true image in {info['stimuli']}: not scored")
        for r in write_job_metrics(run):
            if r.get("scored_on") == "display" and r["label"] in rows:
                rows[r["label"]].update({k: v for k, v in r.items() if k in METRICS})
    _feature_fit(job, labels, images, rows)
    summary = summarize(table)
    seconds = [r["seconds"] for r in table if np.isfinite(r.get("seconds", np.nan))]
    if seconds:
        summary["seconds"] = float(np.mean(seconds))
    write_table(out.run_dir / "results.csv", table)
    write_table(out.run_dir / "results.json", table)
    write_text_atomic(out.run_dir / RUN_INFO, json.dumps(info, indent=2, default=str))
    figures = _figures(out.run_dir, labels, recons, trues, histories, rows)
    loggers.log_summary(job.logger, table,
                        {lab: (display_image(recons[lab]), trues.get(lab)) for lab in labels},
                        summary, figures)
    _print_summary(job, table, summary, job_failures)
    objective = summary.get("pixel_corr", summary.get("final_loss", float("nan")))
    return JobSummary(table, failures, done, summary, float(objective))


def _run_info(job: Job, labels: list[str], failures: Mapping[str, str]) -> dict[str, Any]:
    """``run_info.json``: what the job was; it makes its directory a run for the review."""
    out, stimuli = job.outputs, job.datamodule.stimuli
    return {"method": job.method, "subject": job.subject, "roi": job.roi,
            "outputs": str(out.dir.relative_to(out.run_dir)),
            "stimuli": None if stimuli is None else str(stimuli.folder.resolve()),
            "input_size": list(job.encoder.input_size), "labels": labels,
            "failures": dict(failures), **job.info}


def _feature_fit(job: Job, labels: list[str], images: Mapping[str, Variables],
                 rows: dict[str, dict[str, Any]]) -> None:
    """Per-layer feature fit (``feature_fit.csv``), its means in the results, and
    identification by ``job.ident_layer`` features, from what each image's file holds."""
    per_layer, ident = [], {}
    for lab in labels:
        fit = from_mat_vars(images[lab])
        if fit is None:  # finished before feature fit was on
            continue
        layer_rows, ident[lab] = fit
        per_layer += [{"label": lab, **r} for r in layer_rows]
        rows[lab].update(summarize_fit(layer_rows))
    for lab, acc in identification_by_features(ident).items():
        rows[lab]["ident_feat"] = acc
    if per_layer:
        write_table(job.outputs.run_dir / "feature_fit.csv", per_layer)


def _figures(run_dir: Path, labels: list[str], recons: Mapping[str, np.ndarray],
             trues: Mapping[str, np.ndarray], histories: Mapping[str, np.ndarray],
             rows: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``gallery.png`` (true images above reconstructions) and ``loss_curves.png``."""
    if not labels:
        return {}
    grid = []
    if trues:
        grid.append(("true", [trues.get(lab) for lab in labels]))
    grid.append(("reconstruction", [display_image(recons[lab]) for lab in labels]))
    captions = [[None] * len(labels)] * (len(grid) - 1) + [[
        f"r={rows[lab]['pixel_corr']:.2f}" if "pixel_corr" in rows[lab] else
        f"loss={rows[lab]['final_loss']:.3g}" for lab in labels]]
    gallery = make_gallery(grid, labels, captions)
    curves = loss_curves_image(histories)
    save_png(gallery, run_dir / "gallery.png")
    save_png(curves, run_dir / "loss_curves.png")
    return {"gallery": np.asarray(gallery), "loss_curves": np.asarray(curves)}


SUMMARY_COLUMNS = (("label", ""), ("final_loss", ".4g"), ("pixel_corr", ".3f"),
                   ("ident_corr", ".2f"), ("ssim", ".3f"), ("feat_corr_target", ".3f"),
                   ("ident_feat", ".2f"), ("seconds", ".1f"))


def _print_summary(job: Job, table: list[dict[str, Any]], summary: Mapping[str, float],
                   failures: Mapping[str, str]) -> None:
    cols = [(k, spec) for k, spec in SUMMARY_COLUMNS if any(k in r for r in table)]
    lines = ["  ".join(f"{k:>14}" for k, _ in cols)]
    for r in table:
        lines.append("  ".join(f"{format_cell(r.get(k), spec):>14}" for k, spec in cols))
    lines.append("  ".join(f"{format_cell(summary.get(k), spec) if k != 'label' else 'mean':>14}"
                           for k, spec in cols))
    head = (f"{job.method} | {job.subject} | {job.roi}: {len(table)} images"
            f" ({len(failures)} failed) -> {job.outputs.run_dir}")
    if any("pixel_corr" in r for r in table):
        lines.append("pixel_corr / ident_corr / ssim: display images (2/98 percentile clip,"
                     " min-max), as the lab scores; metrics.csv also has raw-image scores")
    print("\n" + head + "\n" + "\n".join(lines))
    for lab, why in failures.items():
        print(f"FAILED {lab}: {why}")
    flat = [r for r in table if r.get("loss_fell") is False]
    if flat:
        print(f"WARNING: the loss did not fall for {len(flat)} image(s) (the result is its"
              " initial image): " + "; ".join(f"{r['label']} ({r.get('stop_reason') or '?'})"
                                              for r in flat))
    if (hint := random_generator_hint(job.info)) is not None:
        print(hint)


def random_generator_hint(info: Mapping[str, Any]) -> str | None:
    """The summary's pointer to the weight-free prior when a DGN method ran a random
    generator (no weight file, e.g. the demo), whose images are noise by nature."""
    if not info.get("generator") or info.get("generator_weights"):
        return None
    return ("NOTE: the generator has no weight file (generator.weights=null): it is a seeded"
            " RANDOM network, so its images are noise - that is what a random generator"
            " gives, not a fault. For an image prior that needs no weights, run"
            " method=icnn_fourier; for the paper's DGN, set generator.weights=<generator.pt>.")
