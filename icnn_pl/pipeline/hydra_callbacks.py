"""Hydra callbacks (``hydra.callbacks`` in ``conf/config.yaml``).

Hydra creates the run directory and writes its own log and ``.hydra/`` files there before
``train_recon.py`` runs; a directory that cannot be created or written would end in a
traceback from inside Hydra. ``CheckOutputDir`` tests it first and stops with one message.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from icnn_pl.errors import ConfigError
from icnn_pl.pipeline.outputs import check_writable_dir


class CheckOutputDir(Callback):
    """Exit 2 with a clear message if the run (or sweep) directory is not writable."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(config, "hydra.sweep.dir")


def _check(config: DictConfig, key: str) -> None:
    HydraConfig.instance().set_config(config)  # the dir name interpolates ${hydra:...}
    try:
        check_writable_dir(str(OmegaConf.select(config, key)), key)
    except ConfigError as exc:
        # SystemExit, not an exception: Hydra would print a traceback around the latter
        sys.stderr.write(f"[ERROR] {exc}\n")
        sys.exit(2)
