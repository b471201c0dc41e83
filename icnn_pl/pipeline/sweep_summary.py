"""The sweep's own summary: which jobs of a Hydra multirun completed, failed or still run.

:class:`SweepSummary` (a Hydra callback, ``hydra.callbacks`` in ``conf/config.yaml``)
records each job in ``<sweep dir>/job_status/<job>.json`` when it starts and ends, wherever
it runs (SLURM node, local subprocess), and rewrites ``<sweep dir>/sweep_summary.json`` and
``.md`` after every job: status, objective and failed images of each job. A job that
started but never ended (killed, preempted, out of time) stays ``running``. After an Optuna
sweep it writes ``best_config.yaml``. Re-launching the same command with the same
``hydra.sweep.dir`` resumes: every job skips its finished images, and the records of
re-run jobs are replaced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import socket
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from icnn_pl.atomic import write_text_atomic
from icnn_pl.pipeline.claims import Claims

log = logging.getLogger(__name__)

STATUS_DIR = "job_status"
SUMMARY = "sweep_summary"
BEST_CONFIG = "best_config.yaml"
OPTUNA_RESULTS = "optimization_results.yaml"  # written by hydra-optuna-sweeper


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _finite_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _is_sweep(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _job_key(sweep_dir: Path, output_dir: Path) -> str:
    """The job's directory below the sweep, as one file name (shards: ``<job>__shard-..``)."""
    try:
        rel = output_dir.resolve().relative_to(sweep_dir.resolve())
    except ValueError:  # a subdir outside the sweep dir
        rel = Path(output_dir.name)
    return "__".join(rel.parts) or "job"


class SweepSummary(Callback):
    """Records every job of a sweep and keeps ``sweep_summary.json|md`` up to date.

    Hydra calls ``on_job_start`` / ``on_job_end`` in the process that runs the job (with
    submitit: on the node), so records are files, never in-memory state. Single runs are
    not recorded.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _is_sweep(config):
            _write_record(config, {"status": "running", "started": _now(),
                                   "started_s": time.time()})
            write_sweep_summary(config.hydra.sweep.dir)  # shows what is running

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_sweep(config):
            return
        record: dict[str, Any] = {"finished": _now(), "objective": None, "error": None,
                                  "exit_code": 0, "failed_images": {}}
        if job_return.status == JobStatus.COMPLETED:
            record.update(status="completed", objective=_finite_or_none(job_return.return_value))
        else:
            # the exception itself (``job_return.return_value`` would raise it)
            exc = job_return._return_value
            record.update(status="failed", error=str(exc).splitlines()[0] if str(exc) else
                          type(exc).__name__, exit_code=getattr(exc, "code", 1),
                          failed_images=getattr(exc, "failed_images", {}))
        _write_record(config, record)
        summary = write_sweep_summary(config.hydra.sweep.dir)
        if record["status"] == "failed":
            log.warning("this job failed; the sweep goes on (%s): %s", _counts(summary),
                        Path(str(config.hydra.sweep.dir)) / f"{SUMMARY}.md")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = write_sweep_summary(sweep_dir)
        log.info("sweep summary (%s): %s", _counts(summary), sweep_dir / f"{SUMMARY}.md")
        if (sweep_dir / OPTUNA_RESULTS).is_file():
            write_best_config(sweep_dir, summary["jobs"])


def _write_record(config: DictConfig, update: Mapping[str, Any]) -> None:
    hc = config.hydra
    sweep_dir = Path(str(hc.sweep.dir))
    output_dir = Path(str(hc.runtime.output_dir))
    path = sweep_dir / STATUS_DIR / f"{_job_key(sweep_dir, output_dir)}.json"
    record = {}
    if path.is_file() and update.get("status") != "running":  # keep the start time
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
    subdir = OmegaConf.select(config, "hydra.output_subdir")
    record.update({
        "job": path.stem, "dir": os.path.relpath(output_dir, sweep_dir.resolve()),
        "overrides": list(OmegaConf.to_container(hc.overrides.task)),
        "config": None if subdir is None else os.path.relpath(
            output_dir / str(subdir) / "config.yaml", sweep_dir.resolve()),
        "job_num": OmegaConf.select(config, "hydra.job.num"),
        "job_id": OmegaConf.select(config, "hydra.job.id"), "host": socket.gethostname(),
        **update,
    })
    if "started_s" in record and record.get("status") != "running":
        record["seconds"] = round(time.time() - float(record["started_s"]), 1)
    write_text_atomic(path, json.dumps(record, indent=2, default=str))


def read_records(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every job record of a sweep, sorted by job directory (shards of a job together)."""
    records = []
    for path in sorted((Path(sweep_dir) / STATUS_DIR).glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            records.append({"job": path.stem, "status": "unreadable record"})
    return records


def write_sweep_summary(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """Rewrite ``sweep_summary.json`` and ``sweep_summary.md`` from the job records."""
    sweep_dir = Path(str(sweep_dir))
    # one writer at a time (NFS-safe claim): the last of jobs ending together sees every record
    with contextlib.closing(Claims(sweep_dir / STATUS_DIR)) as c, c.lock("sweep_summary"):
        jobs = read_records(sweep_dir)
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job.get("status", "?")] = counts.get(job.get("status", "?"), 0) + 1
        summary = {"sweep_dir": str(sweep_dir), "updated": _now(), "counts": counts,
                   "failed_jobs": [j["job"] for j in jobs if j.get("status") == "failed"],
                   "jobs": jobs}
        write_text_atomic(sweep_dir / f"{SUMMARY}.json",
                          json.dumps(summary, indent=2, default=str))
        write_text_atomic(sweep_dir / f"{SUMMARY}.md", _markdown(summary))
    return summary


def _counts(summary: Mapping[str, Any]) -> str:
    return ", ".join(f"{n} {k}" for k, n in summary["counts"].items()) or "no jobs yet"


def _markdown(summary: Mapping[str, Any]) -> str:
    lines = [f"# Sweep {summary['sweep_dir']}", "",
             f"{_counts(summary)} (updated {summary['updated']}).",
             "", "| job | status | objective | failed images | error | seconds |",
             "|---|---|---|---|---|---|"]
    for j in summary["jobs"]:
        failed = ", ".join(f"{lab}: {why}" for lab, why in (j.get("failed_images") or {}).items())
        objective = j.get("objective")
        cells = [j.get("dir", j["job"]), j.get("status", "?"),
                 "-" if objective is None else f"{objective:.4g}", failed or "-",
                 j.get("error") or "-", j.get("seconds", "-")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    lines += ["", "objective: mean pixel correlation with the true images (mean final loss"
              " without them). `running`: started, no end recorded (still running, or killed,"
              " preempted, out of time). Re-run the same command with the same"
              " `hydra.sweep.dir` to resume: finished images are skipped."]
    return "\n".join(lines) + "\n"


def write_best_config(sweep_dir: str | os.PathLike,
                      jobs: list[dict[str, Any]]) -> Path | None:
    """``best_config.yaml``: the composed config of the Optuna sweep's best trial (from
    its ``.hydra/config.yaml``), headed by its objective and the command that reruns it."""
    sweep_dir = Path(sweep_dir)
    results = OmegaConf.to_container(OmegaConf.load(sweep_dir / OPTUNA_RESULTS))
    wanted = {f"{k}={v}" for k, v in (results.get("best_params") or {}).items()}
    best = [j for j in jobs if j.get("status") == "completed" and j.get("config")
            and wanted <= set(j.get("overrides", []))]
    if not wanted or not best:
        log.warning("no finished trial matches the best parameters %s", sorted(wanted))
        return None
    job = best[-1]
    config = sweep_dir / job["config"]
    if not config.is_file():
        log.warning("the best trial's config %s is missing", config)
        return None
    header = [f"# Best trial of the Optuna sweep {sweep_dir}",
              f"# objective: {results.get('best_value')} (its run directory: {job['dir']})",
              f"# best_params: {json.dumps(results.get('best_params'))}",
              "# rerun it: python train_recon.py " + " ".join(map(shlex.quote, job["overrides"]))]
    path = sweep_dir / BEST_CONFIG
    write_text_atomic(path, "\n".join(header) + "\n" + config.read_text())
    log.info("best trial (objective %s): %s", results.get("best_value"), path)
    return path

