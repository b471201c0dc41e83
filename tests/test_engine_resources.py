"""What keeps the hot loop lean and memory flat: freed modules and hooks, frozen nets,
targets on the module's device, and the reduced-precision options (bf16, TF32; their
config keys are tested in test_pipeline_config.py).

No timings here: speed is measured by ``benchmarks/`` side by side against a baseline.
"""

import gc
import weakref
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from engine_helpers import TinyGenerator, batched_tiny_targets, tiny_encoder

from icnn_pl.engine.fit import fit, make_trainer
from icnn_pl.engine.icnn_steps import GDSteps
from icnn_pl.engine.lbfgsb import ScipyLBFGSB
from icnn_pl.engine.recipe import build_reconstruction
from icnn_pl.engine.schedules import Linear

GD = {"optimizer": partial(torch.optim.SGD, lr=2.0, momentum=0.9), "n_iter": 4,
      "schedules": {"lr": Linear(2.0, 1e-10)},
      "steps": GDSteps(decay=Linear(0.2, 1e-10), blur_sigma=Linear(2.0, 0.5))}
LBFGS = {"optimizer": partial(ScipyLBFGSB, maxiter=4), "n_iter": 4, "pixel_bounds": True}


def test_module_graph_and_hooks_are_freed_after_each_image():
    """A job reconstructs image after image with one encoder: nothing may pile up on it."""
    encoder, generator = tiny_encoder(), TinyGenerator()
    refs = []
    for gen in (None, generator, None):
        recipe = {**GD, "init": "normal", "generator": gen, "steps": None} if gen else GD
        module = build_reconstruction(batched_tiny_targets(), encoder, **recipe)
        fit(module, accelerator="cpu", devices=1)
        refs += [weakref.ref(module), weakref.ref(module.param.value)]
        del module
    gc.collect()
    assert all(r() is None for r in refs), "a module or its parameter outlived its image"
    # one hook per tapped module, registered once and kept for the encoder's life (not
    # one per pass or per image); none on the generator; remove_hooks() takes them off
    tapped = {encoder.module_path(n) for n in batched_tiny_targets()}
    hooked = {name for name, m in encoder.net.named_modules() if m._forward_hooks}
    assert hooked == tapped
    assert all(len(encoder.net.get_submodule(p)._forward_hooks) == 1 for p in tapped)
    encoder.remove_hooks()
    assert all(not m._forward_hooks and not m._forward_pre_hooks
               for net in (encoder.net, generator) for m in net.modules())
    assert not any(p.requires_grad or p.grad is not None
                   for net in (encoder.net, generator) for p in net.parameters())


def test_targets_are_buffers_that_follow_the_module():
    """Targets and weights move with the module (to the GPU once, before the loop)."""
    module = build_reconstruction(batched_tiny_targets(), tiny_encoder(), **GD)
    buffers = dict(module.named_buffers())
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    module.to(torch.float64)  # a stand-in for .to(device): every buffer goes along
    assert all(b.dtype == torch.float64 for b in module.buffers())


@pytest.mark.parametrize("recipe", [GD, LBFGS], ids=["gd", "lbfgs"])
def test_bf16_mixed_runs_and_stays_close_to_float32(recipe):
    """Reduced precision is an option: it runs through manual optimisation and L-BFGS-B,
    keeps the parameter and the loss history in float32, and changes the loss by about
    bf16's resolution."""
    results = {}
    for precision in (None, "bf16-mixed"):
        module = build_reconstruction(batched_tiny_targets(), tiny_encoder(), seed=3, **recipe)
        results[precision] = fit(module, accelerator="cpu", devices=1, precision=precision)
        assert module.param.value.dtype == torch.float32
    full, half = results[None], results["bf16-mixed"]
    assert half.loss_history.dtype == np.float32 and np.isfinite(half.loss_history).all()
    assert half.images.dtype == np.float32
    # The first loss is of the same initial image: only the arithmetic differs.
    np.testing.assert_allclose(half.loss_history[0, 0], full.loss_history[0, 0], rtol=0.05)
    assert not np.array_equal(half.loss_history, full.loss_history)  # bf16 really ran


class _Probe(pl.Callback):
    """Records the process's numerics settings while the fit runs."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def on_train_start(self, trainer, module) -> None:
        self.seen = _numerics()


def _numerics() -> dict[str, object]:
    cudnn = torch.backends.cudnn
    return {"matmul": torch.backends.cuda.matmul.fp32_precision,
            "conv": cudnn.conv.fp32_precision, "deterministic": cudnn.deterministic,
            "benchmark": cudnn.benchmark,
            "algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled()}


@pytest.mark.parametrize(("options", "inside"), [
    # strict float32 unless asked (PyTorch's default allows TF32 in cuDNN convolutions)
    ({}, {"matmul": "ieee", "conv": "ieee"}),
    ({"tf32": True}, {"matmul": "tf32", "conv": "tf32"}),
    ({"tf32": None}, {}),  # None: the process's own settings
    # deterministic cuDNN; torch's deterministic algorithms warn (adaptive pooling) not raise
    ({"deterministic": True}, {"matmul": "ieee", "conv": "ieee", "deterministic": True,
                               "benchmark": False, "algorithms": True, "warn_only": True}),
])
def test_numerics_hold_while_fitting_and_are_restored(options, inside):
    torch.backends.cudnn.benchmark = True  # a caller's own setting, kept outside the fit
    before = _numerics()
    allow_tf32 = torch.backends.cudnn.allow_tf32  # reading it raises after a mix of APIs
    try:
        probe = _Probe()
        module = build_reconstruction(batched_tiny_targets(), tiny_encoder(), **GD)
        fit(module, accelerator="cpu", devices=1, callbacks=[probe], **options)
        assert probe.seen == {**before, **inside}
        assert _numerics() == before
        assert torch.backends.cudnn.allow_tf32 == allow_tf32
    finally:
        torch.backends.cudnn.benchmark = False


def test_make_trainer_leaves_global_numerics_alone():
    before = _numerics()
    make_trainer(1, accelerator="cpu", devices=1)
    assert _numerics() == before
