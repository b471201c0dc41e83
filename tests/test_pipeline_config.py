"""The real Hydra configs (``conf/``): every option of every group composes and builds, the
per-method defaults equal the reference and the functional API, and overrides combine as
documented. In-process and fast: nothing here builds a network or touches data."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pipeline_helpers import ALL_METHODS, CONF, METHODS

from icnn_pl import icnn_dgn_gd, icnn_dgn_lbfgs, icnn_gd, icnn_lbfgs
from icnn_pl.data.readers import subject_id
from icnn_pl.engine.icnn_steps import GDSteps
from icnn_pl.engine.lbfgsb import ScipyLBFGSB
from icnn_pl.engine.schedules import Linear
from icnn_pl.errors import ConfigError
from icnn_pl.nets import ARCHITECTURES
from icnn_pl.pipeline import factory as config_mod

GROUPS = ("method", "optimizer", "network", "generator", "layers", "layer_weights", "data",
          "logger", "trainer", "experiment")
OPTIONS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in GROUPS}
GROUP_OPTIONS = [(g, o) for g in GROUPS for o in OPTIONS[g]]
# data options that read user files: check_config must ask for data.root
NEEDS_ROOT = {"decoded", "decoded_caffe", "true_features"}
LBFGS = ("icnn_lbfgs", "icnn_dgn_lbfgs")
GD = ("icnn_gd", "icnn_dgn_gd")

# options that compose only together with others (network=custom names its module)
CUSTOM_NET = ("network=custom", "network.module={_target_:icnn_pl.nets.examples.TinyResNet}",
              "network.layer_mapping={block1:layer1,fc:fc}")
# experiment=fmri_demo reads what train_decoder.py wrote (outputs/decoded): pointed at a
# folder that does not exist, so the check is the same whether or not a decoder ran here
NOT_DECODED = "/nonexistent/icnn-pl-test/decoded"
COMPANIONS = {("network", "custom"): CUSTOM_NET[1:], ("layers", "mapped"): CUSTOM_NET,
              ("experiment", "fmri_demo"): (f"data.root={NOT_DECODED}",)}


def _param(group: str, option: str):
    return pytest.param(group, option, id=f"{group}={option}")


@pytest.fixture(scope="module", autouse=True)
def hydra_conf() -> Iterator[None]:
    config_mod.register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def make(*overrides: str) -> DictConfig:
    return compose("config", overrides=list(overrides), return_hydra_config=True)


@contextlib.contextmanager
def hydra_registered(cfg: DictConfig) -> Iterator[None]:
    """``${hydra:...}`` interpolations need the config registered; always cleared after."""
    HydraConfig.instance().set_config(cfg)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None


def plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def defaults_of(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


# -- every option of every group ---------------------------------------------------------------
def test_every_group_has_options_and_its_default_is_one():
    assert all(OPTIONS[g] for g in GROUPS), OPTIONS
    assert set(OPTIONS["method"]) == set(ALL_METHODS)
    # config.yaml's defaults list names an option of each group (or none: null), and the
    # default config composes with those
    defaults = {k: v for d in OmegaConf.load(CONF / "config.yaml").defaults
                if isinstance(d, DictConfig) for k, v in d.items()}
    assert set(GROUPS) <= set(defaults), sorted(defaults)
    for g in GROUPS:
        assert defaults[g] is None or defaults[g] in OPTIONS[g], (g, defaults[g])
    cfg = make()
    assert cfg.method.name == defaults["method"] and cfg.data.name == defaults["data"]


@pytest.mark.parametrize(("group", "option"), [_param(g, o) for g, o in GROUP_OPTIONS])
def test_option_composes_and_checks(group, option):
    cfg = make(f"{group}={option}", *COMPANIONS.get((group, option), ()))
    if group == "experiment":
        assert cfg.method.name in ALL_METHODS
    elif group == "method":
        assert cfg.method.name == option
    elif "name" in cfg[group]:
        assert cfg[group].name == option  # the file's own `name` matches the option
    if group == "data":
        assert cfg.data.kind == option or option == "demo" and cfg.data.kind == "demo"
    if group == "network":
        assert cfg.network.arch in ARCHITECTURES or cfg.network.arch == "custom"
    if group == "generator":
        assert cfg.generator.arch in ARCHITECTURES
    if group == "logger":
        assert cfg.logger.kind == option
    if group == "layers":
        assert list(cfg.layers.names)
    # The job config resolves without the hydra node registered (only hydra.* uses ${hydra:})
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(job_cfg, resolve=True)

    if group == "data" and option in NEEDS_ROOT:
        with pytest.raises(ConfigError, match=r"data\.root"):
            config_mod.check_config(cfg)
    elif (group, option) == ("trainer", "gpu") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"trainer\.accelerator=gpu"):
            config_mod.check_config(cfg)
    elif (group, option) == ("network", "efficientnet_lite2"):  # 260 px > the DGN's 256
        with pytest.raises(ConfigError, match=r"generator's 256x256 images"):
            config_mod.check_config(cfg)
    elif (group, option) == ("network", "custom"):  # layers=all: every mapped layer
        assert list(cfg.layers.names) == list(cfg.network.layer_mapping)
        config_mod.check_config(cfg)
    elif (group, option) == ("experiment", "fmri_demo"):  # before train_decoder.py ran
        with pytest.raises(ConfigError, match=r"data\.root: no such file or directory"):
            config_mod.check_config(cfg)
    elif (group, option) != ("experiment", "fig2"):  # see test_experiment_fig2_requires_*
        config_mod.check_config(cfg)


@pytest.mark.parametrize("option", OPTIONS["optimizer"])
@pytest.mark.parametrize("method", METHODS)
def test_optimizer_factory_instantiates(method, option):
    cfg = make(f"method={method}", f"optimizer={option}")
    assert cfg.optimizer.name == option  # the user's optimizer wins over the method's
    factory = instantiate(cfg.optimizer.factory)
    assert callable(factory)
    assert isinstance(factory, functools.partial)
    schedule = plain(cfg.optimizer.schedule)
    if "lr" in schedule:
        assert factory.keywords["lr"] == schedule["lr"][0]
    if factory.func is ScipyLBFGSB:
        assert factory.keywords["maxiter"] == cfg.method.n_iter
    else:
        opt = factory([torch.zeros(3, requires_grad=True)])
        assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("method", METHODS)
def test_build_steps_for_every_method(method):
    cfg = make(f"method={method}")
    steps = config_mod.build_steps(plain(cfg.method.steps))
    if method in LBFGS:
        assert steps is None
        return
    assert isinstance(steps, GDSteps)
    assert steps.normalize_grad is True
    assert steps.jitter == 0 and steps.regularizers == []
    assert steps.clip_extreme is steps.clip_small_norm is steps.clip_small_contribution is None
    if method == "icnn_gd":
        assert steps.decay == Linear(0.2, 1e-10)
        assert steps.blur_sigma == Linear(2.0, 0.5)
    else:
        assert steps.decay == Linear(0.01, 0.01)
        assert steps.blur_sigma is None


def test_build_steps_optional_blocks():
    steps = config_mod.build_steps({
        "normalize_grad": False, "decay": 0.1, "blur_sigma": None, "jitter": 32,
        "p_norm": {"order": 3, "lamda": [0.5, 0.5]}, "tv": {"order": 2, "lamda": [0.5, 0.1]},
        "clip_extreme": {"every": 4, "pct": [1, 1]}, "clip_small_norm": None,
        "clip_small_contribution": {"every": 4, "pct": [5, 5]}})
    assert steps.normalize_grad is False and steps.decay == Linear(0.1, 0.1)
    assert steps.jitter == 32 and len(steps.regularizers) == 2
    assert steps.clip_extreme.every == 4 and steps.clip_small_norm is None
    assert steps.clip_small_contribution.pct == Linear(5.0, 5.0)


@pytest.mark.parametrize("option", OPTIONS["logger"])
def test_logger_options_instantiate(option, tmp_path):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from icnn_pl.pipeline.loggers import make_logger

    lg = make(f"logger={option}").logger
    if option == "wandb":  # started for real in test_pipeline_run.py; here: its mode check
        assert lg.mode == "offline" and lg.project
        with pytest.raises(ConfigError, match="logger.mode"):
            make_logger(lg.kind, tmp_path, "x", mode="bogus")
        return
    logger = make_logger(lg.kind, tmp_path, "x")
    expected = {"none": type(None), "csv": CSVLogger, "tensorboard": TensorBoardLogger}[option]
    assert isinstance(logger, expected)
    if logger is not None:
        assert Path(logger.log_dir).resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("option", OPTIONS["trainer"])
def test_trainer_options_instantiate(option):
    from icnn_pl.engine.fit import make_trainer

    t = make(f"trainer={option}").trainer
    if t.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU here")
    trainer = make_trainer(3, accelerator=t.accelerator, devices=t.devices,
                           log_every_n_steps=t.log_every_n_steps, precision=t.precision)
    assert trainer.max_steps == 3 and trainer.logger is None


@pytest.mark.parametrize("option", OPTIONS["layer_weights"])
def test_layer_weights_options(option):
    from icnn_pl.engine.objective import layer_weights

    mode = make(f"layer_weights={option}").layer_weights.mode
    targets = {"a": torch.ones(2, 4), "b": torch.full((2, 3), 2.0)}
    w = layer_weights(targets, mode)
    assert set(w) == {"a", "b"} and w["a"].shape == (2,)
    assert torch.allclose(w["a"] + w["b"], torch.ones(2))
    if option == "uniform":
        assert torch.allclose(w["a"], torch.full((2,), 0.5))
    else:  # 1/||t||^2 normalised: ||a||^2 = 4, ||b||^2 = 12
        assert torch.allclose(w["a"], torch.full((2,), 0.75))


# -- per-method defaults: the reference and the functional API ---------------------------------
def test_icnn_gd_defaults_match_reference_and_api():
    cfg = make("method=icnn_gd")
    m, sched = cfg.method, plain(cfg.optimizer.schedule)
    assert (m.name, m.param, m.n_iter, m.init, m.loss_type) == (
        "icnn_gd", "pixel", 200, "uniform", "l2")
    assert cfg.optimizer.name == "sgd_momentum" and cfg.get("generator") is None
    assert sched == {"lr": [2.0, 1e-10], "momentum": [0.9, 0.9]}
    assert list(m.steps.decay) == [0.2, 1e-10] and list(m.steps.blur_sigma) == [2.0, 0.5]
    assert m.steps.normalize_grad is True and m.pixel_bounds is False
    api = defaults_of(icnn_gd.reconstruct_image)
    assert api["iter_n"] == m.n_iter
    assert [api["lr_start"], api["lr_end"]] == sched["lr"]
    assert [api["momentum_start"], api["momentum_end"]] == sched["momentum"]
    assert [api["decay_start"], api["decay_end"]] == list(m.steps.decay)
    assert [api["sigma_start"], api["sigma_end"]] == list(m.steps.blur_sigma)
    assert api["grad_normalize"] is m.steps.normalize_grad
    assert api["image_blur"] is True and api["image_jitter"] is False and m.steps.jitter == 0
    assert api["use_p_norm_reg"] is False and m.steps.p_norm is None
    assert api["use_TV_norm_reg"] is False and m.steps.tv is None
    assert not any(api[k] for k in ("clip_extreme", "clip_small_norm",
                                    "clip_small_contribution"))
    assert api["initial_image"] == m.init and api["loss_type"] == m.loss_type


def test_icnn_dgn_gd_defaults_match_reference_and_api():
    cfg = make("method=icnn_dgn_gd")
    m, g, sched = cfg.method, cfg.generator, plain(cfg.optimizer.schedule)
    assert (m.name, m.param, m.n_iter, m.init) == ("icnn_dgn_gd", "code", 200, "normal")
    assert g.name == "relu7" and m.return_last_forward is True
    assert list(m.steps.decay) == [0.01, 0.01] and m.steps.normalize_grad is True
    assert m.steps.blur_sigma is None
    assert sched == {"lr": [2.0, 1e-10], "momentum": [0.9, 0.9]}
    api = defaults_of(icnn_dgn_gd.reconstruct_image)
    assert api["iter_n"] == m.n_iter
    assert [api["lr_start"], api["lr_end"]] == sched["lr"]
    assert [api["momentum_start"], api["momentum_end"]] == sched["momentum"]
    assert [api["decay_start"], api["decay_end"]] == list(m.steps.decay)
    assert api["initial_gen_feat"] == m.init
    assert api["feat_lower_bound"] == g.lower == 0.0
    assert api["feat_upper_bound"] == g.upper == 100.0 and g.act_range is None


@pytest.mark.parametrize("method", LBFGS)
def test_lbfgs_defaults_match_reference_and_api(method):
    cfg = make(f"method={method}")
    m = cfg.method
    fn = {"icnn_lbfgs": icnn_lbfgs, "icnn_dgn_lbfgs": icnn_dgn_lbfgs}[method].reconstruct_image
    api = defaults_of(fn)
    factory = plain(cfg.optimizer.factory)
    assert cfg.optimizer.name == "lbfgsb" and m.steps is None
    assert m.n_iter == 500 and factory["maxiter"] == 500 == api["maxiter"]  # interpolated
    for key in ("m", "ftol", "gtol", "maxls", "loss_scale"):
        assert factory[key] == api[key], key
    assert (factory["m"], factory["gtol"], factory["maxls"]) == (10, 1e-5, 20)
    assert m.init == api["initial_gen_feat" if method == "icnn_dgn_lbfgs" else "initial_image"]
    assert plain(cfg.optimizer.schedule) == {}
    if method == "icnn_lbfgs":
        assert m.param == "pixel" and m.pixel_bounds is True  # raw pixels in [0, 255]
    else:
        assert m.param == "code" and cfg.generator.name == "relu7"
        assert (cfg.generator.lower, cfg.generator.upper) == (
            api["feat_lower_bound"], api["feat_upper_bound"]) == (0.0, 100.0)
    # a shorter run re-interpolates maxiter
    assert instantiate(make(f"method={method}", "method.n_iter=7").optimizer.factory
                       ).keywords["maxiter"] == 7


def test_default_method_is_the_paper_fig2_method():
    cfg = make()
    assert cfg.method.name == "icnn_dgn_gd" and cfg.data.name == "demo"
    assert cfg.logger.kind == "wandb" and cfg.logger.mode == "offline"
    assert cfg.layers.name == "all" and len(cfg.layers.names) == 19
    assert cfg.layer_weights.mode == "inverse_norm"


# -- overrides combine as documented -----------------------------------------------------------
def test_user_optimizer_swap_on_lbfgs_method():
    cfg = make("method=icnn_lbfgs", "optimizer=adam")
    assert cfg.method.name == "icnn_lbfgs" and cfg.optimizer.name == "adam"
    factory = instantiate(cfg.optimizer.factory)
    assert factory.func is torch.optim.Adam and factory.keywords["lr"] == 0.1
    recipe_steps = config_mod.build_steps(plain(cfg.method.steps))
    assert recipe_steps is None


@pytest.mark.parametrize("order", ["method_first", "optimizer_first"])
def test_method_override_keeps_cli_optimizer(order):
    ov = ["method=icnn_gd", "optimizer=adamw"]
    cfg = make(*(ov if order == "method_first" else ov[::-1]))
    assert cfg.method.name == "icnn_gd" and cfg.optimizer.name == "adamw"
    assert instantiate(cfg.optimizer.factory).func is torch.optim.AdamW


def test_method_sets_its_optimizer_and_generator():
    assert make("method=icnn_gd").optimizer.name == "sgd_momentum"
    assert make("method=icnn_lbfgs").optimizer.name == "lbfgsb"
    assert make("method=icnn_gd").get("generator") is None
    assert make("method=icnn_lbfgs").get("generator") is None
    assert make("method=icnn_dgn_lbfgs").generator.name == "relu7"


def test_experiment_fig3a():
    cfg = make("experiment=fig3a")
    assert (cfg.method.name, cfg.method.n_iter, cfg.method.init) == ("icnn_lbfgs", 200, "mean")
    assert cfg.optimizer.name == "lbfgsb"
    assert instantiate(cfg.optimizer.factory).keywords["maxiter"] == 200
    config_mod.check_config(cfg)


@pytest.mark.parametrize("option", [o for o in OPTIONS["experiment"] if o.startswith("fig4_")])
def test_experiment_fig4_layer_sets(option):
    cfg = make(f"experiment={option}")
    assert cfg.layers.name == option.removeprefix("fig4_")
    assert (cfg.method.name, cfg.method.n_iter) == ("icnn_lbfgs", 200)
    # "add method=... to compare other methods"
    other = make(f"experiment={option}", "method=icnn_gd")
    assert other.method.name == "icnn_gd" and other.layers.name == cfg.layers.name


def test_experiment_fig2():
    cfg = make("experiment=fig2")
    assert (cfg.method.name, cfg.method.n_iter, cfg.method.init) == ("icnn_dgn_gd", 200, "zeros")
    assert cfg.layers.name == "all" and cfg.generator.name == "relu7"
    filled = make("experiment=fig2", "generator.act_range=/some/act_range_3x.txt")
    assert filled.generator.act_range == "/some/act_range_3x.txt"


def test_experiment_fig2_requires_act_range():
    cfg = make("experiment=fig2")
    assert cfg.generator.require_act_range is True and cfg.generator.act_range is None
    with pytest.raises(ConfigError, match=r"generator\.act_range"):
        config_mod.check_config(cfg)


def test_subject_ids():
    assert subject_id(1, "bdpy") == "sub-01" and subject_id("1", "bdpy") == "sub-01"
    assert subject_id(1, "caffe") == "S1" and subject_id("sub-02", "caffe") == "S2"
    assert subject_id(make("subject=1").subject, "bdpy") == "sub-01"
    assert subject_id(make("subject=3").subject, "caffe") == "S3"
    with pytest.raises(ConfigError):
        subject_id(0, "bdpy")


# -- check_config ------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "key"), [
    (["method.n_iter=0"], "method.n_iter"),
    (["method.n_iter=-5"], "method.n_iter"),
    (["method.n_iter=2.5"], "method.n_iter"),
    (["method.n_iter=true"], "method.n_iter"),
    (["method=icnn_gd", "optimizer.schedule.lr=[-1,0]"], "optimizer.schedule.lr"),
    (["method.param=voxels"], "method.param"),
    (["~generator"], "generator"),
    (["data.std_correction=bogus"], "data.std_correction"),
    (["data.kind=bogus"], "data.kind"),
    (["layers.names=[]"], "layers.names"),
    (["layers.names=[conv1_1,conv1_1]"], "layers.names"),
    (["network.weights=/nonexistent.pt"], "network.weights"),
    (["generator.weights=/nonexistent.pt"], "generator.weights"),
    (["generator.act_range=/nonexistent.txt"], "generator.act_range"),
    (["data=decoded"], "data.root"),
    (["data=decoded", "data.root=/nonexistent"], "data.root"),
    (["data=decoded", "data.root=/"], "data.std_ref"),
    (["data=decoded_caffe", "data.root=/", "data.std_ref=/nonexistent.mat"], "data.std_ref"),
    (["trainer.precision=8-bit"], "trainer.precision"),
    (["trainer.precision=16"], "trainer.precision"),
    (["trainer.tf32=maybe"], "trainer.tf32"),
    (["trainer.precision=16-mixed"], "trainer.precision"),  # loss scaling vs normalised grads
    (["trainer.devices=2"], "trainer.devices"),  # DDP would relaunch the script per rank
    (["trainer.devices=-1"], "trainer.devices"),
    (["trainer.devices=auto"], "trainer.devices"),
    (["trainer.devices=[0,1]"], "trainer.devices"),
    (["trainer.deterministic=maybe"], "trainer.deterministic"),
])
def test_check_config_rejects(overrides, key):
    with pytest.raises(ConfigError) as err:
        config_mod.check_config(make(*overrides))
    assert key in str(err.value)
    assert err.value.fix  # every error says how to fix it


@pytest.mark.parametrize("override", ["trainer.precision=bf16-mixed", "trainer.tf32=true",
                                      "trainer.deterministic=true", "trainer.devices=[0]"])
def test_precision_options_reach_the_trainer(override, tmp_path):
    # the demo (data=demo) is written under data.root: tmp_path, not the checkout's data/demo
    cfg = make(override, "logger=none", "method=icnn_gd", "network.input_size=[32,32]",
               f"data.root={tmp_path / 'demo'}")
    with open_dict(cfg):
        del cfg["hydra"]  # build_job gets the job's config, as train_recon.py's main does
    args = config_mod.build_job(cfg, tmp_path).trainer_args
    assert args.get("precision") == cfg.trainer.precision
    assert args.get("tf32", False) == cfg.trainer.tf32
    assert args["deterministic"] == cfg.trainer.deterministic
    assert args["devices"] == OmegaConf.to_container(cfg.trainer, resolve=True)["devices"]


def test_check_config_accepts_decoded_without_std_correction(tmp_path):
    config_mod.check_config(make("data=decoded", f"data.root={tmp_path}",
                                 "data.std_correction=none"))


@pytest.mark.parametrize("override", ["optimizer.schedule.lr=0.5",
                                      "optimizer.schedule.momentum=0.5"])
def test_check_config_scalar_schedule_is_a_config_error(override):
    try:
        config_mod.check_config(make("method=icnn_gd", override))
    except ConfigError as exc:
        assert "optimizer.schedule" in str(exc)


@pytest.mark.parametrize("data", ["demo", "decoded"])
def test_check_config_centered_needs_train_mean(data, tmp_path):
    std = tmp_path / "std.mat"
    std.write_bytes(b"")
    overrides = [f"data={data}", "data.std_correction=centered"]
    if data != "demo":
        overrides += [f"data.root={tmp_path}", f"data.std_ref={std}"]
    with pytest.raises(ConfigError, match=r"data\.train_mean"):
        config_mod.check_config(make(*overrides))


# -- the run directory: ${icnn.run_name:${hydra:job.override_dirname}} ---------------------------
def test_run_dir_needs_registered_hydra_config():
    HydraConfig.instance().cfg = None
    cfg = make("method=icnn_gd")
    with pytest.raises(Exception, match="HydraConfig was not set"):
        OmegaConf.to_container(cfg.hydra.run, resolve=True)


def test_run_dir_names():
    cfg = make()
    with hydra_registered(cfg):
        assert cfg.hydra.run.dir == "outputs/default"
    overrides = ["method=icnn_gd", "data.root=/a/b", "subject=2", "resume=false",
                 "logger=csv", "progress=false", "fail_fast=true", "trainer=cpu"]
    cfg = make(*overrides)
    with hydra_registered(cfg):
        run_dir, subdir = cfg.hydra.run.dir, cfg.hydra.sweep.subdir
    assert HydraConfig.initialized() is False
    assert run_dir == "outputs/data.root=_a_b,method=icnn_gd,subject=2"
    assert subdir == run_dir.removeprefix("outputs/")
    # the same command maps to the same directory (resume); another value to another
    other = make(*overrides[:-1], "subject=3")
    with hydra_registered(other):
        assert other.hydra.run.dir != run_dir
    again = make(*overrides)
    with hydra_registered(again):
        assert again.hydra.run.dir == run_dir


def test_run_dir_name_fits_file_system():
    labels = ",".join(f"n0{i:07d}_{i:05d}" for i in range(20))  # 20 ImageNet-style stems
    cfg = make("method=icnn_gd", f"data.labels=[{labels}]")
    with hydra_registered(cfg):
        name = cfg.hydra.run.dir.removeprefix("outputs/")
        sub = cfg.hydra.sweep.subdir
    assert len(name.encode()) <= 255 and len(sub.encode()) <= 255


def test_lbfgs_with_batches_fails_early():
    cfg = make("method=icnn_lbfgs", "data.batch_size=2")
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        config_mod.check_config(cfg)
    config_mod.check_config(make("method=icnn_gd", "data.batch_size=2"))
