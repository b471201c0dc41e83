"""Batched reconstruction: B images in one module give each image's one-at-a-time result."""

from functools import partial

import numpy as np
import pytest
import torch
from engine_helpers import TinyGenerator, rgb_image, tiny_encoder, tiny_targets

from icnn_pl.engine.evaluate_only import EvaluateOnly
from icnn_pl.engine.fit import fit
from icnn_pl.engine.icnn_steps import GDSteps
from icnn_pl.engine.objective import layer_weights
from icnn_pl.engine.recipe import build_reconstruction
from icnn_pl.engine.schedules import Linear
from icnn_pl.engine.transforms import RandomTransforms
from icnn_pl.errors import ConfigError

LABELS = ["im_a", "im_b", "im_c"]


def _targets(labels):
    sets = [tiny_targets(rgb=rgb_image(10 + i)) for i in range(len(labels))]
    return {n: torch.stack([torch.from_numpy(s[n]) for s in sets]) for n in sets[0]}


def _run(targets, labels, **recipe):
    module = build_reconstruction(targets, tiny_encoder(),
                                  weights=layer_weights(targets, "inverse_norm", labels),
                                  labels=labels, seed=0, **recipe)
    return fit(module, accelerator="cpu", devices=1)


# Random moves are drawn per image from its own label's seed: alone or in a batch, an image
# is moved alike (the iCNN jitter; the random transforms of a Fourier or a pixel image).
@pytest.mark.parametrize("method", ["icnn_gd", "icnn_dgn_gd", "icnn_gd_jitter",
                                    "icnn_gd_transforms", "icnn_fourier_transforms",
                                    "dgn_direct"])
def test_batch_equals_one_at_a_time(method):
    generator = TinyGenerator() if "dgn" in method else None
    recipe = {
        "optimizer": partial(torch.optim.SGD, lr=2.0, momentum=0.9), "n_iter": 6,
        "schedules": {"lr": Linear(2.0, 1e-10), "momentum": Linear(0.9, 0.9)},
    }
    if method == "dgn_direct":  # evaluates only: any batch size
        recipe = {"optimizer": EvaluateOnly, "n_iter": 0, "init": "normal",
                  "generator": generator, "code_bounds": (0.0, 3.0)}
    elif "fourier" in method:
        recipe |= {"init": "normal", "fourier": {}, "schedules": {"lr": Linear(0.05, 0.05)},
                   "transforms": RandomTransforms(jitter=3.0, rotate=10.0)}
    elif generator is None:
        recipe |= {"init": "uniform", "steps": GDSteps(
            normalize_grad=True, decay=Linear(0.2, 1e-10), blur_sigma=Linear(2.0, 0.5),
            jitter=3 if method == "icnn_gd_jitter" else 0)}
        if method == "icnn_gd_transforms":
            recipe["transforms"] = RandomTransforms(jitter=3.0, scale=(0.9, 1.1), rotate=10.0)
    else:
        recipe |= {"init": "normal", "generator": generator, "code_bounds": (0.0, 3.0),
                   "return_last_forward": True,
                   "steps": GDSteps(normalize_grad=True, decay=Linear(0.01, 0.01))}
    targets = _targets(LABELS)
    together = _run(targets, LABELS, **recipe)
    for i, lab in enumerate(LABELS):
        alone = _run({n: t[i:i + 1] for n, t in targets.items()}, [lab], **recipe)
        # float32 tolerance: batched matrix products sum in another order, and gradient
        # normalisation carries those 1e-6 differences through the iterations.
        np.testing.assert_allclose(together.loss_history[i], alone.loss_history[0], rtol=1e-4)
        np.testing.assert_allclose(together.images[i], alone.images[0], rtol=1e-3, atol=0.05)
        if generator is not None:
            np.testing.assert_allclose(together.codes[i], alone.codes[0], rtol=1e-3, atol=1e-4)


def test_an_evaluate_only_method_takes_any_batch_size():
    """dgn_direct runs no optimiser: the L-BFGS one-image rule is not its."""
    from benchmarks.harness import compose_cfg
    from icnn_pl.pipeline.config_checks import check_config

    check_config(compose_cfg(["method=dgn_direct", "layers=all", "data.batch_size=4"]))
    with pytest.raises(ConfigError, match="L-BFGS"):
        check_config(compose_cfg(["method=icnn_dgn_lbfgs", "data.batch_size=4"]))
