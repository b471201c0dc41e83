"""From a composed Hydra config to a ``Job`` of plain objects (the only module that builds
from the config tree; ``config_checks`` checks it first).

Order: config values, then the networks, then the data (layers present, subject and ROI
present, shapes match), then outputs and logger, all before the first image starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra.utils
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from icnn_pl.data.datamodule import ReconDataModule
from icnn_pl.data.matio import load_mat_dict
from icnn_pl.data.readers import load_act_range, load_reference_std
from icnn_pl.engine.evaluate_only import evaluates_only
from icnn_pl.engine.icnn_steps import Clipping, GDSteps, Regularizer
from icnn_pl.engine.recipe import Recipe
from icnn_pl.engine.schedules import as_schedule
from icnn_pl.engine.targets import expected_shapes
from icnn_pl.engine.transforms import make_transforms
from icnn_pl.errors import ConfigError, one_line
from icnn_pl.nets import build_encoder, build_generator, default_weights, fingerprint
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.pipeline.claims import HOST, Claims
from icnn_pl.pipeline.config_checks import CUSTOM, check_config, optimizer_factory
from icnn_pl.pipeline.data_sources import DATA_SOURCES, existing_path, plain
from icnn_pl.pipeline.job import Job
from icnn_pl.pipeline.loggers import make_logger
from icnn_pl.pipeline.outputs import ReconOutputs
from icnn_pl.pipeline.run_dirs import results_dir, run_name, shard_dir, shard_name

log = logging.getLogger(__name__)


def register_resolvers() -> None:
    """``${icnn.run_name:...}``: the run directory name ("default" without overrides);
    ``${icnn.shard_dir:N,i}``: a shard's own folder below it (``run_dirs``)."""
    for name, fn in (("icnn.run_name", run_name), ("icnn.shard_dir", shard_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def build_steps(steps: Mapping[str, Any] | None) -> GDSteps | None:
    """The method's ``steps`` block -> ``GDSteps`` (None for L-BFGS methods)."""
    if steps is None:
        return None
    s = dict(steps)
    regs = [Regularizer(kind, float(s[kind]["order"]), as_schedule(s[kind]["lamda"]))
            for kind in ("p_norm", "tv") if s.get(kind)]

    def clip(key: str) -> Clipping | None:
        c = s.get(key)
        return None if not c else Clipping(int(c["every"]), as_schedule(c["pct"]))

    return GDSteps(
        normalize_grad=bool(s.get("normalize_grad", True)),
        decay=as_schedule(s.get("decay")), blur_sigma=as_schedule(s.get("blur_sigma")),
        jitter=int(s.get("jitter") or 0), regularizers=regs,
        clip_extreme=clip("clip_extreme"), clip_small_norm=clip("clip_small_norm"),
        clip_small_contribution=clip("clip_small_contribution"),
    )


def _weights_path(value: Any, key: str) -> Path | None:
    return None if value is None else existing_path(value, key)


def build_encoder_from_cfg(cfg: DictConfig) -> tuple[FeatureEncoder, str]:
    """The encoder and an id of the network (architecture, weight file or seed)."""
    net = cfg.network
    weights = _weights_path(net.weights, "network.weights")
    if net.arch != CUSTOM:  # a trained network's own weights (efficientnet_lite0's package)
        weights = default_weights(net.arch, weights)
    size, mean = tuple(plain(net.input_size)), plain(net.mean_bgr)
    input_space = plain(net.get("input_space", "caffe_bgr"))
    if net.arch == CUSTOM:
        mapping = plain(net.layer_mapping)
        encoder = build_encoder(build_custom_network(cfg), weights, mean, size,
                                layer_mapping=mapping, input_space=input_space)
        spec = json.dumps([plain(net.module), mapping, input_space], sort_keys=True)
        arch = f"custom-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    else:
        encoder = build_encoder(net.arch, weights, mean, size, seed=cfg.seed,
                                input_space=input_space)
        arch = net.arch
    if weights is None:  # a new random init (another seed or layout): new demo files
        network_id = f"{arch}|random-seed{cfg.seed}-{fingerprint(encoder.net)}"
    else:
        stat = weights.stat()
        network_id = f"{arch}|{weights.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    if net.arch != CUSTOM and input_space != "caffe_bgr":  # other inputs, other features
        network_id += f"|{json.dumps(input_space, sort_keys=True)}"
    return encoder, network_id


def build_custom_network(cfg: DictConfig) -> nn.Module:
    """``network.module`` instantiated (``_target_`` and its arguments); its own random
    initialisation is seeded by ``seed`` (weights, when given, replace it)."""
    spec = cfg.network.module
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        try:
            module = hydra.utils.instantiate(spec, _convert_="all")
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(
                f"network.module ({spec.get('_target_')}) cannot be built: {one_line(cause)}",
                "check network.module._target_ and its arguments",
            ) from exc
    if not isinstance(module, nn.Module):
        raise ConfigError(f"network.module ({spec.get('_target_')}) gave a"
                          f" {type(module).__name__}, not a torch nn.Module",
                          "point _target_ at an nn.Module class or a function returning one")
    if cfg.network.weights is None:  # a factory may have loaded weights: say what is known
        log.warning("network=custom: no network.weights file given: the module keeps the"
                    " parameters its factory %s gave it (trained only if the factory loads"
                    " weights; a random initialisation is seeded by seed=%d)",
                    spec.get("_target_"), cfg.seed)
    return module


def job_ident_layer(cfg: DictConfig, encoder: FeatureEncoder) -> str | None:
    """``evaluation.ident_layer``; a custom network without that layer has none."""
    ident = OmegaConf.select(cfg, "evaluation.ident_layer", default=None)
    if ident is not None and cfg.network.arch == CUSTOM and ident not in encoder.known_layers:
        log.warning("evaluation.ident_layer=%s is not in network.layer_mapping: no"
                    " identification by features (set it to one of %s)", ident,
                    ", ".join(encoder.known_layers))
        return None
    return ident


def build_recipe(cfg: DictConfig) -> Recipe:
    """The method (optimizer, schedules, iCNN steps, generator and its code bounds)."""
    m = cfg.method
    optimizer = optimizer_factory(cfg)
    recipe = Recipe(
        optimizer=optimizer,
        n_iter=0 if evaluates_only(optimizer) else int(m.n_iter),  # dgn_direct: no iterations
        schedules={k: as_schedule(v) for k, v in plain(cfg.optimizer.schedule or {}).items()},
        steps=build_steps(plain(m.steps)),
        init=m.init,
        pixel_bounds=bool(m.pixel_bounds),
        loss_type=plain(m.loss_type),
        return_last_forward=bool(m.return_last_forward),
    )
    if m.param == "fourier":
        recipe.fourier = plain(m.fourier) or {}
    if m.get("transforms"):
        recipe.transforms = make_transforms(plain(m.transforms))
    if m.param == "code":
        g = cfg.generator
        recipe.generator = build_generator(g.arch, _weights_path(g.weights, "generator.weights"),
                                           seed=cfg.seed)
        dim = int(getattr(recipe.generator, "input_size", 4096))
        upper = (load_act_range(existing_path(g.act_range, "generator.act_range"),
                                expected_len=dim)
                 if g.act_range is not None else float(g.upper))
        recipe.code_bounds = (float(g.lower), upper)
    return recipe


def build_datamodule(cfg: DictConfig, encoder: FeatureEncoder, network_id: str
                     ) -> tuple[ReconDataModule, str]:
    """The DataModule for ``cfg.data`` and the subject id used in output paths."""
    d = cfg.data
    layers = list(plain(cfg.layers.names))
    source = DATA_SOURCES[d.kind](cfg, encoder, layers, network_id)
    ref_std = source.ref_std
    if d.get("std_ref") not in (None, "???"):
        ref_std = load_reference_std(existing_path(d.std_ref, "data.std_ref"), layers)
    train_mean = None
    if d.get("train_mean") is not None:
        means = load_mat_dict(existing_path(d.train_mean, "data.train_mean"))
        train_mean = {n: np.asarray(means[n]) for n in layers if n in means}
    dm = ReconDataModule(
        source.features, expected_shapes(encoder, layers),
        weights=plain(cfg.layer_weights.mode),
        std_correction=source.std_correction or d.get("std_correction", "none"),
        ref_std=ref_std, train_mean=train_mean, stimuli=source.stimuli,
        labels=plain(d.get("labels")), limit=d.get("limit"),
        num_shards=d.get("num_shards", 1), shard=d.get("shard", 0),
        batch_size=d.get("batch_size", 1), num_workers=d.get("num_workers", 0),
    )
    return dm, source.subject


def build_job(cfg: DictConfig, run_dir: str | Path, group: str | None = None) -> Job:
    """Check ``cfg``, build networks, data, outputs and logger: a ready-to-run ``Job``."""
    check_config(cfg)
    encoder, network_id = build_encoder_from_cfg(cfg)
    recipe = build_recipe(cfg)
    datamodule, sub = build_datamodule(cfg, encoder, network_id)
    datamodule.setup("predict")  # lists labels: fails now, not after the first image
    # Shards of a job write images and tables to its shared directory; their loggers
    # stay in each shard's own run_dir (see run_dirs).
    shards = (cfg.data.get("num_shards", 1), cfg.data.get("shard", 0))
    outputs = ReconOutputs(results_dir(run_dir, *shards), sub, cfg.roi)
    lg = cfg.logger
    name = "-".join(filter(None, (outputs.run_dir.name, shard_name(*shards))))
    ident_layer = job_ident_layer(cfg, encoder)
    launch, log_dir = _launch_records(run_dir)  # last: nothing after it may fail but this
    try:
        logger = make_logger(
            lg.kind, log_dir, name=name, project=lg.get("project", "icnn-pl"),
            group=lg.get("group") or group or cfg.method.name, mode=lg.get("mode", "offline"),
            tags=plain(lg.get("tags")) or [cfg.method.name, sub, cfg.roi],
            config=plain(cfg),
        )
    except BaseException:  # no launch claim (and heartbeat thread) left behind
        launch.close()
        raise
    return Job(datamodule=datamodule, encoder=encoder, recipe=recipe, outputs=outputs,
               method=cfg.method.name, subject=sub, roi=cfg.roi,
               trainer_args=plain(cfg.trainer),  # make_trainer's keyword arguments
               logger=logger, launch=launch, resume=bool(cfg.resume), fail_fast=bool(cfg.fail_fast),
               seed=int(cfg.seed), progress=bool(cfg.progress),
               snapshot_every=int(cfg.get("snapshot_every") or 0),
               feature_fit=bool(OmegaConf.select(cfg, "evaluation.feature_fit", default=True)),
               ident_layer=ident_layer,
               info={"layers": cfg.layers.name, "network": cfg.network.name,
                     "network_weights": cfg.network.weights, "data": cfg.data.name,
                     "optimizer": cfg.optimizer.name, "n_iter": recipe.n_iter,
                     "generator": None if cfg.get("generator") is None else cfg.generator.name,
                     "generator_weights": OmegaConf.select(cfg, "generator.weights"),
                     "seed": int(cfg.seed)})


def _launch_records(run_dir: str | Path) -> tuple[Claims, Path]:
    """Claim the job's records directory for this launch. A second launch of a job that is
    still running (a re-launch, an overlapping requeue) shares the images with it through
    per-image claims, but its logger writes below ``launch-<host>-<pid>/``: two CSV or
    TensorBoard loggers must not rewrite one file."""
    launch = Claims(run_dir)
    owner = launch.claim("launch")
    if owner is None:
        return launch, Path(run_dir)
    log_dir = Path(run_dir) / f"launch-{HOST}-{os.getpid()}"
    log.warning("another launch of this job is running (%s): the two share out the images"
                " (each image is reconstructed once); this launch's logger records go to %s",
                owner, log_dir)
    return launch, log_dir
