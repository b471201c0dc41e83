"""Decode CNN features from fMRI: ``python train_decoder.py subject=1 roi=VC``.

Thin Hydra entry point (config ``conf/decoder.yaml``): train the lab's decoders (top-k
voxels + ridge, as fastl2lir) for every requested layer, predict the test images and write
the decoded features where ``train_recon.py data=decoded`` reads them
(``out_dir/<layer>/<subject>/<roi>/<label>.mat``). Returns the mean profile correlation
over the job's layers (when the test images' true features are known) for sweepers.
"""

from __future__ import annotations

import logging
import math
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from icnn_pl.decoding.stage import run
from icnn_pl.errors import IcnnError
from icnn_pl.pipeline.failures import end_failed_job

log = logging.getLogger("train_decoder")


@hydra.main(version_base="1.3", config_path="conf", config_name="decoder")
def main(cfg: DictConfig) -> float:
    in_sweep = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        rows = run(cfg)
    except IcnnError as exc:
        log.error("%s", exc)
        end_failed_job(2, exc, in_sweep)
    except KeyboardInterrupt:
        log.warning("interrupted: finished layers and chunks are kept in %s; the same command"
                    " resumes", cfg.out_dir)
        sys.exit(130)
    scored = [r["profile_r"] for r in rows if "profile_r" in r]
    return sum(scored) / len(scored) if scored else math.nan


if __name__ == "__main__":
    main()
