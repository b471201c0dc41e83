"""Reconstruct images from CNN features: ``python train_recon.py method=icnn_dgn_gd subject=1``.

Thin Hydra entry point: compose the config, build the job, run it. Returns the job's
objective (mean pixel correlation, or mean final loss without true images) for sweepers.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from icnn_pl.config import build_job, register_resolvers
from icnn_pl.errors import IcnnError
from icnn_pl.loggers import finish
from icnn_pl.pipeline import run_job

register_resolvers()
log = logging.getLogger("train_recon")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    group = hc.sweep.dir if hc.mode.name == "MULTIRUN" else None
    try:
        job = build_job(cfg, run_dir, group=group)
    except IcnnError as exc:
        log.error("%s", exc)
        sys.exit(2)
    status = "failed"
    try:
        summary = run_job(job)
        status = "success" if not summary.failures else "failed"
    except IcnnError as exc:
        log.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt:
        log.warning("interrupted: finished images are kept in %s; run the same command to"
                    " resume", run_dir)
        sys.exit(130)
    finally:
        finish(job.logger, status)
    if summary.failures:
        log.error("%d image(s) failed: %s", len(summary.failures), ", ".join(summary.failures))
        sys.exit(1)
    return summary.objective


if __name__ == "__main__":
    main()
