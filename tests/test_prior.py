"""The weight-free Fourier prior (``FourierImage``, icnn_fourier, icnn_fourier_lbfgs), the
random transforms and the dgn_direct baseline: the parameterisation's range and inverse,
where gradients go, batching, configs, and short real jobs of the three methods."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest
import scipy.io
import torch
from engine_helpers import (
    MEAN_BGR,
    PAD,
    SIZE,
    TinyGenerator,
    batched_tiny_targets,
    rgb_image,
    tiny_encoder,
    tiny_targets,
)
from hydra import compose, initialize_config_dir
from pipeline_helpers import CONF, DEMO_LABELS, PRIOR_METHODS, TINY, output_of, run_many, write_demo

from icnn_pl import icnn_fourier
from icnn_pl.engine.evaluate_only import EvaluateOnly
from icnn_pl.engine.fit import fit
from icnn_pl.engine.params import FourierImage, colour_matrix_bgr
from icnn_pl.engine.recipe import build_reconstruction
from icnn_pl.engine.schedules import Linear
from icnn_pl.engine.transforms import RandomTransforms, affine_theta, make_transforms, warp
from icnn_pl.errors import ConfigError
from icnn_pl.image import from_caffe, to_caffe
from icnn_pl.pipeline import config_checks, factory

MEAN = torch.tensor(MEAN_BGR).view(1, 3, 1, 1)
FOURIER = {"decay": 1.0, "colour": "imagenet", "squash": "sigmoid"}


def _spectrum(b: int, h: int, w: int, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w // 2 + 1, 2, generator=g) * std


# -- the parameterisation ----------------------------------------------------------------------
@pytest.mark.parametrize("squash", ["sigmoid", "clamp"])
@pytest.mark.parametrize("size", [(16, 16), (12, 15)])
def test_spectrum_gives_images_in_the_pixel_range(squash, size):
    for std in (0.01, 1.0, 100.0):  # from almost grey to saturated
        p = FourierImage(_spectrum(2, *size, std), size, MEAN_BGR, squash=squash)
        raw = (p() + MEAN).detach()  # raw BGR pixels
        assert raw.shape == (2, 3, *size)
        assert float(raw.min()) >= 0.0 and float(raw.max()) <= 255.0
    # a small spectrum is an almost grey image (lucid's start), a large one has contrast
    assert float((p() + MEAN).detach().std()) > 30.0


@pytest.mark.parametrize(("squash", "decay", "colour"), [
    ("sigmoid", 1.0, "imagenet"), ("clamp", 1.0, "imagenet"), ("sigmoid", 0.0, "none"),
    ("sigmoid", 1.5, [[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.2, 1.0]])])
def test_inverse_recovers_the_image(squash, decay, colour):
    rgb = np.stack([rgb_image(1, (12, 15), 1.0, 254.0), rgb_image(2, (12, 15), 1.0, 254.0)])
    image = to_caffe(rgb, MEAN_BGR)
    p = FourierImage.from_image(image, MEAN_BGR, squash=squash, decay=decay, colour=colour)
    np.testing.assert_allclose(from_caffe(p(), MEAN_BGR), rgb, atol=0.02)
    # and the spectrum of the image it makes is the spectrum it holds
    torch.testing.assert_close(p.to_spectrum(p().detach()), p.value.detach(),
                               atol=1e-3 * float(p.value.detach().abs().max()), rtol=1e-3)


def test_colour_matrix_is_lucids_in_bgr_order():
    m = colour_matrix_bgr("imagenet")
    rgb = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    torch.testing.assert_close(m, (rgb / rgb.norm(dim=0).max()).flip(0))
    torch.testing.assert_close(colour_matrix_bgr("none"), torch.eye(3).flip(0))
    with pytest.raises(ConfigError, match="colour"):
        colour_matrix_bgr("bogus")
    with pytest.raises(ConfigError, match="invertible"):
        colour_matrix_bgr([[1, 1, 1], [1, 1, 1], [0, 0, 1]])
    with pytest.raises(ConfigError, match="squash"):
        FourierImage(_spectrum(1, *SIZE, 0.01), SIZE, MEAN_BGR, squash="tanh")


def test_gradients_reach_the_spectrum_only():
    enc = tiny_encoder()
    targets = batched_tiny_targets()
    module = build_reconstruction(targets, enc, partial(torch.optim.Adam, lr=0.05), 3,
                                  fourier=FOURIER, init="normal")
    assert [p for p in module.parameters() if p.requires_grad] == [module.param.value]
    enc.set_layers(module.objective.layers)  # as on_fit_start does
    loss, _ = module.compute_loss()
    loss.sum().backward()
    assert module.param.value.grad is not None and float(module.param.value.grad.abs().sum()) > 0
    assert all(not p.requires_grad and p.grad is None for p in enc.parameters())
    before = [p.detach().clone() for p in enc.parameters()]
    fit(module, accelerator="cpu", devices=1)
    assert all(torch.equal(a, b) for a, b in zip(before, enc.parameters(), strict=True))


@pytest.mark.parametrize("init", ["normal", "uniform"])
def test_batch_equals_one_at_a_time(init):
    enc = tiny_encoder()
    t1, t2 = tiny_targets(seed=1), tiny_targets(seed=2)
    stacked = {n: torch.from_numpy(np.stack([t1[n], t2[n]])) for n in t1}
    kw = dict(fourier=FOURIER, init=init, schedules={"lr": Linear(0.1, 0.01)})
    opt = partial(torch.optim.Adam, lr=0.1)
    both = fit(build_reconstruction(stacked, enc, opt, 6, labels=["a", "b"], **kw),
               accelerator="cpu", devices=1)
    for i, (lab, t) in enumerate((("a", t1), ("b", t2))):
        one = fit(build_reconstruction({n: torch.from_numpy(v)[None] for n, v in t.items()},
                                       enc, opt, 6, labels=[lab], **kw),
                  accelerator="cpu", devices=1)
        np.testing.assert_allclose(both.images[i], one.images[0], atol=1e-3)
        np.testing.assert_allclose(both.loss_history[i], one.loss_history[0], rtol=1e-4)


# -- the functional API ------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_api_reconstructs_within_range_and_lowers_the_loss(optimizer):
    img, loss = icnn_fourier.reconstruct_image(tiny_targets(), tiny_encoder(), iter_n=15,
                                               optimizer=optimizer, lr_start=0.1, lr_end=0.1)
    assert img.shape == (*SIZE, 3) and img.min() >= 0.0 and img.max() <= 255.0
    assert loss[-1] < 0.5 * loss[0]
    if optimizer == "adam":
        assert loss.shape == (15,)
    with pytest.raises(ConfigError, match="optimizer"):
        icnn_fourier.reconstruct_image(tiny_targets(), tiny_encoder(), optimizer="sgd")


# -- random transforms -------------------------------------------------------------------------
def test_transforms_move_the_image_and_keep_the_gradient():
    image = torch.from_numpy(rgb_image(3)).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    image.requires_grad_(True)
    still = RandomTransforms(jitter=0, scale=(1.0, 1.0), rotate=0)
    torch.testing.assert_close(still(image, [torch.Generator()] * 2), image, atol=1e-3, rtol=0)
    moved = RandomTransforms(jitter=3, scale=(0.9, 1.1), rotate=10)(
        image, [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    assert moved.shape == image.shape and float((moved - image).detach().abs().mean()) > 1.0
    assert not torch.allclose(moved[0], moved[1])  # each image its own move
    moved.sum().backward()
    assert float(image.grad.abs().sum()) > 0
    with pytest.raises(ConfigError, match="scale"):
        make_transforms({"jitter": 4, "scale": [1.1, 0.9], "rotate": 5})
    with pytest.raises(ConfigError, match="transforms"):
        make_transforms({"jiter": 4})


def test_transforms_in_a_reconstruction_and_not_with_lbfgs():
    targets = batched_tiny_targets()
    tf = RandomTransforms(jitter=2, scale=(0.95, 1.05), rotate=5)
    res = fit(build_reconstruction(targets, tiny_encoder(), partial(torch.optim.Adam, lr=0.1),
                                   5, fourier=FOURIER, transforms=tf), accelerator="cpu",
              devices=1)
    assert np.isfinite(res.images).all() and res.loss_history.shape == (1, 5)
    from icnn_pl.engine.lbfgsb import ScipyLBFGSB

    with pytest.raises(ConfigError, match="L-BFGS"):
        build_reconstruction(targets, tiny_encoder(), partial(ScipyLBFGSB, maxiter=3), 3,
                             fourier=FOURIER, transforms=tf)


def _blob(size: tuple[int, int], at: tuple[float, float], sigma: float = 1.5) -> torch.Tensor:
    """(1, 3, H, W) Gaussian blob at ``at`` = (x, y) pixels from the image centre."""
    h, w = size
    y, x = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2,
                          indexing="ij")
    blob = torch.exp(-((x - at[0]) ** 2 + (y - at[1]) ** 2) / (2 * sigma ** 2))
    return blob.expand(1, 3, h, w).clone()


def _centroid(image: torch.Tensor) -> torch.Tensor:
    """(x, y) of an image's mass, pixels from the centre."""
    h, w = image.shape[-2:]
    m = image[0, 0].double()
    y, x = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2,
                          indexing="ij")
    return torch.stack([(m * x).sum(), (m * y).sum()]) / m.sum()


@pytest.mark.parametrize("size", [(40, 80), (80, 40), (48, 48)])
def test_rotation_is_a_rotation_in_pixels_on_any_aspect_ratio(size):
    """A rotation keeps a point's distance from the centre (no shear on non-square images):
    the output at p samples the input at R p, so a blob at q moves to R^-1 q."""
    q, angle = torch.tensor([14.0, 6.0]), math.radians(25)
    one = torch.ones(1, dtype=torch.float64)
    moved = warp(_blob(size, tuple(q.tolist())),
                 affine_theta(one, one * angle, 0 * one, 0 * one, size))
    c, s = math.cos(angle), math.sin(angle)
    expected = torch.tensor([[c, s], [-s, c]], dtype=torch.float64) @ q.double()
    torch.testing.assert_close(_centroid(moved), expected, atol=0.1, rtol=0)


def test_transforms_geometry_and_kept_images_stay_float32_under_bf16():
    """Under bf16-mixed the image reaching the transforms is bfloat16 (a generator's output):
    the grid and the resampling stay float32, as does the image kept as the result."""
    image = _blob((32, 48), (5.0, -3.0), sigma=4.0).mul(100).bfloat16()
    tf = RandomTransforms(jitter=4, scale=(0.9, 1.1), rotate=10)
    want = tf(image.float(), [torch.Generator().manual_seed(5)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tf(image, [torch.Generator().manual_seed(5)])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    mean = (104.00699, 116.66877, 122.67892)
    rgb = from_caffe(torch.zeros(1, 3, 2, 2, dtype=torch.bfloat16), mean)
    np.testing.assert_array_equal(rgb[0, 0, 0], np.float32(mean[::-1]))
    module = build_reconstruction(batched_tiny_targets(), tiny_encoder(),
                                  partial(torch.optim.SGD, lr=1.0), 2, generator=TinyGenerator(),
                                  init="normal", return_last_forward=True)
    fit(module, accelerator="cpu", devices=1, precision="bf16-mixed")
    assert module._last_image.dtype == torch.float32


# -- dgn_direct --------------------------------------------------------------------------------
def test_direct_code_is_the_clipped_target_and_one_evaluation():
    gen = TinyGenerator(dim=10)
    enc = tiny_encoder()
    targets = batched_tiny_targets()  # fc: (10,)
    module = build_reconstruction(targets, enc, EvaluateOnly, 0, generator=gen,
                                  init="target:fc", code_bounds=(0.0, 0.5))
    res = fit(module, accelerator="cpu", devices=1)
    code = np.clip(targets["fc"][0].numpy(), 0.0, 0.5)
    np.testing.assert_allclose(res.codes[0], code)
    with torch.no_grad():
        img = gen(torch.from_numpy(code)[None])[:, :, PAD:PAD + SIZE[0], PAD:PAD + SIZE[1]]
    np.testing.assert_allclose(res.images[0], from_caffe(img, enc.mean_bgr)[0], atol=1e-4)
    assert res.n_evals == 1 and res.loss_history.shape == (1, 1)
    with pytest.raises(ConfigError, match="c9"):
        build_reconstruction(targets, enc, EvaluateOnly, 0, generator=gen, init="target:c9")
    with pytest.raises(ConfigError, match="n_iter"):  # zero iterations only for it
        build_reconstruction(targets, enc, partial(torch.optim.SGD, lr=1.0), 0, generator=gen)


# -- configs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def make():
    """Compose the real config; Hydra is initialised only while composing (other fixtures
    of this module compose configs of their own)."""
    factory.register_resolvers()

    def compose_cfg(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return compose_cfg


def test_prior_configs_build(make):
    cfg = make("method=icnn_fourier")
    config_checks.check_config(cfg)
    r = factory.build_recipe(cfg)
    assert r.fourier == FOURIER and r.generator is None and r.transforms is None
    assert r.optimizer.func is torch.optim.Adam and r.steps is None
    r = factory.build_recipe(make("method=icnn_fourier", "method.transforms={jitter:4}"))
    assert r.transforms == RandomTransforms(jitter=4.0)
    cfg = make("method=icnn_fourier_lbfgs")
    config_checks.check_config(cfg)
    assert factory.build_recipe(cfg).runs_to_completion
    cfg = make("method=dgn_direct", "method.n_iter=50")
    config_checks.check_config(cfg)
    r = factory.build_recipe(cfg)
    assert r.n_iter == 0 and r.init == "target:fc7" and r.generator is not None


@pytest.mark.parametrize(("overrides", "match"), [
    (["method=icnn_fourier", "method.fourier.squash=tanh"], "method.fourier.squash"),
    (["method=icnn_fourier", "method.fourier.colour=bogus"], "colour"),
    (["method=icnn_fourier", "+method.fourier.gain=2"], "method.fourier"),
    (["method=icnn_fourier", "method.init=target:fc7"], "method.init"),
    (["method=icnn_fourier_lbfgs", "method.transforms={jitter:4}"], "method.transforms"),
    (["method=icnn_fourier", "method.transforms={jitter:-1}"], "transforms"),
    (["method=icnn_gd", "method.n_iter=0"], "method.n_iter"),
])
def test_prior_config_errors(make, overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_checks.check_config(make(*overrides))


# -- short real jobs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prior_jobs(tmp_path_factory):
    base = tmp_path_factory.mktemp("prior")
    demo = write_demo(base / "demo", DEMO_LABELS, (1,))
    common = [*TINY, f"data.root={demo}", "data.limit=2", "logger=csv",
              "layers.names=[conv1_1,fc7]"]
    cases = [[*common, f"method={m}", f"hydra.run.dir={base / m}"] for m in PRIOR_METHODS]
    return {m: (res, base / m) for m, res in zip(PRIOR_METHODS, run_many(cases), strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("method", PRIOR_METHODS)
def test_prior_method_job(prior_jobs, method):
    res, run_dir = prior_jobs[method]
    assert res["code"] == 0 and "Traceback" not in output_of(res), output_of(res)[-4000:]
    rows = json.loads((run_dir / "results.json").read_text())
    assert [r["label"] for r in rows] == list(DEMO_LABELS)
    for r in rows:
        assert r["method"] == method and -1 <= r["pixel_corr"] <= 1
        hist = np.ravel(scipy.io.loadmat(run_dir / "sub-01" / "VC" /
                                         f"recon_image-{r['label']}.mat")["loss_history"])
        assert hist.size == r["function_evals"] and r["final_loss"] == pytest.approx(hist[-1])
        if method == "icnn_fourier":
            assert r["iterations"] == 2 and hist.size == 2
        if method == "dgn_direct":  # nothing optimised: no "loss did not fall" warning
            assert r["iterations"] == 0 and hist.size == 1
            assert r["stop_reason"].startswith("no optimisation") and r["loss_fell"] is None
        else:
            assert r["stop_reason"] and r["loss_fell"] is not None
        img = scipy.io.loadmat(run_dir / "sub-01" / "VC" /
                               f"recon_image-{r['label']}.mat")["recon_image"]
        if method != "dgn_direct":  # the squash keeps the prior's pixels in range
            assert img.min() >= 0.0 and img.max() <= 255.0
    assert (run_dir / "gallery.png").is_file() and (run_dir / "metrics.csv").is_file()
    # the summary points DGN users of a random generator to the weight-free prior
    assert ("method=icnn_fourier" in output_of(res)) == (method == "dgn_direct")
    if method == "dgn_direct":
        assert "did not fall" not in output_of(res)


def test_pixel_steps_are_refused_on_a_spectrum():
    from icnn_pl.engine.icnn_steps import GDSteps

    targets = batched_tiny_targets()
    with pytest.raises(ConfigError, match="spectrum"):
        build_reconstruction(targets, tiny_encoder(), partial(torch.optim.Adam, lr=0.1), 3,
                             fourier=FOURIER, steps=GDSteps(blur_sigma=Linear(1.0, 0.5)))
