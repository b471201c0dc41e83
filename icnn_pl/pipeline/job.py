"""A job: reconstruct every selected image of one (method, subject, ROI), resumably.

Plain objects in, files out: the Hydra entry point, the tests and scripts share this path.
The frozen networks are built once per job; each image batch gets a fresh module and a
fresh lean Trainer. Finished images are skipped on a re-run; a failing image is reported
and the job goes on (unless ``fail_fast``). Each image's file is read at most once: the
images of this run are kept as written, earlier ones as read when checked for resume.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger
from tqdm.auto import tqdm

from icnn_pl.data.datamodule import FailedBatch, ReconDataModule, TargetBatch
from icnn_pl.engine import interrupt
from icnn_pl.engine.fit import fit
from icnn_pl.engine.recipe import Recipe
from icnn_pl.errors import DataError, IcnnError
from icnn_pl.image import display_image
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.pipeline import loggers
from icnn_pl.pipeline.claims import Claims, Owner
from icnn_pl.pipeline.outputs import ReconOutputs, read_failures, update_failures
from icnn_pl.pipeline.progress import IterationProgress, Snapshots
from icnn_pl.pipeline.report import JobSummary, Variables, result_row, write_report
from icnn_pl.review.feature_fit import image_feature_fit, to_mat_vars

log = logging.getLogger(__name__)

@dataclass
class Job:
    """Everything one job needs, built once (networks, data, recipe, outputs, logger)."""

    datamodule: ReconDataModule
    encoder: FeatureEncoder
    recipe: Recipe
    outputs: ReconOutputs
    method: str
    subject: str
    roi: str
    trainer_args: dict[str, Any] = field(default_factory=dict)  # make_trainer's keywords
    logger: Logger | None = None
    launch: Claims | None = None  # this launch's claim on the records dir (released at the end)
    resume: bool = True
    fail_fast: bool = False
    seed: int = 0
    progress: bool = True
    snapshot_every: int = 0  # save a display image every K iterations (0: off)
    info: dict[str, Any] = field(default_factory=dict)  # settings recorded in run_info.json
    feature_fit: bool = True  # score features of the results against targets / true images
    ident_layer: str | None = None  # layer for identification by features (e.g. fc7)


def run_job(job: Job) -> JobSummary:
    """Run every pending image of the job, then score, summarise and log. Images another
    launch holds are waited for at the end: the job returns with every image of its
    shard finished or listed as failed."""
    try:
        return _run_job(job)
    finally:  # also when it stops early: no launch claim, no heartbeat thread left
        if job.launch is not None:
            job.launch.close()


def _run_job(job: Job) -> JobSummary:
    dm, out = job.datamodule, job.outputs
    if not dm.labels:  # build_job has set it up (labels listed); a hand-built Job not yet
        dm.setup("predict")
    images = _finished(job)  # label -> variables of every finished image
    done = list(images)
    pending = [lab for lab in dm.labels if lab not in images]
    if done:
        log.info("resuming: %d of %d images already finished in %s (skipped)",
                 len(done), len(dm.labels), out.dir)
    failures = _check_feature_headers(job, pending)
    pending = [lab for lab in pending if lab not in failures]
    run = _Run(job, images, failures, Claims(out.dir),
               redo={lab for lab in pending if out.is_done(lab)})  # unreadable / resume=false
    # claims of finished images whose launch was killed before it released them
    run.claims.sweep_stale([_claim_name(lab) for lab in dm.labels if lab in images])
    run.bar = tqdm(total=len(dm.labels), initial=len(done) + len(failures), unit="img",
                   disable=not job.progress, desc=f"{job.method} {job.subject} {job.roi}",
                   dynamic_ncols=True)
    with interrupt.deferred_sigint(), _long_lived_objects_frozen(), \
            contextlib.closing(run.claims):
        run.batches(pending)
        run.wait_for_others()
        run.bar.close()
        # one report at a time: the last to take the lock sees every finished image
        with _report_lock(out):
            every_failure = update_failures(out, failures)
            unaccounted = [lab for lab in dm.labels
                           if not out.is_done(lab) and lab not in every_failure]
            if unaccounted:  # cannot happen by design: never exit 0 without them
                lost = {lab: "not finished by any launch of the job (run it again)"
                        for lab in unaccounted}
                failures.update(lost)
                every_failure = update_failures(out, lost)
            return write_report(job, images, run.rows, failures, done,
                                job_failures=every_failure, held_trues=run.trues)


def _report_lock(out: ReconOutputs) -> contextlib.AbstractContextManager:
    """The job's lock on its tables and ``failures.json`` (every shard and launch)."""
    stack = contextlib.ExitStack()
    tables = stack.enter_context(contextlib.closing(Claims(out.run_dir)))
    stack.enter_context(tables.lock("report"))
    return stack


@dataclass
class _Run:
    """What one launch does with its shard's pending images: claim, reconstruct, record
    failures at once (a launch waiting for an image sees them), wait for the others'."""

    job: Job
    images: dict[str, Variables]
    failures: dict[str, str]
    claims: Claims
    redo: set[str]
    elsewhere: dict[str, Owner] = field(default_factory=dict)  # label -> its live owner
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    trues: dict[str, np.ndarray | None] = field(default_factory=dict)  # as loaded here
    bar: Any = None

    def batches(self, labels: list[str], count: bool = True) -> None:
        """Claim and reconstruct ``labels``; ``count``: advance the progress bar (not
        for images waited for: the first pass counted them)."""
        job = self.job
        for batch in job.datamodule.predict_dataloader(labels):
            interrupt.check()
            n_labels = len(batch.labels)
            batch = _claimed(job, self.claims, batch, self.elsewhere, self.redo)
            try:
                if isinstance(batch, FailedBatch):
                    raise batch.error
                if batch is not None:
                    for label, (variables, row) in _reconstruct(job, batch, len(self.rows),
                                                                self.bar).items():
                        self.images[label], self.rows[label] = variables, row
                    self.trues.update(zip(batch.labels, batch.true_images, strict=True))
                # The finished module and its Trainer reference each other: without this,
                # each image's targets (~60 MB at 224 px, all layers) wait for Python's
                # rare full collection and a long job's memory grows image by image.
                gc.collect()
            except IcnnError as exc:
                if job.fail_fast:
                    raise
                failed = {lab: str(exc).splitlines()[0] for lab in batch.labels}
                for lab in failed:
                    log.error("image %s failed: %s", lab, exc)
                self.failures.update(failed)
                with _report_lock(job.outputs):  # listed before its claim is released
                    update_failures(job.outputs, failed)
            finally:
                for lab in [] if batch is None else batch.labels:
                    self.claims.release(_claim_name(lab))
            if count:
                self.bar.update(n_labels)

    def wait_for_others(self) -> None:
        """Wait until each image another launch held is finished, or failed there, or
        its claim went stale (then it is taken over and reconstructed here)."""
        out, said = self.job.outputs, 0.0
        t0 = time.monotonic()
        while self.elsewhere:
            if time.monotonic() - said >= WAIT_LOG_S:
                log.info("waiting for %d image(s) that another launch of this job is"
                         " reconstructing (%s)", len(self.elsewhere),
                         "; ".join(sorted({str(o) for o in self.elsewhere.values()})))
                said = time.monotonic()
            for lab in list(self.elsewhere):
                owner, took_over = self.claims.claim_verbose(_claim_name(lab))
                if owner is not None:  # still running there
                    self.elsewhere[lab] = owner
                    continue
                del self.elsewhere[lab]
                listed = read_failures(out).get(lab)
                self.claims.release(_claim_name(lab))
                if took_over or (not out.is_done(lab) and listed is None):
                    log.warning("image %s: its launch stopped without finishing it:"
                                " reconstructing it here", lab)
                    self.redo.discard(lab)
                    self.batches([lab], count=False)
                elif not out.is_done(lab):  # failed there: this shard's image failed
                    self.failures[lab] = listed
            if self.elsewhere:
                interrupt.check()
                time.sleep(WAIT_POLL_S)
        if time.monotonic() - t0 > 1.0:
            log.info("the images of the other launch(es) are accounted for")


WAIT_POLL_S = 2.0  # how often a launch looks at the images another launch holds
WAIT_LOG_S = 60.0


def _claim_name(label: str) -> str:
    return f"recon_image-{label}"


def _claimed(job: Job, claims: Claims, batch: TargetBatch | FailedBatch,
             elsewhere: dict[str, Owner], redo: set[str]) -> TargetBatch | FailedBatch | None:
    """The part of ``batch`` this process claimed (None: none of it). Images claimed by
    another live launch, or finished by one since this job started, are left out
    (``redo``: images whose existing file is to be replaced)."""
    mine = []
    for lab in batch.labels:
        owner = claims.claim(_claim_name(lab))
        if owner is not None:
            elsewhere[lab] = owner
        elif lab not in redo and job.outputs.is_done(lab):  # finished by another launch
            claims.release(_claim_name(lab))
        else:
            mine.append(lab)
    if mine == batch.labels:
        return batch
    if not mine:
        return None
    if isinstance(batch, FailedBatch):
        return FailedBatch(mine, batch.error)
    # a partly claimed batch (data.batch_size > 1): its claimed rows, as loaded (reading,
    # std correction, stacking and layer weights are per image: the same as a re-read)
    rows = [batch.labels.index(lab) for lab in mine]
    return TargetBatch(mine, {n: t[rows] for n, t in batch.targets.items()},
                       {n: w[rows] for n, w in batch.weights.items()},
                       [batch.true_images[i] for i in rows])


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


def _finished(job: Job) -> dict[str, Variables]:
    """Images finished by an earlier run (resume), read once. A finished file that does not
    read back (written by something else, or a disk error) is reported and its image
    redone."""
    if not job.resume:
        return {}
    done = {}
    for lab in job.datamodule.labels:
        if not job.outputs.is_done(lab):
            continue
        try:
            done[lab] = job.outputs.read(lab)
        except DataError as exc:
            log.warning("%s; recomputing image %s", exc.problem, lab)
    return done


def _check_feature_headers(job: Job, pending: list[str]) -> dict[str, str]:
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


def _reconstruct(job: Job, batch: TargetBatch, step: int, bar: tqdm
                 ) -> dict[str, tuple[Variables, dict[str, Any]]]:
    """Reconstruct one batch and write its images: label -> (variables written, row)."""
    t0 = time.perf_counter()
    module = job.recipe.build(batch.targets, job.encoder, weights=batch.weights,
                              labels=batch.labels, seed=job.seed)
    callbacks: list[pl.Callback] = [IterationProgress(bar)] if job.progress else []
    if job.snapshot_every > 0:
        callbacks.append(Snapshots(job.outputs, batch.labels, job.snapshot_every))
    result = fit(module, logger=job.logger, callbacks=callbacks, **job.trainer_args)
    seconds = (time.perf_counter() - t0) / len(batch.labels)
    finished = {}
    for i, label in enumerate(batch.labels):
        image, history = result.images[i], result.loss_history[i]
        if not np.isfinite(image).all():
            raise DataError(f"image {label}: the reconstruction diverged (NaN/inf pixels)",
                            "lower the learning rate or check the targets")
        code = None if result.codes is None else result.codes[i]
        true = batch.true_images[i]
        meta = {"method": job.method, "subject": job.subject, "roi": job.roi,
                "stop_reason": result.stop_reason}
        if job.feature_fit:  # while the targets are at hand: a resumed job needs no re-read
            targets = {n: t[i].numpy() for n, t in batch.targets.items()}
            meta.update(to_mat_vars(*image_feature_fit(
                job.encoder, image, targets, true, job.ident_layer)))
        variables = job.outputs.write(label, image, history, code, meta=meta)
        row = result_row(job, label, history, result.n_evals, round(seconds, 3),
                         result.stop_reason)
        _warn_if_flat(label, row)
        finished[label] = (variables, row)
        if module.runs_to_completion:
            loggers.log_curve(job.logger, label, history)
        loggers.log_image(job.logger, label, display_image(image),
                          None if true is None else true.astype(np.uint8), step + i)
        log.info("%s: final loss %.6g after %d evaluations, %.1f s",
                 label, history[-1], result.n_evals, seconds)
    return finished


def _warn_if_flat(label: str, row: dict[str, Any]) -> None:
    """A reconstruction whose loss never fell returned its initial image: say so."""
    if row["loss_fell"] is False:
        log.warning("%s: the loss did not fall (%d evaluation(s), optimiser stopped: %s):"
                    " the result is its initial image; try another initial image/code"
                    " (method.init) or check the targets", label, row["function_evals"],
                    row["stop_reason"] or "?")
