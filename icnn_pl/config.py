"""From a composed Hydra config to a ``Job`` of plain objects (the only module that reads
the config tree besides ``train_recon.py``).

Everything is checked before any reconstruction starts: config values first, then the
networks and the data (layers present, subject and ROI present, shapes match).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra.utils
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from icnn_pl.data.datamodule import ReconDataModule, select_labels
from icnn_pl.data.demo import CONFUSION, STIMULI, Demo
from icnn_pl.data.images import ImageFeatures, ImageFolder
from icnn_pl.data.matio import load_mat_dict
from icnn_pl.data.readers import (
    CaffeDecodedFeatures,
    DecodedFeatures,
    TrueFeatures,
    load_act_range,
    load_reference_std,
    subject_id,
)
from icnn_pl.errors import ConfigError
from icnn_pl.loggers import WANDB_MODES, make_logger
from icnn_pl.nets import ARCHITECTURES, build_encoder, build_generator
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.objective import LOSSES
from icnn_pl.optim import Clipping, GDSteps, Regularizer, linear
from icnn_pl.outputs import ReconOutputs
from icnn_pl.params import CODE_INITS, PIXEL_INITS
from icnn_pl.pipeline import Job
from icnn_pl.sweep import results_dir, shard_dir, shard_name
from icnn_pl.targets import STD_MODES, expected_shapes

log = logging.getLogger(__name__)

METHOD_PARAMS = ("pixel", "code")
DATA_KINDS = ("demo", "decoded", "decoded_caffe", "true_features")
LAYER_WEIGHTINGS = ("inverse_norm", "uniform")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# Lightning precisions that suit a reconstruction (null: full float32, the reference).
PRECISIONS = (None, "32-true", "bf16-mixed", "16-mixed")
DEMO_SOURCES = ("decoded", "true_features")
TRUE_FEATURES = "true_features"  # the "subject" of runs from true features


def register_resolvers() -> None:
    """``${icnn.run_name:...}``: the run directory name ("default" without overrides);
    ``${icnn.shard_dir:N,i}``: a shard's own folder below it (``icnn_pl.sweep``)."""
    for name, fn in (("icnn.run_name", run_name), ("icnn.shard_dir", shard_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def run_name(overrides: str | None) -> str:
    """A directory name from the override string; long ones (e.g. many labels) are cut
    and made unique with a hash, to stay under the file system's 255-byte limit."""
    name = (overrides or "default").replace("/", "_")
    if len(name.encode()) > 200:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[:180].decode(errors="ignore") + "-" + digest
    return name


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(
        node, DictConfig | ListConfig) else node


def _require(cfg: DictConfig, key: str, hint: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
    if value is None or value == "???":
        raise ConfigError(f"{key} is not set", hint)
    return value


def _path(value: Any, key: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: no such file or directory: {path}",
                          f"set {key}=<existing path> (absolute, or relative to where you run)")
    return path


def check_config(cfg: DictConfig) -> None:
    """Cheap checks of config values, before anything is built."""
    _check_method(cfg)
    _check_trainer(cfg)
    _check_data(cfg)
    _check_files(cfg)
    _check_choices(cfg)


def _check_method(cfg: DictConfig) -> None:
    m = cfg.method
    if m.param not in METHOD_PARAMS:
        raise ConfigError(f"method.param={m.param!r} is not valid", f"use one of {METHOD_PARAMS}")
    if not isinstance(m.n_iter, int) or isinstance(m.n_iter, bool) or m.n_iter <= 0:
        raise ConfigError(f"method.n_iter={m.n_iter!r} must be a positive integer",
                          "set method.n_iter=200 (GD iterations / L-BFGS maxiter)")
    for name, value in (_plain(cfg.optimizer.get("schedule")) or {}).items():
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"optimizer.schedule.{name}={value} must be [start, end]",
                              f"write optimizer.schedule.{name}=[2.0,1e-10] (a constant: [v,v])")
        if name == "lr" and min(value) < 0:
            raise ConfigError(f"optimizer.schedule.lr={value} is negative",
                              "use a non-negative learning rate")
    if m.param == "code" and cfg.get("generator") is None:
        raise ConfigError(f"method {m.name} optimises a generator code but no generator is set",
                          "add generator=relu7")
    if m.param == "code" and cfg.generator.get("require_act_range") and \
            cfg.generator.get("act_range") in (None, "???"):
        raise ConfigError("generator.act_range is required by this preset (paper bounds)",
                          "set generator.act_range=/path/to/act_range_3x.txt")
    names = _plain(cfg.layers.names)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"layers.names={names} must be a non-empty list without repeats",
                          "pick a layers option (layers=all, conv, conv1-3, ...)")
    known = ARCHITECTURES[cfg.network.arch].layers if cfg.network.arch in ARCHITECTURES else {}
    ident = OmegaConf.select(cfg, "evaluation.ident_layer", default=None)
    if ident is not None and known and ident not in known:
        raise ConfigError(f"evaluation.ident_layer={ident!r} is not a layer of"
                          f" {cfg.network.arch}", f"use one of: {', '.join(known)} (or null)")
    unknown = [n for n in names if known and n not in known]
    if unknown:
        raise ConfigError(f"layers.names: {unknown} not in network {cfg.network.arch}",
                          f"use layers of {cfg.network.arch}: {', '.join(known)}")
    lg = cfg.logger
    if lg.kind == "wandb" and lg.get("mode", "offline") not in WANDB_MODES:
        raise ConfigError(f"logger.mode={lg.mode!r} is not a W&B mode",
                          "use offline (default), online or disabled")


def _check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    accel = str(t.accelerator)
    if accel not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accel!r} is not valid",
                          "use trainer=auto (GPU when present), trainer=cpu or trainer=gpu")
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accel} but this machine has no usable CUDA GPU",
                          "use trainer=auto (GPU when present) or trainer=cpu")
    if t.get("precision") not in PRECISIONS:
        raise ConfigError(f"trainer.precision={t.precision!r} is not supported",
                          f"use one of {PRECISIONS} (null: full float32)")
    if not isinstance(t.get("tf32", False), bool):
        raise ConfigError(f"trainer.tf32={t.tf32!r} must be true or false",
                          "set trainer.tf32=true or trainer.tf32=false")


def _check_choices(cfg: DictConfig) -> None:
    """Values that would otherwise fail only when the first image starts (or in Lightning)."""
    m, net = cfg.method, cfg.network
    mode = _plain(cfg.layer_weights.mode)
    if not (mode in LAYER_WEIGHTINGS or isinstance(mode, dict)):
        raise ConfigError(f"layer_weights.mode={mode!r} is not valid",
                          "use layer_weights=inverse_norm or layer_weights=uniform"
                          " (or a dict layer -> weight)")
    inits = PIXEL_INITS if m.param == "pixel" else CODE_INITS
    if isinstance(m.get("init"), str) and m.init not in inits:
        raise ConfigError(f"method.init={m.init!r} is not valid for {m.name}",
                          f"use one of {inits}")
    loss = _plain(m.get("loss_type", "l2"))
    kinds = list(loss.values()) if isinstance(loss, dict) else [loss]
    if any(k not in LOSSES for k in kinds):
        raise ConfigError(f"method.loss_type={loss!r} is not valid",
                          f"use one of {sorted(LOSSES)} (or a dict layer -> loss type)")
    size, mean = _plain(net.input_size), _plain(net.mean_bgr)
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ConfigError(f"network.input_size={size!r} must be [height, width] in pixels",
                          "set network.input_size=[224,224] (the size the features were made at)")
    if not (isinstance(mean, list) and len(mean) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in mean)):
        raise ConfigError(f"network.mean_bgr={mean!r} must be three numbers (B, G, R)",
                          "set network.mean_bgr=[104.007,116.669,122.679] (paper) or [104,117,123]")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer", "set seed=0 (or any integer)")
    g = cfg.get("generator")
    if m.param == "code" and g is not None and g.get("act_range") is None and \
            not (isinstance(g.lower, int | float) and isinstance(g.upper, int | float)
                 and g.lower < g.upper):
        raise ConfigError(f"generator bounds lower={g.lower!r}, upper={g.upper!r} are not a range",
                          "set generator.lower < generator.upper (default 0 and 100)")


def _check_data(cfg: DictConfig) -> None:
    d = cfg.data
    if d.kind not in DATA_KINDS:
        raise ConfigError(f"data.kind={d.kind!r} is not valid", f"use one of {DATA_KINDS}")
    if d.kind == "demo":
        if demo_source(d) not in DEMO_SOURCES:
            raise ConfigError(f"data.source={d.source!r} is not valid",
                              f"use one of {DEMO_SOURCES}")
        if demo_source(d) == "decoded" and subject_id(cfg.subject, "bdpy") not in CONFUSION:
            raise ConfigError(f"subject={cfg.subject}: the demo has no such subject",
                              f"use subject=1, 2 or 3 ({', '.join(CONFUSION)})")
    for key in ("limit", "batch_size", "num_shards"):
        v = d.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            hint = f"set data.{key}=1 or more" + (" (or null)" if key == "limit" else "")
            raise ConfigError(f"data.{key}={v!r} must be a positive integer", hint)
    shard, shards = d.get("shard", 0), d.get("num_shards", 1)
    if not isinstance(shard, int) or not 0 <= shard < shards:
        raise ConfigError(f"data.shard={shard!r} is not in 0..{shards - 1}",
                          "use 0 <= data.shard < data.num_shards")
    std = d.get("std_correction", "none")
    if std not in STD_MODES:
        raise ConfigError(f"data.std_correction={std!r} is not valid", f"use one of {STD_MODES}")
    target = str(OmegaConf.select(cfg, "optimizer.factory._target_", default=""))
    if target.endswith("ScipyLBFGSB") and (d.get("batch_size") or 1) > 1:
        raise ConfigError(f"data.batch_size={d.batch_size} with L-BFGS: the images would share"
                          " one line search", "L-BFGS methods reconstruct one image per"
                          " problem: set data.batch_size=1")
    if std == "centered" and d.get("train_mean") is None:
        raise ConfigError("data.std_correction=centered needs the training mean of each layer",
                          "set data.train_mean=<.mat file> or use data.std_correction=paper")
    if d.kind != "demo":
        _path(_require(cfg, "data.root", f"set data.root=<path> for data={d.name}"),
              "data.root")
    if d.kind in ("decoded", "decoded_caffe") and std != "none":
        _require(cfg, "data.std_ref", f"data.std_correction={std} needs reference stds: set"
                 " data.std_ref=<estimated_vgg19_cnn_feat_std.mat> or data.std_correction=none")


def _check_files(cfg: DictConfig) -> None:
    """Files named in the config must exist before the (slow) networks are built."""
    for key in ("network.weights", "generator.weights", "generator.act_range", "data.std_ref",
                "data.train_mean", "data.stimuli"):
        value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
        if value not in (None, "???"):
            _path(value, key)


def demo_source(d: DictConfig) -> str:
    """``data.source`` of the demo; a bare ``true`` on the command line is a YAML bool."""
    return "true_features" if d.get("source") is True else str(d.get("source"))


def build_steps(steps: Mapping[str, Any] | None) -> GDSteps | None:
    """The method's ``steps`` block -> ``GDSteps`` (None for L-BFGS methods)."""
    if steps is None:
        return None
    s = dict(steps)
    regs = [Regularizer(kind, float(s[kind]["order"]), linear(s[kind]["lamda"]))
            for kind in ("p_norm", "tv") if s.get(kind)]

    def clip(key: str) -> Clipping | None:
        c = s.get(key)
        return None if not c else Clipping(int(c["every"]), linear(c["pct"]))

    return GDSteps(
        normalize_grad=bool(s.get("normalize_grad", True)),
        decay=linear(s.get("decay")), blur_sigma=linear(s.get("blur_sigma")),
        jitter=int(s.get("jitter") or 0), regularizers=regs,
        clip_extreme=clip("clip_extreme"), clip_small_norm=clip("clip_small_norm"),
        clip_small_contribution=clip("clip_small_contribution"),
    )


def build_encoder_from_cfg(cfg: DictConfig) -> tuple[FeatureEncoder, str]:
    net = cfg.network
    weights = None if net.weights is None else _path(net.weights, "network.weights")
    encoder = build_encoder(net.arch, weights, _plain(net.mean_bgr),
                            tuple(_plain(net.input_size)), seed=cfg.seed)
    network_id = f"{net.arch}|{weights.resolve() if weights else f'random-seed{cfg.seed}'}"
    if weights is not None:
        network_id += f"|{weights.stat().st_size}|{int(weights.stat().st_mtime)}"
    return encoder, network_id


def build_recipe(cfg: DictConfig, encoder: FeatureEncoder) -> dict[str, Any]:
    """``build_reconstruction`` keyword arguments from method, optimizer and generator."""
    m = cfg.method
    try:
        optimizer = hydra.utils.instantiate(cfg.optimizer.factory)
    except InstantiationException as exc:
        raise ConfigError(f"optimizer.factory cannot be built: {str(exc).splitlines()[0]}",
                          "pick an optimizer option: optimizer=sgd_momentum, adam, adamw or"
                          " lbfgsb") from exc
    recipe: dict[str, Any] = {
        "optimizer": optimizer,
        "n_iter": int(m.n_iter),
        "schedules": {k: linear(v) for k, v in _plain(cfg.optimizer.schedule or {}).items()},
        "steps": build_steps(_plain(m.steps)),
        "init": m.init,
        "pixel_bounds": bool(m.pixel_bounds),
        "loss_type": m.loss_type,
        "return_last_forward": bool(m.return_last_forward),
    }
    if m.param == "code":
        g = cfg.generator
        weights = None if g.weights is None else _path(g.weights, "generator.weights")
        generator = build_generator(g.arch, weights, seed=cfg.seed)
        dim = int(getattr(generator, "input_size", 4096))
        upper = (load_act_range(_path(g.act_range, "generator.act_range"), expected_len=dim)
                 if g.act_range is not None else float(g.upper))
        recipe["generator"] = generator
        recipe["code_bounds"] = (float(g.lower), upper)
    return recipe


def build_datamodule(cfg: DictConfig, encoder: FeatureEncoder, network_id: str
                     ) -> tuple[ReconDataModule, str]:
    """The DataModule for ``cfg.data`` and the subject id used in output paths."""
    d = cfg.data
    layers = list(_plain(cfg.layers.names))
    shapes = expected_shapes(encoder, layers)
    common = {
        "weights": _plain(cfg.layer_weights.mode), "labels": _plain(d.get("labels")),
        "limit": d.get("limit"), "num_shards": d.get("num_shards", 1),
        "shard": d.get("shard", 0), "batch_size": d.get("batch_size", 1),
        "num_workers": d.get("num_workers", 0),
    }
    std = {"std_correction": d.get("std_correction", "none"), "ref_std": None,
           "train_mean": None}
    if d.get("std_ref") not in (None, "???"):
        std["ref_std"] = load_reference_std(_path(d.std_ref, "data.std_ref"), layers)
    if d.get("train_mean") is not None:
        means = load_mat_dict(_path(d.train_mean, "data.train_mean"))
        std["train_mean"] = {n: np.asarray(means[n]) for n in layers if n in means}

    if d.kind == "demo":
        sub = subject_id(cfg.subject, "bdpy")
        demo = Demo(d.root, encoder, network_id)
        source_kind = demo_source(d)
        wanted = select_labels(STIMULI, _plain(d.get("labels")), d.get("limit"))
        demo.ensure(wanted, subject=sub if source_kind == "decoded" else None)
        stimuli = ImageFolder(demo.stimuli_dir, encoder.input_size)
        if source_kind == "decoded":
            source = DecodedFeatures(demo.decoded_dir, sub, cfg.roi, layers)
            if std["ref_std"] is None and std["std_correction"] != "none":
                std["ref_std"] = load_reference_std(demo.std_file, layers)
        else:
            source, sub = TrueFeatures(demo.true_dir, layers), TRUE_FEATURES
            std["std_correction"] = "none"
        return ReconDataModule(source, shapes, stimuli=stimuli, **std, **common), sub

    root = _path(_require(cfg, "data.root", f"set data.root=<path> for data={d.name}"),
                 "data.root")
    if d.kind == "true_features":
        images = ImageFolder(root, encoder.input_size)
        source = ImageFeatures(images, encoder, layers)
        std["std_correction"] = "none"
        return ReconDataModule(source, shapes, stimuli=images, **std, **common), TRUE_FEATURES
    stimuli = (ImageFolder(_path(d.stimuli, "data.stimuli"), encoder.input_size)
               if d.get("stimuli") else None)
    if d.kind == "decoded":
        sub = subject_id(cfg.subject, "bdpy")
        source = DecodedFeatures(root, sub, cfg.roi, layers, fold=d.get("fold"))
    else:
        sub = subject_id(cfg.subject, "caffe")
        source = CaffeDecodedFeatures(root, sub, cfg.roi, layers,
                                      feature_type=d.feature_type, net=d.net)
    return ReconDataModule(source, shapes, stimuli=stimuli, **std, **common), sub


def build_job(cfg: DictConfig, run_dir: str | Path, group: str | None = None) -> Job:
    """Check ``cfg``, build networks, data, outputs and logger: a ready-to-run ``Job``."""
    check_config(cfg)
    encoder, network_id = build_encoder_from_cfg(cfg)
    recipe = build_recipe(cfg, encoder)
    datamodule, sub = build_datamodule(cfg, encoder, network_id)
    datamodule.setup("predict")  # lists labels: fails now, not after the first image
    # Shards of a job write images and tables to its shared directory; their loggers
    # stay in each shard's own run_dir (see icnn_pl.sweep).
    shards = (cfg.data.get("num_shards", 1), cfg.data.get("shard", 0))
    outputs = ReconOutputs(results_dir(run_dir, *shards), sub, cfg.roi)
    lg = cfg.logger
    name = "-".join(filter(None, (outputs.run_dir.name, shard_name(*shards))))
    logger = make_logger(
        lg.kind, run_dir, name=name, project=lg.get("project", "icnn-pl"),
        group=lg.get("group") or group or cfg.method.name, mode=lg.get("mode", "offline"),
        tags=_plain(lg.get("tags")) or [cfg.method.name, sub, cfg.roi],
        config=_plain(cfg),
    )
    t = cfg.trainer
    trainer_args = {"accelerator": t.accelerator, "devices": t.devices,
                    "log_every_n_steps": t.get("log_every_n_steps", 10)}
    if t.get("precision") is not None:
        trainer_args["precision"] = t.precision
    if t.get("tf32"):
        trainer_args["tf32"] = True
    return Job(datamodule=datamodule, encoder=encoder, recipe=recipe, outputs=outputs,
               method=cfg.method.name, subject=sub, roi=cfg.roi, trainer_args=trainer_args,
               logger=logger, resume=bool(cfg.resume), fail_fast=bool(cfg.fail_fast),
               seed=int(cfg.seed), progress=bool(cfg.progress),
               snapshot_every=int(cfg.get("snapshot_every") or 0),
               feature_fit=bool(OmegaConf.select(cfg, "evaluation.feature_fit", default=True)),
               ident_layer=OmegaConf.select(cfg, "evaluation.ident_layer", default=None),
               info={"layers": cfg.layers.name, "network": cfg.network.name,
                     "network_weights": cfg.network.weights, "data": cfg.data.name,
                     "optimizer": cfg.optimizer.name, "n_iter": int(cfg.method.n_iter),
                     "generator": None if cfg.get("generator") is None else cfg.generator.name,
                     "seed": int(cfg.seed)})
