"""Checks of a composed config before anything is built (networks, data, logger).

Each rule lives with the part that owns it (the engine, the data readers, the loggers);
this module calls those same checks with the config's values, in the order a user would
fix them, so a bad value fails at once with the config key and the fix. What only the
config knows (its own value formats: schedules as [start, end], sizes, means, seed, the
generator group) is checked here.
"""

from __future__ import annotations

import importlib
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from icnn_pl.data.datamodule import check_selection
from icnn_pl.data.demo import demo_subject
from icnn_pl.data.std_correction import check_std_correction
from icnn_pl.engine.evaluate_only import evaluates_only
from icnn_pl.engine.fit import check_deterministic, check_trainer_options, resolve_device
from icnn_pl.engine.lbfgsb import check_one_problem, check_transforms
from icnn_pl.engine.objective import check_layer_weighting, check_loss_type
from icnn_pl.engine.params import SQUASHES, check_init, colour_matrix_bgr
from icnn_pl.engine.reconstruction import OptimizerFactory
from icnn_pl.engine.schedules import check_n_iter
from icnn_pl.engine.transforms import make_transforms
from icnn_pl.errors import ConfigError, one_line
from icnn_pl.nets import ARCHITECTURES
from icnn_pl.nets.generator import GENERATOR_SIZE
from icnn_pl.nets.input_space import parse_input_space
from icnn_pl.pipeline.data_sources import (
    DATA_SOURCES,
    DEMO_SOURCES,
    data_root,
    demo_source,
    existing_path,
    plain,
)
from icnn_pl.pipeline.loggers import check_logger

METHOD_PARAMS = ("pixel", "code", "fourier")
CUSTOM = "custom"  # network.arch of network=custom (network.module builds the encoder)
# Files a config may name: they must exist before the (slow) networks are built.
FILE_KEYS = ("network.weights", "generator.weights", "generator.act_range", "data.std_ref",
             "data.train_mean", "data.stimuli")


def check_config(cfg: DictConfig) -> None:
    """Cheap checks of config values, before anything is built."""
    factory = _check_method(cfg)  # built once: the later checks take it
    _check_network(cfg)
    _check_layer_names(cfg)
    check_logger(cfg.logger.kind, cfg.logger.get("mode", "offline"))
    t = cfg.trainer
    check_trainer_options(t.accelerator, t.get("precision"), t.get("tf32", False),
                          plain(t.get("devices", 1)), t.get("deterministic", False))
    check_deterministic(resolve_device(t.accelerator, plain(t.get("devices", 1))),
                        t.get("deterministic", False), plain(cfg.method.get("transforms")))
    _check_data(cfg, factory)
    _check_paths_exist(cfg)
    _check_values(cfg)


def optimizer_factory(cfg: DictConfig) -> OptimizerFactory:
    """``optimizer.factory`` instantiated (a partial of the optimizer class)."""
    try:
        return hydra.utils.instantiate(cfg.optimizer.factory)
    except InstantiationException as exc:
        raise ConfigError(f"optimizer.factory cannot be built: {str(exc).splitlines()[0]}",
                          "pick an optimizer option: optimizer=sgd_momentum, adam, adamw or"
                          " lbfgsb") from exc


def _check_method(cfg: DictConfig) -> OptimizerFactory:
    """The method's options; returns the optimizer factory (built once, after the
    schedules it reads are checked)."""
    m = cfg.method
    if m.param not in METHOD_PARAMS:
        raise ConfigError(f"method.param={m.param!r} is not valid", f"use one of {METHOD_PARAMS}")
    for name, value in (plain(cfg.optimizer.get("schedule")) or {}).items():
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"optimizer.schedule.{name}={value} must be [start, end]",
                              f"write optimizer.schedule.{name}=[2.0,1e-10] (a constant: [v,v])")
        if name == "lr" and min(value) < 0:
            raise ConfigError(f"optimizer.schedule.lr={value} is negative",
                              "use a non-negative learning rate")
    # after the schedules: the optimizer factory reads them
    factory = optimizer_factory(cfg)
    check_n_iter(m.n_iter, "method.n_iter", allow_zero=evaluates_only(factory))
    _check_prior(cfg, factory)
    if m.param == "code" and cfg.get("generator") is None:
        raise ConfigError(f"method {m.name} optimises a generator code but no generator is set",
                          "add generator=relu7")
    if m.param == "code" and cfg.generator.get("require_act_range") and \
            cfg.generator.get("act_range") in (None, "???"):
        raise ConfigError("generator.act_range is required by this preset (paper bounds)",
                          "set generator.act_range=/path/to/act_range_3x.txt")
    return factory


def _check_prior(cfg: DictConfig, factory: OptimizerFactory) -> None:
    """The Fourier options and the random transforms, before anything is built."""
    m = cfg.method
    if m.param == "fourier":
        f = plain(m.get("fourier")) or {}
        unknown = sorted(set(f) - {"decay", "colour", "squash"})
        if unknown:
            raise ConfigError(f"method.fourier has unknown keys {unknown}",
                              "use method.fourier.decay, .colour and .squash")
        if not _plain_number(f.get("decay", 1.0)):
            raise ConfigError(f"method.fourier.decay={f['decay']!r} must be a number",
                              "set method.fourier.decay=1.0 (lucid)")
        colour_matrix_bgr(f.get("colour", "imagenet"))
        if f.get("squash", "sigmoid") not in SQUASHES:
            raise ConfigError(f"method.fourier.squash={f['squash']!r} is not known",
                              f"use one of {SQUASHES}")
    t = plain(m.get("transforms"))
    if t:
        if m.param == "code":
            raise ConfigError(f"method.transforms with {m.name}: random transforms need an"
                              " image and a gradient method",
                              "use them with method=icnn_fourier (or icnn_gd), or set"
                              " method.transforms=null")
        check_transforms(factory, t)
        make_transforms(t, "method.transforms")


def _check_layer_names(cfg: DictConfig) -> None:
    preset = OmegaConf.to_container(cfg.layers, resolve=False).get("names")
    if isinstance(preset, str) and preset.startswith("${network.layer_presets."):
        name = preset.removeprefix("${network.layer_presets.").rstrip("}")
        presets = OmegaConf.select(cfg, "network.layer_presets", default=None) or {}
        if name not in presets:
            raise ConfigError(f"layers={cfg.layers.name}: network {cfg.network.name} has no"
                              f" layer preset {name!r}",
                              f"use one of: {', '.join(presets) or 'mapped'}, or"
                              " layers.names=[...]")
    names = plain(cfg.layers.names)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"layers.names={names} must be a non-empty list without repeats",
                          "pick a layers option (layers=all, conv, conv1-3, ...)")
    arch = cfg.network.arch
    known = ARCHITECTURES[arch].layers if arch in ARCHITECTURES else {}
    if arch == CUSTOM:
        known = plain(cfg.network.layer_mapping)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"layers.names: {unknown} not in network.layer_mapping",
                              f"use layers=mapped (all of {', '.join(known)}) or"
                              " layers.names=[...] with some of them")
        return  # a custom network without the ident layer skips identification (factory)
    ident = OmegaConf.select(cfg, "evaluation.ident_layer", default=None)
    if ident is not None and known and ident not in known:
        raise ConfigError(f"evaluation.ident_layer={ident!r} is not a layer of {arch}",
                          f"use one of: {', '.join(known)} (or null)")
    unknown = [n for n in names if known and n not in known]
    if unknown:
        raise ConfigError(f"layers.names: {unknown} not in network {arch}",
                          f"use layers of {arch}: {', '.join(known)}")


def _check_network(cfg: DictConfig) -> None:
    """network=custom: an importable module, a layer mapping, a known input space."""
    net = cfg.network
    space = plain(net.get("input_space", "caffe_bgr"))
    try:
        parse_input_space(space)
    except ConfigError as exc:
        raise ConfigError(f"network.input_space={space!r} is not valid: {exc.problem}",
                          "use caffe_bgr (BGR 0-255 minus mean_bgr, Caffe-trained networks),"
                          " rgb_imagenet (RGB 0-1, ImageNet mean/std: torchvision models),"
                          " rgb_127_128 (RGB 0-255, (x-127)/128: TF Lite models) or"
                          " {channels: rgb|bgr, range: 255|1, mean: [..], std: [..]}") from exc
    if net.arch in ARCHITECTURES:
        return
    if net.arch != CUSTOM:
        encoders = [a for a, spec in ARCHITECTURES.items() if spec.layers]
        raise ConfigError(f"network.arch={net.arch!r} is not a network",
                          f"use network={', '.join(encoders)} or {CUSTOM}")
    module = OmegaConf.select(net, "module", throw_on_missing=False)
    example = "network.module={_target_:icnn_pl.nets.examples.TinyResNet}"
    if not isinstance(module, DictConfig) or not isinstance(module.get("_target_"), str):
        raise ConfigError("network.module must name the network's factory with _target_",
                          f"set e.g. {example} (any importable nn.Module class or function)")
    import_target(module._target_, "network.module._target_")
    mapping = plain(OmegaConf.select(net, "layer_mapping", throw_on_missing=False))
    if not (isinstance(mapping, dict) and mapping
            and all(isinstance(v, str) and v for v in mapping.values())):
        raise ConfigError(f"network.layer_mapping={mapping!r} must map feature names to"
                          " module paths", "set e.g. network.layer_mapping={block1:layer1,"
                          "block2:layer2,fc:fc} (print dict(net.named_modules()) for paths)")


def import_target(target: str, key: str) -> Any:
    """The object ``target`` names (``package.module.Name``), or a ConfigError for ``key``."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # no such module: try a shorter prefix and attributes
            raise ConfigError(f"{key}={target!r}: importing {name} failed: {exc}",
                              "install what the module needs") from exc
        except Exception as exc:
            raise ConfigError(f"{key}={target!r}: importing {name} failed: {one_line(exc)}",
                              "fix the module") from exc
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"{key}={target!r} cannot be imported",
                      "give an importable name (package.module.Class); a module of your own"
                      " must be on PYTHONPATH (or in the directory you run from)")


def _check_data(cfg: DictConfig, factory: OptimizerFactory) -> None:
    d = cfg.data
    if d.kind not in DATA_SOURCES:
        raise ConfigError(f"data.kind={d.kind!r} is not valid", f"use one of {list(DATA_SOURCES)}")
    demo = d.kind == "demo"
    if demo:
        if demo_source(d) not in DEMO_SOURCES:
            raise ConfigError(f"data.source={d.source!r} is not valid",
                              f"use one of {DEMO_SOURCES}")
        if demo_source(d) == "decoded":
            demo_subject(cfg.subject)
    check_selection(d.get("limit"), d.get("num_shards", 1), d.get("shard", 0),
                    d.get("batch_size", 1))
    check_one_problem(factory, d.get("batch_size") or 1)
    if not demo:
        data_root(cfg)
    # decoded features need reference stds; the demo brings its own
    needs_ref = d.kind in ("decoded", "decoded_caffe")
    check_std_correction(d.get("std_correction", "none"),
                         has_ref_std=not needs_ref or d.get("std_ref") not in (None, "???"),
                         has_train_mean=d.get("train_mean") is not None)


def _check_paths_exist(cfg: DictConfig) -> None:
    for key in FILE_KEYS:
        value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
        if value not in (None, "???"):
            existing_path(value, key)


def _check_values(cfg: DictConfig) -> None:
    """Values that would otherwise fail only when the first image starts (or in Lightning)."""
    m, net = cfg.method, cfg.network
    check_layer_weighting(plain(cfg.layer_weights.mode), "layer_weights.mode")
    check_init(m.get("init"), m.param, key="method.init")
    check_loss_type(plain(m.get("loss_type", "l2")), "method.loss_type")
    size, mean = plain(net.input_size), plain(net.mean_bgr)
    if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(v) for v in size)):
        raise ConfigError(f"network.input_size={size!r} must be [height, width] in pixels",
                          "set network.input_size=[224,224] (the size the features were made at)")
    if not (isinstance(mean, list) and len(mean) == 3 and all(_plain_number(v) for v in mean)):
        raise ConfigError(f"network.mean_bgr={mean!r} must be three numbers (B, G, R)",
                          "set network.mean_bgr=[104.007,116.669,122.679] (paper) or [104,117,123]")
    if m.param == "code" and max(size) > GENERATOR_SIZE:
        raise ConfigError(f"network.input_size={size}: the generator's {GENERATOR_SIZE}x"
                          f"{GENERATOR_SIZE} images are cropped to the network's input, which"
                          " cannot be larger", f"set network.input_size=[224,224] (or up to"
                          f" {GENERATOR_SIZE}) with {m.name}, or use a pixel method")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} must be an integer", "set seed=0 (or any integer)")
    g = cfg.get("generator")
    if m.param == "code" and g is not None and g.get("act_range") is None and \
            not (_plain_number(g.lower) and _plain_number(g.upper) and g.lower < g.upper):
        raise ConfigError(f"generator bounds lower={g.lower!r}, upper={g.upper!r} are not a range",
                          "set generator.lower < generator.upper (default 0 and 100)")


def _plain_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0
