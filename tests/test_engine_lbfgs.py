"""L-BFGS-B methods (icnn_lbfgs, icnn_dgn_lbfgs): box bounds, one loss entry per function
evaluation, and tolerances that do not depend on the network's feature scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import (
    MEAN_BGR,
    PAD,
    SIZE,
    ForwardCounter,
    TinyGenerator,
    caffe_to_rgb,
    double_copy,
    generator_targets,
    inverse_norm_weights,
    rgb_image,
    rgb_to_caffe,
    sequential_features,
    tiny_encoder,
    tiny_net,
    tiny_targets,
)

from icnn_pl import icnn_dgn_lbfgs, icnn_lbfgs
from icnn_pl.engine.fit import fit
from icnn_pl.engine.lbfgsb import ScipyLBFGSB
from icnn_pl.engine.recipe import build_reconstruction
from icnn_pl.errors import ConfigError

ACT_RANGE = "/work/shared/reference/act_range_3x_fc7.txt"


def _loss_of_rgb(rgb, targets, net_seed=0):
    net = double_copy(tiny_net(net_seed))
    with torch.no_grad():
        feats = sequential_features(net, torch.from_numpy(rgb_to_caffe(rgb))[None])
    w = inverse_norm_weights(targets)
    return sum(w[n] * float(((feats[n][0].numpy() - targets[n]) ** 2).sum()) for n in targets)


def _crop_rgb(gen, code):
    with torch.no_grad():
        img = gen(torch.as_tensor(code, dtype=torch.float32)[None])[0]
    return caffe_to_rgb(img[:, PAD:PAD + SIZE[0], PAD:PAD + SIZE[1]].numpy())


# --------------------------------------------------------------------------- bounds
def test_pixel_lbfgs_keeps_raw_pixels_in_0_255():
    # targets of an image far outside [0, 255] pull the pixels out of the box
    targets = tiny_targets(rgb=rgb_image(seed=3, low=-400.0, high=700.0))
    img, losses = icnn_lbfgs.reconstruct_image(
        targets, tiny_encoder(), initial_image=rgb_image(2), maxiter=25)
    assert img.shape == (*SIZE, 3)
    assert img.min() >= -1e-3 and img.max() <= 255.0 + 1e-3
    # the bounds are active: many pixels sit on them
    assert (img < 1e-2).sum() > 10 and (img > 255.0 - 1e-2).sum() > 10
    assert losses.min() < losses[0]


def test_pixel_lbfgs_projects_an_infeasible_initial_image():
    targets = tiny_targets()
    init = rgb_image(2, low=-100.0, high=400.0)
    _, losses = icnn_lbfgs.reconstruct_image(targets, tiny_encoder(), initial_image=init,
                                             maxiter=1)
    assert losses[0] == pytest.approx(_loss_of_rgb(np.clip(init, 0, 255), targets), rel=1e-4)


def test_pixel_lbfgs_returns_the_final_iterate():
    targets = tiny_targets()
    img, losses = icnn_lbfgs.reconstruct_image(targets, tiny_encoder(),
                                               initial_image=rgb_image(2), maxiter=10)
    final = _loss_of_rgb(img, targets)
    assert np.isclose(losses, final, rtol=1e-4).any()
    assert final <= losses[0]


@pytest.mark.parametrize("bounds", ["scalar", "vector"])
def test_dgn_lbfgs_codes_stay_in_bounds(bounds):
    gen = TinyGenerator(dim=8, seed=3)
    rng = np.random.default_rng(0)
    targets = generator_targets(gen, rng.uniform(0, 8, 8))  # needs codes above the bound
    if bounds == "scalar":
        lower, upper = 0.5, 2.0
    else:
        lower = rng.uniform(0.0, 1.0, 8).astype(np.float32)
        upper = lower + rng.uniform(0.5, 2.0, 8).astype(np.float32)
    z0 = rng.normal(0, 3, 8).astype(np.float32)  # infeasible: projected first
    img, losses, code = icnn_dgn_lbfgs.reconstruct_image(
        targets, tiny_encoder(), gen, initial_gen_feat=z0, feat_lower_bound=lower,
        feat_upper_bound=upper, maxiter=20, return_gen_feat=True)
    assert code.shape == (8,)
    assert (code >= np.asarray(lower) - 1e-6).all() and (code <= np.asarray(upper) + 1e-6).all()
    assert np.isclose(code, upper, atol=1e-5).any()  # the upper bound is active
    # the first evaluation is at the projected initial code
    first = _crop_rgb(gen, np.clip(z0, lower, upper))
    assert losses[0] == pytest.approx(_loss_of_rgb(first, targets), rel=1e-4)
    # the image is the image of the returned code
    np.testing.assert_allclose(img, _crop_rgb(gen, code), atol=1e-3)
    assert len(losses) > 1 and losses.min() < losses[0]


def test_dgn_lbfgs_with_the_act_range_file():
    upper = np.loadtxt(ACT_RANGE)
    assert upper.shape == (4096,) and upper.min() == 2 and upper.max() == 6
    gen = TinyGenerator(dim=4096, hidden=8, seed=1)
    targets = generator_targets(gen, np.random.default_rng(0).uniform(0, 8, 4096))
    img, losses, code = icnn_dgn_lbfgs.reconstruct_image(
        targets, tiny_encoder(), gen, feat_lower_bound=0.0, feat_upper_bound=upper,
        maxiter=10, return_gen_feat=True)
    assert code.shape == (4096,)
    assert code.min() >= -1e-6 and (code <= upper + 1e-5).all()
    assert (code < 1e-6).any()  # the N(0, 1) initial code was projected onto lower 0
    assert np.isfinite(img).all() and losses.min() < losses[0]


def test_dgn_lbfgs_rejects_bounds_of_the_wrong_length():
    gen = TinyGenerator(dim=8)
    with pytest.raises(ConfigError, match="bounds"):
        icnn_dgn_lbfgs.reconstruct_image(generator_targets(gen, np.ones(8)), tiny_encoder(), gen,
                                         feat_upper_bound=np.ones(7), maxiter=2)


# --------------------------------------------------------------------------- loss list
def test_loss_list_has_one_entry_per_function_evaluation():
    enc = tiny_encoder()
    counter = ForwardCounter(enc.net[0], grad_only=True)  # the probe runs under no_grad
    _, losses = icnn_lbfgs.reconstruct_image(tiny_targets(), enc, initial_image=rgb_image(2),
                                             maxiter=12)
    counter.remove()
    assert len(losses) == counter.count
    assert len(losses) >= 12


def test_dgn_loss_list_has_one_entry_per_generator_call():
    gen = TinyGenerator(dim=8, seed=3)
    targets = generator_targets(gen, np.random.default_rng(1).uniform(0, 3, 8))
    counter = ForwardCounter(gen, grad_only=True)  # the final image is drawn under no_grad
    _, losses = icnn_dgn_lbfgs.reconstruct_image(targets, tiny_encoder(), gen, maxiter=6)
    counter.remove()
    assert len(losses) == counter.count


def _lbfgs_module(maxiter, scale=1.0, loss_scale="grad", **kw):
    made: list[ScipyLBFGSB] = []

    def factory(params, **kwargs):
        opt = ScipyLBFGSB(params, maxiter=maxiter, loss_scale=loss_scale, **kwargs)
        made.append(opt)
        return opt

    factory.runs_to_completion = True
    enc = tiny_encoder(scale=scale)
    targets = {n: torch.from_numpy(v)[None] for n, v in tiny_targets(scale=scale).items()}
    module = build_reconstruction(targets, enc, factory, maxiter, init=rgb_image(2),
                                  pixel_bounds=True, **kw)
    return module, made


@pytest.mark.parametrize("maxiter", [1, 5, 15])
def test_n_evals_matches_scipy_nfev_and_maxiter(maxiter):
    module, made = _lbfgs_module(maxiter)
    assert module.trainer_steps == 1  # one trainer step runs the whole minimisation
    res = fit(module)
    (opt,) = made
    assert opt.result.nit == maxiter  # did not converge early ...
    assert res.n_evals == opt.n_evals == opt.result.nfev == res.loss_history.shape[1]
    assert res.n_evals >= maxiter  # ... so at least maxiter evaluations


def test_maxiter_must_be_positive():
    with pytest.raises(ConfigError):
        ScipyLBFGSB([torch.zeros(3, requires_grad=True)], maxiter=0)
    with pytest.raises(ConfigError):
        ScipyLBFGSB([torch.zeros(3, requires_grad=True)], loss_scale="bogus")


# --------------------------------------------------------------------------- tolerances
def test_loss_scale_default_runs_where_raw_values_stop_at_iteration_0():
    """A network with tiny features (weights x 1e-3): with raw values scipy's absolute gtol
    stops at the first evaluation and returns the initial image (the users' "L-BFGS stops
    at iteration 0"); the default gradient scaling keeps going."""
    scale = 1e-3
    targets, init = tiny_targets(scale=scale), rgb_image(2)
    img_none, loss_none = icnn_lbfgs.reconstruct_image(
        targets, tiny_encoder(scale=scale), initial_image=init, maxiter=20, loss_scale="none")
    img, losses = icnn_lbfgs.reconstruct_image(
        targets, tiny_encoder(scale=scale), initial_image=init, maxiter=20)
    assert len(loss_none) == 1
    np.testing.assert_allclose(img_none, init, atol=1e-3)
    assert len(losses) > 10
    assert losses[-1] < 1e-3 * losses[0]
    assert np.abs(img - init).max() > 10


def test_loss_scale_grad_and_none_agree_on_a_well_scaled_problem():
    targets, init = tiny_targets(), rgb_image(2)
    _, a = icnn_lbfgs.reconstruct_image(targets, tiny_encoder(), initial_image=init, maxiter=3,
                                        loss_scale="none")
    _, b = icnn_lbfgs.reconstruct_image(targets, tiny_encoder(), initial_image=init, maxiter=3)
    assert a[0] == pytest.approx(b[0], rel=1e-6)  # same start; the losses are reported unscaled
    assert len(a) > 1 and len(b) > 1


def test_pixel_bounds_are_caffe_space_bounds():
    module, _ = _lbfgs_module(1)
    lower, upper = module.param.bounds()
    mean = torch.tensor(MEAN_BGR).view(1, 3, 1, 1)
    assert torch.equal(lower, (-mean).expand_as(lower))
    assert torch.equal(upper, (255.0 - mean).expand_as(upper))
