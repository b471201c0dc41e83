"""GPU hazards (issue 15), shown on the CPU where the logic allows, and GPU-marked tests
(``-m gpu``, skipped without CUDA) for what only a GPU shows.

1 the result is made before Lightning's teardown; 2 16-mixed rejected, the blur keeps
float32 under autocast; 3 one device per process; 4 shard i on GPU i; 5 no per-fit CUDA
cache emptying or module moves; 6 no host round trips in the GD loop; 7 determinism and
8 TF32 only while a fit runs (``test_engine_resources.py``).
"""

from __future__ import annotations

import contextlib
import os
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from engine_helpers import TinyGenerator, batched_tiny_targets, tiny_encoder
from fake_cuda import fake_cuda

from icnn_pl.engine.evaluate_only import EvaluateOnly
from icnn_pl.engine.fit import (
    KeepOnDevice,
    _LeanCUDA,
    check_devices,
    check_trainer_options,
    deterministic_cublas,
    fit,
    lean_strategy,
    make_trainer,
)
from icnn_pl.engine.icnn_steps import Clipping, GDSteps, Regularizer, gaussian_blur
from icnn_pl.engine.lbfgsb import ScipyLBFGSB
from icnn_pl.engine.recipe import build_reconstruction
from icnn_pl.engine.reconstruction import Reconstruction
from icnn_pl.engine.schedules import Linear
from icnn_pl.engine.transforms import RandomTransforms
from icnn_pl.errors import ConfigError
from icnn_pl.pipeline.devices import HOST_GPUS_ENV, job_gpu, pin_job_gpu, remember_host_gpus

CPU = {"accelerator": "cpu", "devices": 1}
# Every per-iteration operation of the pixel method, each due at every iteration.
ALL_STEPS = GDSteps(
    decay=Linear(0.2, 1e-10), blur_sigma=Linear(2.0, 0.5),
    regularizers=[Regularizer("p_norm", 6.0, Linear(1e-3, 1e-3)),
                  Regularizer("tv", 2.0, Linear(1e-3, 1e-3))],
    clip_extreme=Clipping(1, Linear(1.0, 1.0)), clip_small_norm=Clipping(1, Linear(1.0, 1.0)),
    clip_small_contribution=Clipping(1, Linear(1.0, 1.0)))
SGD = partial(torch.optim.SGD, lr=2.0, momentum=0.9)
RECIPES = {
    "icnn_gd": {"optimizer": SGD, "n_iter": 5, "steps": ALL_STEPS,
                "schedules": {"lr": Linear(2.0, 1e-10), "momentum": Linear(0.9, 0.9)}},
    "icnn_dgn_gd": {"optimizer": SGD, "n_iter": 5, "init": "normal",
                    "schedules": {"lr": Linear(2.0, 1e-10)}, "return_last_forward": True},
    "icnn_dgn_lbfgs": {"optimizer": partial(ScipyLBFGSB, maxiter=3), "n_iter": 3,
                       "init": "normal"},
}
# the other kinds of parameter and optimizer, for the fake-CUDA tests
MORE_RECIPES = {
    # (SGD: Adam reads its step count with .item(), a CPU tensor on a GPU too: no sync,
    # but the host-read counter below cannot tell it from a device tensor)
    "icnn_fourier": {"optimizer": partial(torch.optim.SGD, lr=0.05, momentum=0.9), "n_iter": 4,
                     "init": "normal", "fourier": {}, "transforms": RandomTransforms(2.0)},
    "dgn_direct": {"optimizer": EvaluateOnly, "n_iter": 0, "init": "normal"},
}


def _module(name: str, device: str = "cpu", seed: int = 3):
    recipe = dict({**RECIPES, **MORE_RECIPES}[name])
    if "dgn" in name:
        recipe["generator"] = TinyGenerator().to(device)
    targets = batched_tiny_targets(device)
    return build_reconstruction(targets, tiny_encoder().to(device), seed=seed, **recipe)


# -- 1: the result after teardown ------------------------------------------------------------
class _MovesModuleAway(pl.Callback):
    """Stands in for a teardown that moves the module off the generator's device (Lightning
    calls ``module.cpu()`` on CUDA): after the fit nothing of the module is usable."""

    def teardown(self, trainer, module, stage):
        module.to("meta")


@pytest.mark.parametrize("name", list(RECIPES))
def test_result_is_made_before_teardown(name):
    expected = fit(_module(name), **CPU)
    module = _module(name)
    got = fit(module, callbacks=[_MovesModuleAway()], **CPU)
    assert module.param.value.device.type == "meta"  # the teardown did move it
    np.testing.assert_array_equal(got.images, expected.images)
    np.testing.assert_array_equal(got.loss_history, expected.loss_history)
    if "dgn" in name:
        np.testing.assert_array_equal(got.codes, expected.codes)
    assert module.result() is got
    if not module.return_last_forward:  # (that one keeps its own last image and code)
        module._final = None  # made live now, the result would come from the moved module
        with pytest.raises((NotImplementedError, RuntimeError)):
            module.result()


# -- 5: no per-fit cache emptying, no module moves ---------------------------------------------
def test_teardown_leaves_module_and_cuda_cache_alone(monkeypatch):
    trainer = make_trainer(2, **CPU)
    assert isinstance(trainer.strategy, KeepOnDevice)
    module = _module("icnn_gd")
    moved = []
    monkeypatch.setattr(module, "cpu", lambda: moved.append("cpu"))
    fit(module, trainer=trainer)
    assert not moved, "the teardown moved the module (a host copy of the targets per image)"
    emptied = []
    import lightning_fabric.accelerators.cuda as fabric_cuda

    monkeypatch.setattr(fabric_cuda, "_clear_cuda_memory", lambda: emptied.append(1))
    monkeypatch.setattr("pytorch_lightning.accelerators.cuda._clear_cuda_memory",
                        lambda: emptied.append(1))
    lean = _LeanCUDA()
    lean.setup(trainer)
    lean.teardown()
    assert not emptied
    pl.accelerators.CUDAAccelerator().teardown()  # what the lean one replaces
    assert emptied == [1]


# -- 2: 16-mixed rejected; bf16 autocast does not round the blur -----------------------------
@pytest.mark.parametrize("precision", ["16-mixed", "16", 16])
def test_float16_mixed_precision_is_rejected_before_work(precision):
    with pytest.raises(ConfigError, match="bf16-mixed") as err:
        make_trainer(3, precision=precision, **CPU)
    assert "loss scaling" in str(err.value)


def test_blur_keeps_float32_under_bf16_autocast():
    x = torch.randn(2, 3, 17, 19) * 50
    want = gaussian_blur(x, 1.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gaussian_blur(x, 1.3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_blur_kernel_and_indices_are_reused():
    from icnn_pl.engine import icnn_steps

    x = torch.randn(1, 3, 12, 12)
    gaussian_blur(x, 1.7)
    kernels, indices = (icnn_steps._gaussian_kernel.cache_info(),
                        icnn_steps._reflect_index.cache_info())
    gaussian_blur(x, 1.7)
    assert icnn_steps._gaussian_kernel.cache_info().hits == kernels.hits + 1
    assert icnn_steps._reflect_index.cache_info().hits == indices.hits + 2


# -- 3: one device per process ---------------------------------------------------------------
@pytest.mark.parametrize(("devices", "index"), [(1, 0), ("1", 0), ([0], 0), ([3], 3), ((2,), 2)])
def test_one_device_is_accepted(devices, index):
    assert check_devices(devices) == index


@pytest.mark.parametrize("devices", [2, -1, "auto", "-1", [0, 1], [], True, 0, [-1]])
def test_more_devices_are_rejected_with_the_shard_recipe(devices):
    with pytest.raises(ConfigError, match=r"trainer\.devices") as err:
        check_trainer_options("cpu", devices=devices)
    assert "data.num_shards" in err.value.fix and "hydra/launcher=local" in err.value.fix


def test_make_trainer_takes_one_device_by_default():
    trainer = make_trainer(1)  # accelerator auto: the GPU when present, one of them
    assert trainer.num_devices == 1
    assert isinstance(trainer.strategy, KeepOnDevice)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert trainer.strategy.root_device.type == expected


# -- 4: shard i on GPU i ---------------------------------------------------------------------
@pytest.mark.parametrize(("host", "shard", "num_shards", "job", "gpu"), [
    ("0,1,2,3", 0, 4, 0, "0"), ("0,1,2,3", 3, 4, 3, "3"),
    ("0,1", 3, 4, 3, "1"),  # more shards than GPUs: in turn
    ("2,5", 1, 2, 1, "5"),  # the launcher's own CUDA_VISIBLE_DEVICES is kept
    ("0,1,2", 0, 1, 2, "2"),  # an unsharded sweep: job i on GPU i
    ("", 2, 4, 2, ""),  # no GPU: every job on the CPU
])
def test_job_gpu(host, shard, num_shards, job, gpu):
    assert job_gpu([g for g in host.split(",") if g], shard, num_shards, job) == gpu


def test_local_launcher_jobs_each_see_their_own_gpu():
    parent = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    remember_host_gpus(parent)
    assert parent[HOST_GPUS_ENV] == "0,1,2,3"
    seen = []
    for shard in range(4):
        # what submitit's local launcher gives each job with gpus_per_node: 0
        child = {**parent, "SUBMITIT_EXECUTOR": "local", "CUDA_VISIBLE_DEVICES": ""}
        assert pin_job_gpu(shard, 4, shard, child) == str(shard)
        seen.append(child["CUDA_VISIBLE_DEVICES"])
    assert seen == ["0", "1", "2", "3"]
    slurm = {**parent, "SUBMITIT_EXECUTOR": "slurm", "CUDA_VISIBLE_DEVICES": "7"}
    assert pin_job_gpu(1, 4, 1, slurm) is None and slurm["CUDA_VISIBLE_DEVICES"] == "7"


def test_local_launcher_config_leaves_the_gpus_to_the_jobs():
    from omegaconf import OmegaConf
    from pipeline_helpers import CONF

    local = OmegaConf.load(CONF / "hydra" / "launcher" / "local.yaml")
    assert local.gpus_per_node == 0  # submitit's value is replaced by each job's own GPU


# -- 6: no host round trips in the GD loop ---------------------------------------------------
_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
               "__index__")


@contextlib.contextmanager
def _count_host_reads(counts: list[int]):
    """A CPU proxy for device-to-host synchronisations: every Python-level read of a
    tensor's value on the host. (Reads inside C++ kernels are invisible here: the
    GPU-marked test below uses CUDA's own sync detector.)"""
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counting(fn):
        def wrapper(self, *a, **k):
            counts[-1] += 1
            return fn(self, *a, **k)
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, counting(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _per_iteration_reads(module, **trainer_kwargs) -> list[int]:
    trainer_kwargs = {**CPU, **trainer_kwargs}
    counts: list[int] = []
    step = module.training_step

    def counted(t, batch_idx=0):
        counts.append(0)
        with _count_host_reads(counts):
            return step(t, batch_idx)

    module.training_step = counted
    fit(module, **trainer_kwargs)
    return counts


@pytest.mark.parametrize("name", ["icnn_gd", "icnn_dgn_gd"])
def test_gd_iterations_read_nothing_back_to_the_host(name, tmp_path):
    assert _per_iteration_reads(_module(name)) == [0] * 5
    from pytorch_lightning.loggers import CSVLogger

    # with a logger, values stay on the device (Lightning reads them when it writes)
    logged = _per_iteration_reads(_module(name), logger=CSVLogger(tmp_path),
                                  log_every_n_steps=2)
    assert logged == [0] * 5


def test_the_host_read_counter_can_fail():
    counts = [0]
    with _count_host_reads(counts):
        float(torch.ones(()))
        torch.ones(2).tolist()
    assert counts == [2]


# -- fake CUDA: the Trainer built for a GPU, run on the CPU (tests/fake_cuda.py) ------------------
NUMERICS = [{}, {"tf32": True}, {"tf32": False}, {"tf32": None}, {"deterministic": True},
            {"tf32": True, "deterministic": True}]
GRADIENT = ["icnn_gd", "icnn_dgn_gd", "icnn_fourier"]
# Lightning's check of the step loader's length (has_len_all_ranks): one scalar made on the
# device and compared on the host, twice per fit (per image, not per iteration: left alone)
LENGTH_CHECK = [("tensor_on_cuda", ("tensor",))] * 2


def _fake_module(name: str, fake) -> Reconstruction:
    return fake.pin(_module(name))


@pytest.mark.parametrize("options", NUMERICS, ids=str)
@pytest.mark.parametrize("caller", ["highest", "medium"])  # the process's own setting
def test_fake_cuda_fit_passes_lightnings_matmul_check_in_every_numerics_state(
        monkeypatch, options, caller):
    """Lightning's ``CUDAAccelerator.setup_device`` reads the float32 matmul precision at
    every fit on an Ampere+ GPU: it must be readable whatever ``numerics`` set."""
    torch.set_float32_matmul_precision(caller)
    try:
        _fit_reading_the_matmul_precision(monkeypatch, options, caller)
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.fp32_precision = "none"  # torch's own start
        torch.backends.mkldnn.matmul.fp32_precision = "none"


def _fit_reading_the_matmul_precision(monkeypatch, options, caller):
    import pytorch_lightning.accelerators.cuda as pl_cuda

    get, real_check = torch.get_float32_matmul_precision, pl_cuda._check_cuda_matmul_precision
    checked, read = [], []

    def check(device):  # Lightning's own check, run for real, its precision read recorded
        with monkeypatch.context() as m:
            m.setattr(torch, "get_float32_matmul_precision", lambda: read.append(get()) or get())
            real_check(device)
        checked.append(device)

    monkeypatch.setattr(pl_cuda, "_check_cuda_matmul_precision", check)

    class Probe(pl.Callback):
        def on_train_start(self, trainer, module):
            read.append(get())  # inside the numerics of the fit

    with fake_cuda(monkeypatch) as fake:
        fit(_fake_module("icnn_gd", fake), accelerator="gpu", devices=1, callbacks=[Probe()],
            **options)
    assert checked == [torch.device("cuda", 0)]
    expected = {True: "high", False: "highest"}.get(options.get("tf32", False), caller)
    assert read == [expected, expected]  # Lightning's read, then the probe's
    assert get() == caller  # restored after the fit
    torch.backends.cudnn.allow_tf32  # noqa: B018 (raises after a mix of the two APIs)
    torch.backends.cuda.matmul.allow_tf32  # noqa: B018


@pytest.mark.parametrize("name", [*RECIPES, *MORE_RECIPES])
def test_fake_cuda_fit_never_empties_the_cache_nor_moves_the_module_back(monkeypatch, name):
    with fake_cuda(monkeypatch) as fake:
        module = _fake_module(name, fake)
        fit(module, accelerator="gpu", devices=1)
        # one move onto the device at set-up, none back to the host at teardown
        assert fake.moves == [("to", (torch.device("cuda", 0),))]
        assert fake.calls == [("set_device", (torch.device("cuda", 0),)), *LENGTH_CHECK]


def test_fake_cuda_spy_sees_lightnings_own_cache_emptying(monkeypatch):
    """The spy can fail: the stock Trainer (with the lean strategy) empties the cache at
    every fit, in ``_checkpoint_connector.resume_end``."""
    with fake_cuda(monkeypatch) as fake:
        module = _fake_module("icnn_gd", fake)
        trainer = pl.Trainer(max_steps=module.trainer_steps, max_epochs=1, logger=False,
                             strategy=lean_strategy("cuda:0"), devices=[0],
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        fit(module, trainer=trainer)
        assert fake.count("empty_cache") == 1


@pytest.mark.parametrize("name", GRADIENT)
def test_fake_cuda_gd_iterations_ask_nothing_of_cuda_nor_the_host(monkeypatch, name, tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    with fake_cuda(monkeypatch) as fake:
        module = _fake_module(name, fake)
        step, calls = module.training_step, []

        def counted(t, batch_idx=0):
            fake.calls.clear()
            try:
                return step(t, batch_idx)
            finally:
                calls.append(list(fake.calls))

        module.training_step = counted
        counts = _per_iteration_reads(module, accelerator="gpu", devices=1,
                                      logger=CSVLogger(tmp_path), log_every_n_steps=2)
    assert counts == [0] * module.n_iter and calls == [[]] * module.n_iter


def test_fake_cuda_trainer_on_gpu_i_selects_that_device(monkeypatch):
    with fake_cuda(monkeypatch, devices=4) as fake:
        module = _fake_module("icnn_gd", fake)
        trainer = make_trainer(module.trainer_steps, accelerator="gpu", devices=[3])
        assert trainer.strategy.root_device == torch.device("cuda", 3)
        fit(module, trainer=trainer)
        assert fake.calls == [("set_device", (torch.device("cuda", 3),)), *LENGTH_CHECK]
        assert fake.moves == [("to", (torch.device("cuda", 3),))]


# -- GPU-marked: what only CUDA shows ----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["icnn_gd", "icnn_dgn_gd"])
def test_gd_iteration_has_no_cuda_sync(name):
    module = _module(name, "cuda")
    step = module.training_step

    def strict(t, batch_idx=0):
        if t == 0:  # the first iteration allocates (optimizer state, caches)
            return step(t, batch_idx)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(t, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    module.training_step = strict
    fit(module, accelerator="gpu", devices=1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(RECIPES))
def test_cuda_result_after_lightnings_own_teardown(name):
    """Lightning's own strategy moves the module to the CPU at teardown: the result is made
    before. Also through the lean strategy, where nothing moves."""
    module = _module(name, "cuda")
    trainer = pl.Trainer(max_steps=module.trainer_steps, max_epochs=1, accelerator="gpu",
                         devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    stock = fit(module, trainer=trainer)
    assert module.param.value.device.type == "cpu"  # Lightning's teardown moved it
    lean = fit(_module(name, "cuda"), accelerator="gpu", devices=1)
    np.testing.assert_allclose(stock.images, lean.images, rtol=1e-5, atol=1e-3)


@pytest.mark.gpu
def test_cuda_fit_keeps_module_on_device_and_cache_warm(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    module = _module("icnn_gd", "cuda")
    fit(module, accelerator="gpu", devices=1)
    assert module.param.value.device.type == "cuda" and not emptied


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["icnn_gd", "icnn_dgn_gd"])
def test_cuda_deterministic_runs_repeat_exactly(name):
    runs = [fit(_module(name, "cuda"), accelerator="gpu", devices=1, deterministic=True)
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].images, runs[1].images)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(RECIPES))
def test_cuda_bf16_mixed_runs(name):
    result = fit(_module(name, "cuda"), accelerator="gpu", devices=1, precision="bf16-mixed")
    assert np.isfinite(result.images).all() and np.isfinite(result.loss_history).all()


@pytest.mark.gpu
def test_cuda_tf32_only_while_fitting():
    before = torch.backends.cudnn.allow_tf32  # readable (no mix of legacy and new API)
    seen = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, module):
            seen.append(torch.backends.cuda.matmul.fp32_precision)

    fit(_module("icnn_gd", "cuda"), accelerator="gpu", devices=1, tf32=True,
        callbacks=[Probe()])
    assert seen == ["tf32"]
    assert torch.backends.cudnn.allow_tf32 == before



# -- the device check's arithmetic (the script itself runs in CI: .ci/run, --smoke) ------------
def test_device_check_slopes_and_throughput():
    from benchmarks.device_check import images_per_second, slope_and_fixed

    per_iter, fixed = slope_and_fixed(10, 1.5 + 10 * 0.02, 60, 1.5 + 60 * 0.02)
    assert per_iter == pytest.approx(0.02) and fixed == pytest.approx(1.5)
    assert images_per_second(16, 0.02, 1.5) == pytest.approx(16 / (1.5 + 200 * 0.02))
    with pytest.raises(ValueError):
        slope_and_fixed(10, 1.0, 10, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_device_check_refuses_cuda_without_a_gpu(tmp_path, capsys):
    from benchmarks.device_check import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--device", "cuda"])
    assert "--device cpu" in capsys.readouterr().err


# -- deterministic mode: cuBLAS's workspace, and what cannot be deterministic on a GPU ----------
def test_deterministic_fit_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, module):
            seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))

    fit(_module("icnn_gd"), callbacks=[Probe()], deterministic=True, **CPU)
    assert seen == [":4096:8"]
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # left set: cuBLAS reads it once
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a deterministic value is kept
    fit(_module("icnn_gd"), deterministic=True, **CPU)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_cublas_warns_when_cuda_already_started(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(RuntimeWarning, match="in the environment"):
        deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_deterministic_refuses_random_transforms_on_a_gpu_before_work(monkeypatch):
    with fake_cuda(monkeypatch) as fake:
        module = _fake_module("icnn_fourier", fake)
        with pytest.raises(ConfigError, match="transforms") as err:
            fit(module, accelerator="gpu", devices=1, deterministic=True)
        assert "method.transforms=null" in err.value.fix
        assert not fake.moves and not module._history  # refused before the fit started
    # on the CPU the resampling's backward is sequential: runs repeat exactly
    runs = [fit(_module("icnn_fourier"), deterministic=True, **CPU) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].images, runs[1].images)


def test_deterministic_config_with_transforms_is_refused_on_a_gpu(monkeypatch):
    from benchmarks.harness import compose_cfg
    from icnn_pl.pipeline.config_checks import check_config

    overrides = ["method=icnn_fourier", "method.transforms={jitter: 2}",
                 "trainer.deterministic=true"]
    check_config(compose_cfg(["trainer=cpu", *overrides]))  # the CPU repeats exactly
    with fake_cuda(monkeypatch), pytest.raises(ConfigError, match="deterministic"):
        check_config(compose_cfg(["trainer=gpu", *overrides]))


def test_train_recon_sets_the_cublas_workspace_before_cuda_starts(monkeypatch, tmp_path):
    """The entry point sets it before the job (networks, data) is built; the job is
    stopped there (a Ctrl-C), having shown what it saw."""
    from pipeline_helpers import TINY

    from benchmarks.harness import run_train_recon

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    def build_job(*args, **kwargs):
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise KeyboardInterrupt

    monkeypatch.setattr("icnn_pl.pipeline.factory.build_job", build_job)
    for deterministic in ("false", "true"):
        with pytest.raises(RuntimeError, match="interrupted before any image"):
            run_train_recon([*TINY, f"trainer.deterministic={deterministic}",
                             f"hydra.run.dir={tmp_path / deterministic}"])
    assert seen == [None, ":4096:8"]
