"""Reconstruct images from CNN features: ``python train_recon.py method=icnn_dgn_gd subject=1``.

Thin Hydra entry point: compose the config, build the job, run it. Returns the job's
objective (mean pixel correlation, or mean final loss without true images) for sweepers.
In a sweep (``-m``) a failed job raises instead of exiting, so the other jobs still run
(``icnn_pl.pipeline.failures``).
"""

from __future__ import annotations

import logging
import shlex
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from icnn_pl.engine.fit import deterministic_cublas
from icnn_pl.errors import IcnnError
from icnn_pl.pipeline.devices import pin_job_gpu, remember_host_gpus
from icnn_pl.pipeline.factory import build_job, register_resolvers
from icnn_pl.pipeline.failures import end_failed_job
from icnn_pl.pipeline.job import run_job
from icnn_pl.pipeline.loggers import finish

register_resolvers()
remember_host_gpus()  # for the jobs of a local multirun: job (shard) i on GPU i
log = logging.getLogger("train_recon")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    in_sweep = hc.mode.name == "MULTIRUN"
    group = hc.sweep.dir if in_sweep else None  # W&B: a sweep's runs side by side
    # before anything starts CUDA
    pin_job_gpu(cfg.data.get("shard", 0), cfg.data.get("num_shards", 1), hc.job.get("num", 0))
    if cfg.trainer.get("deterministic") is True:
        deterministic_cublas()  # cuBLAS reads its workspace setting once, when CUDA starts
    try:
        job = build_job(cfg, run_dir, group=group)
    except IcnnError as exc:
        log.error("%s", exc)
        end_failed_job(2, exc, in_sweep)
    except KeyboardInterrupt:
        log.warning("interrupted before any image was started")
        sys.exit(130)
    status = "failed"
    try:
        summary = run_job(job)
        status = "success" if not summary.failures else "failed"
    except IcnnError as exc:
        log.error("%s", exc)
        end_failed_job(2, exc, in_sweep)
    except KeyboardInterrupt:
        log.warning("interrupted: finished images are kept in %s; to resume, run the same"
                    " command again: %s", run_dir, _command(group))
        sys.exit(130)
    finally:
        finish(job.logger, status)
    if summary.failures:
        log.error("%d image(s) failed: %s (reasons above); once fixed, the same command"
                  " redoes only those", len(summary.failures), ", ".join(summary.failures))
        end_failed_job(1, f"{len(summary.failures)} image(s) failed", in_sweep,
                       summary.failures)
    return summary.objective


def _command(sweep_dir: str | None) -> str:
    """This command line, quoted for a POSIX shell; a multirun keeps its sweep directory
    (a new one would get a new time-stamped directory and start over)."""
    args = ["python", *sys.argv]
    if sweep_dir and not any(a.startswith("hydra.sweep.dir=") for a in args):
        args.append(f"hydra.sweep.dir={sweep_dir}")
    return " ".join(shlex.quote(a) for a in args)


if __name__ == "__main__":
    main()
