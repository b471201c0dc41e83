"""A job: reconstruct every selected image of one (method, subject, ROI), resumably.

Plain objects in, files out: the Hydra entry point, the tests and scripts share this path.
The frozen networks are built once per job; each image batch gets a fresh module and a
fresh lean Trainer. Finished images are skipped on a re-run; a failing image is reported
and the job goes on (unless ``fail_fast``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import Logger
from tqdm.auto import tqdm

from icnn_pl import interrupt, loggers
from icnn_pl.atomic import write_text_atomic
from icnn_pl.build import build_reconstruction
from icnn_pl.data.datamodule import FailedBatch, ReconDataModule
from icnn_pl.errors import DataError, IcnnError
from icnn_pl.evaluate import summarize, write_job_metrics
from icnn_pl.feature_fit import (
    from_mat_vars,
    identification_by_features,
    image_feature_fit,
    summarize_fit,
    to_mat_vars,
)
from icnn_pl.gallery import loss_curves_image, make_gallery, save_png
from icnn_pl.image import display_image, from_caffe
from icnn_pl.metrics import score_images
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.outputs import ReconOutputs, write_table
from icnn_pl.runner import fit

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything one job needs, built once (networks, data, recipe, outputs, logger)."""

    datamodule: ReconDataModule
    encoder: FeatureEncoder
    recipe: dict[str, Any]  # build_reconstruction keyword arguments (optimizer, steps, ...)
    outputs: ReconOutputs
    method: str
    subject: str
    roi: str
    trainer_args: dict[str, Any] = field(default_factory=dict)
    logger: Logger | None = None
    resume: bool = True
    fail_fast: bool = False
    seed: int = 0
    progress: bool = True
    snapshot_every: int = 0  # save a display image every K iterations (0: off)
    info: dict[str, Any] = field(default_factory=dict)  # settings recorded in run_info.json
    feature_fit: bool = True  # score features of the results against targets / true images
    ident_layer: str | None = None  # layer for identification by features (e.g. fc7)


@dataclass
class JobSummary:
    rows: list[dict[str, Any]]
    failures: dict[str, str]
    skipped: list[str]
    summary: dict[str, float]
    objective: float  # mean pixel correlation when true images exist, else mean final loss


class _IterationProgress(pl.Callback):
    """Shows the iteration and loss of the image in flight on the job's progress bar."""

    def __init__(self, bar: tqdm, every: int = 10) -> None:
        self.bar, self.every = bar, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if module.runs_to_completion or step % self.every and step != module.n_steps:
            return
        last = module.last_loss
        loss = float(last.sum()) if last is not None else float("nan")
        self.bar.set_postfix_str(f"it {step}/{module.n_steps} loss={loss:.4g}")


class _Snapshots(pl.Callback):
    """Saves display images of the reconstruction every ``every`` iterations (GD methods)
    to ``<subject>/<roi>/snapshots/<label>/<iteration>.png``."""

    def __init__(self, outputs: ReconOutputs, labels: list[str], every: int) -> None:
        self.outputs, self.labels, self.every = outputs, labels, every

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if module.runs_to_completion or step % self.every:
            return
        images = from_caffe(module(), module.encoder.mean_bgr)
        for label, image in zip(self.labels, images, strict=True):
            path = self.outputs.dir / "snapshots" / label / f"{step:05d}.png"
            save_png(Image.fromarray(display_image(image)), path)


def run_job(job: Job) -> JobSummary:
    """Run every pending image of the job, then score, summarise and log."""
    dm, out = job.datamodule, job.outputs
    dm.setup("predict")
    done = _finished(job)
    pending = [lab for lab in dm.labels if lab not in done]
    if done:
        log.info("resuming: %d of %d images already finished in %s (skipped)",
                 len(done), len(dm.labels), out.dir)
    failures = _check_files(job, pending)
    pending = [lab for lab in pending if lab not in failures]
    rows: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(dm.labels), initial=len(done) + len(failures), unit="img",
               disable=not job.progress, desc=f"{job.method} {job.subject} {job.roi}",
               dynamic_ncols=True)
    with interrupt.deferred_sigint(), _long_lived_objects_frozen():
        for batch in dm.predict_dataloader(pending):
            interrupt.check()
            try:
                if isinstance(batch, FailedBatch):
                    raise batch.error
                rows.update(_reconstruct(job, batch, step=len(rows), bar=bar))
                # The finished module and its Trainer reference each other: without this,
                # each image's targets (~60 MB at 224 px, all layers) wait for Python's
                # rare full collection and a long job's memory grows image by image.
                gc.collect()
            except IcnnError as exc:
                if job.fail_fast:
                    raise
                for lab in batch.labels:
                    failures[lab] = str(exc).splitlines()[0]
                    log.error("image %s failed: %s", lab, exc)
            bar.update(len(batch.labels))
    bar.close()
    return _finish(job, rows, failures, done)


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """Keep the networks, libraries and config out of the garbage collector's scans while
    the images run: the job collects after every image (to free the finished module), and
    over these ~400k objects that would cost ~0.3 s instead of < 1 ms."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _finished(job: Job) -> list[str]:
    """Labels finished by an earlier run (resume). A finished file that does not read back
    (written by something else, or a disk error) is reported and its image redone."""
    if not job.resume:
        return []
    done = []
    for lab in job.datamodule.labels:
        if not job.outputs.is_done(lab):
            continue
        try:
            job.outputs.read(lab)
        except DataError as exc:
            log.warning("%s; recomputing image %s", exc.problem, lab)
            continue
        done.append(lab)
    return done


def _check_files(job: Job, pending: list[str]) -> dict[str, str]:
    """Check every pending image's feature files from their headers before any work.

    Images with a problem are reported now and skipped (label -> reason). When no image
    could run, or with ``fail_fast``, the job stops here with the first problem.
    """
    problems = job.datamodule.check(pending)
    if not problems:
        return {}
    if job.fail_fast or len(problems) == len(pending):
        first, more = next(iter(problems.values())), len(problems) - 1
        raise DataError(first.problem + (f" (and {more} more image(s) with problems)"
                                         if more else ""), first.fix)
    for lab, exc in problems.items():
        log.error("image %s failed: %s", lab, exc)
    return {lab: str(exc).splitlines()[0] for lab, exc in problems.items()}


def _reconstruct(job: Job, batch, step: int, bar: tqdm) -> dict[str, dict[str, Any]]:
    t0 = time.perf_counter()
    module = build_reconstruction(
        batch.targets, job.encoder, weights=batch.weights, labels=batch.labels,
        seed=job.seed, **job.recipe)
    callbacks: list[pl.Callback] = [_IterationProgress(bar)] if job.progress else []
    if job.snapshot_every > 0:
        callbacks.append(_Snapshots(job.outputs, batch.labels, job.snapshot_every))
    result = fit(module, logger=job.logger, callbacks=callbacks, **job.trainer_args)
    seconds = (time.perf_counter() - t0) / len(batch.labels)
    rows = {}
    for i, label in enumerate(batch.labels):
        image, history = result.images[i], result.loss_history[i]
        if not np.isfinite(image).all():
            raise DataError(f"image {label}: the reconstruction diverged (NaN/inf pixels)",
                            "lower the learning rate or check the targets")
        code = None if result.codes is None else result.codes[i]
        true = batch.true_images[i]
        meta = {"method": job.method, "subject": job.subject, "roi": job.roi}
        if job.feature_fit:  # while the targets are at hand: a resumed job needs no re-read
            targets = {n: t[i].numpy() for n, t in batch.targets.items()}
            meta.update(to_mat_vars(*image_feature_fit(
                job.encoder, image, targets, true, job.ident_layer)))
        job.outputs.write(label, image, history, code, meta=meta)
        rows[label] = {
            "label": label, "method": job.method, "subject": job.subject, "roi": job.roi,
            "final_loss": float(history[-1]), "iterations": job.recipe["n_iter"],
            "function_evals": int(result.n_evals), "seconds": round(seconds, 3),
        }
        if module.runs_to_completion:
            loggers.log_curve(job.logger, label, history)
        loggers.log_image(job.logger, label, display_image(image),
                          None if true is None else true.astype(np.uint8), step + i)
        log.info("%s: final loss %.6g after %d evaluations, %.1f s",
                 label, history[-1], result.n_evals, seconds)
    return rows


def _finish(job: Job, rows: dict[str, dict[str, Any]], failures: dict[str, str],
            done: list[str]) -> JobSummary:
    dm, out = job.datamodule, job.outputs
    # Every finished image of the job, other shards' too: shards share the job's directory
    # and whichever ends last leaves complete tables.
    labels = [lab for lab in dm.job_labels
              if lab in rows or (lab not in failures and out.is_done(lab))]
    recons, histories, mats = {}, {}, {}
    for lab in labels:
        data = mats[lab] = out.read(lab)
        recons[lab] = data["recon_image"]
        histories[lab] = np.ravel(data["loss_history"])
        if lab not in rows:  # finished by an earlier run
            rows[lab] = {"label": lab, "method": job.method, "subject": job.subject,
                         "roi": job.roi, "final_loss": float(histories[lab][-1]),
                         "iterations": job.recipe["n_iter"],
                         "function_evals": len(histories[lab]), "seconds": float("nan")}
    trues = {lab: dm.true_image(lab) for lab in labels}
    trues = {k: v for k, v in trues.items() if v is not None}
    table = [rows[lab] for lab in labels]
    if trues and len(trues) == len(labels):
        for score in score_images(recons, trues, on="display"):
            rows[score["label"]].update({k: v for k, v in score.items() if k != "label"})
    _feature_fit(job, labels, mats, rows)
    summary = _summary(table)
    write_table(out.run_dir / "results.csv", table)
    write_table(out.run_dir / "results.json", table)
    stimuli = dm.stimuli.folder.resolve() if dm.stimuli is not None else None
    write_text_atomic(out.run_dir / "run_info.json", json.dumps({
        "method": job.method, "subject": job.subject, "roi": job.roi,
        "outputs": str(out.dir.relative_to(out.run_dir)),
        "stimuli": None if stimuli is None else str(stimuli),
        "input_size": list(job.encoder.input_size), "labels": labels,
        "failures": failures, **job.info}, indent=2, default=str))
    if trues:  # per-image and mean scores on display and raw images, with 95% intervals
        write_job_metrics(out.run_dir)
    figures = _figures(out.run_dir, labels, recons, trues, histories, rows)
    loggers.log_summary(job.logger, table,
                        {lab: (display_image(recons[lab]), trues.get(lab)) for lab in labels},
                        summary, figures)
    _print_summary(job, table, summary, failures)
    objective = summary.get("pixel_corr", summary.get("final_loss", float("nan")))
    return JobSummary(table, failures, done, summary, float(objective))


def _feature_fit(job: Job, labels: list[str], mats: Mapping[str, Mapping[str, Any]],
                 rows: dict[str, dict[str, Any]]) -> None:
    """Per-layer feature fit (``feature_fit.csv``), its means in the results, and
    identification by ``job.ident_layer`` features, from what each image's file holds."""
    per_layer, ident = [], {}
    for lab in labels:
        fit = from_mat_vars(mats[lab])
        if fit is None:  # finished before feature fit was on
            continue
        layer_rows, ident[lab] = fit
        per_layer += [{"label": lab, **r} for r in layer_rows]
        rows[lab].update(summarize_fit(layer_rows))
    for lab, acc in identification_by_features(ident).items():
        rows[lab]["ident_feat"] = acc
    if per_layer:
        write_table(job.outputs.run_dir / "feature_fit.csv", per_layer)


def _summary(table: list[dict[str, Any]]) -> dict[str, float]:
    summary = summarize(table)
    seconds = [r["seconds"] for r in table if np.isfinite(r.get("seconds", np.nan))]
    if seconds:
        summary["seconds"] = float(np.mean(seconds))
    return summary


def _figures(run_dir: Path, labels: list[str], recons: Mapping[str, np.ndarray],
             trues: Mapping[str, np.ndarray], histories: Mapping[str, np.ndarray],
             rows: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
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


def _print_summary(job: Job, table: list[dict[str, Any]], summary: Mapping[str, float],
                   failures: Mapping[str, str]) -> None:
    cols = [("label", "{}"), ("final_loss", "{:.4g}"), ("pixel_corr", "{:.3f}"),
            ("ident_corr", "{:.2f}"), ("ssim", "{:.3f}"), ("feat_corr_target", "{:.3f}"),
            ("ident_feat", "{:.2f}"), ("seconds", "{:.1f}")]
    cols = [(k, f) for k, f in cols if any(k in r for r in table)]
    lines = ["  ".join(f"{k:>14}" for k, _ in cols)]
    for r in table:
        lines.append("  ".join(f"{_fmt(f, r.get(k)):>14}" for k, f in cols))
    lines.append("  ".join(f"{_fmt(f, summary.get(k)) if k != 'label' else 'mean':>14}"
                           for k, f in cols))
    head = (f"{job.method} | {job.subject} | {job.roi}: {len(table)} images"
            f" ({len(failures)} failed) -> {job.outputs.run_dir}")
    if any("pixel_corr" in r for r in table):
        lines.append("pixel_corr / ident_corr / ssim: display images (2/98 percentile clip,"
                     " min-max), as the lab scores; metrics.csv also has raw-image scores")
    print("\n" + head + "\n" + "\n".join(lines))
    for lab, why in failures.items():
        print(f"FAILED {lab}: {why}")


def _fmt(fmt: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return fmt.format(v)
