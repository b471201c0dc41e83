"""Gradient-descent methods (icnn_gd, icnn_dgn_gd) against an independent restatement of
the reference per-iteration algorithm, plus the per-step operations of
``icnn_pl.engine.icnn_steps``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import (
    LAYERS,
    MEAN_BGR,
    PAD,
    SIZE,
    TINY_MAPPING,
    TinyGenerator,
    caffe_to_rgb,
    double_copy,
    generator_targets,
    inverse_norm_weights,
    linear_at,
    rgb_image,
    rgb_to_caffe,
    sequential_features,
    tiny_encoder,
    tiny_net,
    tiny_targets,
)
from scipy.ndimage import gaussian_filter

import icnn_pl.engine.icnn_steps as optim_mod
import icnn_pl.engine.schedules as schedules_mod
from icnn_pl import icnn_dgn_gd, icnn_dgn_lbfgs, icnn_gd, icnn_lbfgs
from icnn_pl.engine.icnn_steps import (
    Clipping,
    GDSteps,
    clip_extreme_,
    clip_small_contribution_,
    clip_small_norm_,
    gaussian_blur,
    p_norm_grad,
    tv_norm_grad,
)
from icnn_pl.engine.params import PixelImage
from icnn_pl.engine.schedules import Linear
from icnn_pl.nets import FeatureEncoder


# --------------------------------------------------------------------------- reference loops
def _weighted_l2(feats, targets, weights):
    return sum(weights[n] * ((feats[n][0] - targets[n]) ** 2).sum() for n in targets)


def reference_icnn_gd(targets, x0, n_iter, *, lr=(2.0, 1e-10), momentum=(0.9, 0.9),
                      decay=(0.2, 1e-10), sigma=(2.0, 0.5), blur=True, normalize=True,
                      offsets=None, net_seed=0):
    """The reference icnn_gd loop in float64 numpy + autograd on a private copy of the net.

    forward -> weighted l2 sum -> backward -> g / mean|g| -> b = m_t b + g -> x -= lr_t b
    -> (un-jitter) -> x *= 1 - decay_t -> per-channel scipy Gaussian blur (reflect, truncate 4).
    """
    net = double_copy(tiny_net(net_seed))
    t64 = {n: torch.from_numpy(np.asarray(v, dtype=np.float64)) for n, v in targets.items()}
    w = inverse_norm_weights(targets)
    x = np.asarray(x0, dtype=np.float64).copy()
    b = np.zeros_like(x)
    losses = []
    for t in range(n_iter):
        lr_t, m_t = linear_at(*lr, t, n_iter), linear_at(*momentum, t, n_iter)
        d_t, s_t = linear_at(*decay, t, n_iter), linear_at(*sigma, t, n_iter)
        if offsets is not None:
            ox, oy = offsets[t]
            x = np.roll(x, (oy, ox), axis=(1, 2))
            b = np.roll(b, (oy, ox), axis=(1, 2))
        xt = torch.tensor(x[None], requires_grad=True)
        loss = _weighted_l2(sequential_features(net, xt), t64, w)
        loss.backward()
        losses.append(loss.item())
        g = xt.grad[0].numpy()
        if normalize:
            g = g / np.abs(g).mean()
        b = m_t * b + g
        x = x - lr_t * b
        if offsets is not None:
            x = np.roll(x, (-oy, -ox), axis=(1, 2))
            b = np.roll(b, (-oy, -ox), axis=(1, 2))
        x = (1.0 - d_t) * x
        if blur:
            x = np.stack([gaussian_filter(c, s_t, mode="reflect", truncate=4.0) for c in x])
    return x, np.asarray(losses)


def reference_dgn_gd(targets, gen, z0, n_iter, lower, upper, *, lr=(2.0, 1e-10),
                     momentum=(0.9, 0.9), decay=0.01, net_seed=0):
    """The reference icnn_dgn_gd loop: code-space momentum GD with normalisation, constant
    decay and clipping to [lower, upper]; returns the image of the last forward pass."""
    net = double_copy(tiny_net(net_seed))
    gen = double_copy(gen)
    t64 = {n: torch.from_numpy(np.asarray(v, dtype=np.float64)) for n, v in targets.items()}
    w = inverse_norm_weights(targets)
    z = np.asarray(z0, dtype=np.float64).copy()
    b = np.zeros_like(z)
    losses = []
    for t in range(n_iter):
        lr_t, m_t = linear_at(*lr, t, n_iter), linear_at(*momentum, t, n_iter)
        zt = torch.tensor(z[None], requires_grad=True)
        img = gen(zt)[:, :, PAD:PAD + SIZE[0], PAD:PAD + SIZE[1]]
        loss = _weighted_l2(sequential_features(net, img), t64, w)
        loss.backward()
        losses.append(loss.item())
        last_img, last_z = img[0].detach().numpy().copy(), z.copy()
        g = zt.grad[0].numpy()
        g = g / np.abs(g).mean()
        b = m_t * b + g
        z = z - lr_t * b
        z = (1.0 - decay) * z
        z = np.minimum(np.maximum(z, lower), upper)
    return last_img, last_z, z, np.asarray(losses)


# --------------------------------------------------------------------------- icnn_gd parity
GD_CASES = {
    "defaults": {},
    "schedules": dict(lr=(1.0, 0.2), momentum=(0.5, 0.95), decay=(0.1, 0.0), sigma=(1.0, 3.0)),
    "no_blur_no_norm": dict(blur=False, normalize=False, lr=(1e-4, 1e-5)),
}


def _gd_kwargs(case):
    kw = {}
    if "lr" in case:
        kw.update(lr_start=case["lr"][0], lr_end=case["lr"][1])
    if "momentum" in case:
        kw.update(momentum_start=case["momentum"][0], momentum_end=case["momentum"][1])
    if "decay" in case:
        kw.update(decay_start=case["decay"][0], decay_end=case["decay"][1])
    if "sigma" in case:
        kw.update(sigma_start=case["sigma"][0], sigma_end=case["sigma"][1])
    if "blur" in case:
        kw.update(image_blur=case["blur"])
    if "normalize" in case:
        kw.update(grad_normalize=case["normalize"])
    return kw


@pytest.mark.parametrize("name", list(GD_CASES))
def test_icnn_gd_matches_reference_step_by_step(name):
    case = GD_CASES[name]
    targets = tiny_targets(seed=1)
    init = rgb_image(seed=2)
    n_iter = 8
    img, losses = icnn_gd.reconstruct_image(
        targets, tiny_encoder(), initial_image=init, iter_n=n_iter, **_gd_kwargs(case))
    ref_x, ref_losses = reference_icnn_gd(targets, rgb_to_caffe(init, MEAN_BGR), n_iter, **case)
    assert losses.shape == (n_iter,)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert img.shape == (*SIZE, 3)
    np.testing.assert_allclose(img, caffe_to_rgb(ref_x), rtol=1e-4, atol=1e-2)


def test_icnn_gd_first_loss_is_loss_of_the_initial_image():
    targets = tiny_targets(seed=1)
    init = rgb_image(seed=2)
    _, losses = icnn_gd.reconstruct_image(targets, tiny_encoder(), initial_image=init, iter_n=1)
    net = double_copy(tiny_net())
    feats = sequential_features(net, torch.from_numpy(rgb_to_caffe(init))[None])
    w = inverse_norm_weights(targets)
    expected = sum(w[n] * float(((feats[n][0].detach().numpy() - targets[n]) ** 2).sum())
                   for n in LAYERS)
    assert losses[0] == pytest.approx(expected, rel=1e-5)


def test_icnn_gd_jitter_rolls_image_and_momentum(monkeypatch):
    """With jitter on, the run equals the reference loop that rolls both the image and the
    momentum buffer by the same offsets and rolls them back after the update."""
    calls = []
    original = optim_mod._roll_

    def recording_roll(param, opt, shifts):
        (shift,) = shifts  # one image: one offset
        calls.append(shift)
        return original(param, opt, shifts)

    monkeypatch.setattr(optim_mod, "_roll_", recording_roll)
    targets = tiny_targets(seed=1)
    init = rgb_image(seed=2)
    n_iter = 6
    img, losses = icnn_gd.reconstruct_image(
        targets, tiny_encoder(), initial_image=init, iter_n=n_iter, image_jitter=True,
        jitter_size=3, seed=5)
    assert len(calls) == 2 * n_iter
    shifts, unshifts = calls[0::2], calls[1::2]
    assert all(u == (-ox, -oy) for (ox, oy), u in zip(shifts, unshifts, strict=True))
    assert all(abs(ox) <= 3 and abs(oy) <= 3 for ox, oy in shifts)
    assert any(s != (0, 0) for s in shifts)
    assert np.isfinite(img).all() and np.isfinite(losses).all()
    ref_x, ref_losses = reference_icnn_gd(targets, rgb_to_caffe(init), n_iter, offsets=shifts)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    np.testing.assert_allclose(img, caffe_to_rgb(ref_x), rtol=1e-4, atol=1e-2)


# --------------------------------------------------------------------------- icnn_dgn_gd parity
def test_icnn_dgn_gd_matches_reference_step_by_step():
    gen = TinyGenerator(dim=8, seed=3)
    rng = np.random.default_rng(4)
    targets = generator_targets(gen, rng.uniform(0, 3, 8))
    z0 = rng.uniform(-0.5, 3.0, 8).astype(np.float32)  # negative units: clipped after step 1
    upper = rng.uniform(1.0, 2.5, 8).astype(np.float32)  # per-unit upper bound, active
    n_iter = 8
    img, losses, code = icnn_dgn_gd.reconstruct_image(
        targets, tiny_encoder(), gen, initial_gen_feat=z0, feat_lower_bound=0.0,
        feat_upper_bound=upper, iter_n=n_iter, return_gen_feat=True)
    ref_img, ref_last_z, ref_final_z, ref_losses = reference_dgn_gd(
        targets, gen, z0, n_iter, 0.0, upper)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    # the image and code of the LAST forward pass (before the final update)
    np.testing.assert_allclose(code, ref_last_z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(img, caffe_to_rgb(ref_img), rtol=1e-4, atol=1e-2)
    # ... which differs from the image of the code after the final update
    with torch.no_grad():
        after = gen(torch.as_tensor(ref_final_z, dtype=torch.float32)[None])[0]
    after_rgb = caffe_to_rgb(after[:, PAD:PAD + SIZE[0], PAD:PAD + SIZE[1]].numpy())
    assert np.abs(after_rgb - img).max() > 1e-2
    # the returned code produced the returned image
    with torch.no_grad():
        again = gen(torch.as_tensor(code)[None])[0, :, PAD:PAD + SIZE[0], PAD:PAD + SIZE[1]]
    np.testing.assert_allclose(img, caffe_to_rgb(again.numpy()), atol=1e-3)
    assert (code >= 0).all() and (code <= upper + 1e-6).all()


def test_icnn_dgn_gd_without_return_gen_feat_returns_two_values():
    gen = TinyGenerator(dim=8, seed=3)
    targets = generator_targets(gen, np.ones(8))
    out = icnn_dgn_gd.reconstruct_image(targets, tiny_encoder(), gen, iter_n=2)
    assert len(out) == 2
    assert out[0].shape == (*SIZE, 3) and out[1].shape == (2,)


# --------------------------------------------------------------------------- loss goes down
def test_every_method_lowers_the_loss():
    targets = tiny_targets(seed=1)
    init = rgb_image(seed=2)
    _, gd = icnn_gd.reconstruct_image(targets, tiny_encoder(), initial_image=init, iter_n=20)
    _, lb = icnn_lbfgs.reconstruct_image(targets, tiny_encoder(), initial_image=init, maxiter=20)
    gen = TinyGenerator(dim=8, seed=3)
    gtargets = generator_targets(gen, np.random.default_rng(5).uniform(0, 3, 8))
    _, dgd = icnn_dgn_gd.reconstruct_image(gtargets, tiny_encoder(), gen, iter_n=20)
    _, dlb = icnn_dgn_lbfgs.reconstruct_image(gtargets, tiny_encoder(), gen, maxiter=20)
    for name, losses in {"icnn_gd": gd, "icnn_lbfgs": lb, "icnn_dgn_gd": dgd,
                         "icnn_dgn_lbfgs": dlb}.items():
        assert np.isfinite(losses).all(), name
        assert losses.min() < 0.9 * losses[0], (name, losses[0], losses.min())
    assert gd[-1] < 0.9 * gd[0] and lb[-1] < 0.1 * lb[0] and dlb[-1] < 0.1 * dlb[0]


# --------------------------------------------------------------------------- blur
@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0, 2.0, 3.7, 8.0])
def test_gaussian_blur_equals_scipy(sigma):
    # sigma 3.7 -> radius 15 and 8.0 -> radius 32: larger than half (and all) of the image
    x = np.random.default_rng(0).normal(size=(2, 3, 10, 13)) * 50
    got = gaussian_blur(torch.from_numpy(x).float(), sigma).double().numpy()
    want = np.stack([[gaussian_filter(c, sigma, mode="reflect", truncate=4.0) for c in img]
                     for img in x])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    got64 = gaussian_blur(torch.from_numpy(x), sigma).numpy()
    np.testing.assert_allclose(got64, want, rtol=1e-10, atol=1e-9)


def test_gaussian_blur_sigma_zero_is_identity():
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(gaussian_blur(x, 0.0), x)


# --------------------------------------------------------------------------- jitter unit tests
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_shift_rolls_image_and_every_same_shaped_state(opt_name):
    torch.manual_seed(0)
    param = PixelImage(torch.randn(2, 3, 7, 9), MEAN_BGR)
    opt = (torch.optim.SGD([param.value], lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam([param.value], lr=0.1))
    param.value.grad = torch.randn_like(param.value)
    opt.step()
    state0 = {k: v.clone() for k, v in opt.state[param.value].items()}
    rolled_keys = [k for k, v in state0.items() if v.shape == param.value.shape]
    assert rolled_keys  # momentum_buffer / exp_avg, exp_avg_sq
    x0 = param.value.detach().clone()
    steps = GDSteps(normalize_grad=False, jitter=3)
    rngs = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    seen = []

    def rolled(x: torch.Tensor, shifts) -> np.ndarray:  # each image by its own offset
        return np.stack([np.roll(np.roll(x[i].numpy(), ox, -1), oy, -2)
                         for i, (ox, oy) in enumerate(shifts)])

    for _ in range(8):
        shift = steps.shift(param, opt, rngs)
        seen += shift
        assert len(shift) == 2 and all(-3 <= v <= 3 for s in shift for v in s)
        np.testing.assert_array_equal(param.value.detach().numpy(), rolled(x0, shift))
        for k in rolled_keys:
            np.testing.assert_array_equal(opt.state[param.value][k].numpy(),
                                          rolled(state0[k], shift))
        for k, v in state0.items():
            if k not in rolled_keys:
                assert torch.equal(opt.state[param.value][k], v)
        steps.after_step(param, opt, 0, 10, shift, None)  # un-jitter only
        assert torch.equal(param.value.detach(), x0)
        for k, v in state0.items():
            assert torch.equal(opt.state[param.value][k], v)
    assert any(s != (0, 0) for s in seen)


def test_no_jitter_means_no_shift():
    param = PixelImage(torch.randn(1, 3, 4, 4), MEAN_BGR)
    opt = torch.optim.SGD([param.value], lr=0.1, momentum=0.9)
    assert GDSteps(jitter=0).shift(param, opt, [torch.Generator()]) is None


def test_jitter_run_is_finite():
    img, losses = icnn_gd.reconstruct_image(
        tiny_targets(), tiny_encoder(), initial_image=rgb_image(2), iter_n=5, image_jitter=True,
        jitter_size=32)
    assert np.isfinite(img).all() and np.isfinite(losses).all() and losses.shape == (5,)


# --------------------------------------------------------------------------- regularisers
@pytest.mark.parametrize("opts", [
    dict(use_p_norm_reg=True),
    dict(use_TV_norm_reg=True),
    dict(use_p_norm_reg=True, use_TV_norm_reg=True, p=2, TVbeta=1.5),
])
def test_regularised_runs_are_finite_and_change_the_result(opts):
    targets, init = tiny_targets(), rgb_image(2)
    base, _ = icnn_gd.reconstruct_image(targets, tiny_encoder(), initial_image=init, iter_n=4)
    img, losses = icnn_gd.reconstruct_image(
        targets, tiny_encoder(), initial_image=init, iter_n=4, **opts)
    assert np.isfinite(img).all() and np.isfinite(losses).all()
    assert not np.allclose(img, base)


def _tv_value(x: np.ndarray, beta: float) -> float:
    """sum over pixels of (d1^2 + d2^2)^(beta/2), forward differences, zero at the far edge."""
    d1 = np.zeros_like(x)
    d2 = np.zeros_like(x)
    d1[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    d2[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return float(np.sum((d1 * d1 + d2 * d2) ** (beta / 2.0)))


def _numeric_grad(f, x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


@pytest.mark.parametrize("beta", [1.5, 2.0, 3.0])
def test_tv_grad_matches_finite_differences(beta):
    x = np.random.default_rng(0).normal(size=(1, 3, 5, 6)) * 10
    got = tv_norm_grad(torch.from_numpy(x), beta).numpy()
    want = _numeric_grad(lambda v: _tv_value(v, beta), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [2.0, 3.0, 6.0])
def test_p_norm_grad_matches_finite_differences(p):
    x = np.random.default_rng(1).normal(size=(1, 3, 3, 4))
    got = p_norm_grad(torch.from_numpy(x), p).numpy()
    want = _numeric_grad(lambda v: float(np.sum(np.abs(v) ** p)), x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- clipping ops
def _imgs(seed=0):
    return np.random.default_rng(seed).normal(size=(2, 3, 8, 7)) * 40


@pytest.mark.parametrize("pct", [1.0, 5.0, 20.0])
def test_clip_extreme_matches_numpy(pct):
    x = _imgs()
    t = torch.from_numpy(x.copy())
    clip_extreme_(t, pct)
    want = np.stack([np.clip(im, np.percentile(im, pct / 2), np.percentile(im, 100 - pct / 2))
                     for im in x])
    np.testing.assert_allclose(t.numpy(), want, rtol=1e-12)
    assert not np.allclose(want, x)


@pytest.mark.parametrize("pct", [5.0, 30.0])
def test_clip_small_norm_matches_numpy(pct):
    x = _imgs(1)
    t = torch.from_numpy(x.copy())
    clip_small_norm_(t, pct)
    want = x.copy()
    for im in want:
        norm = np.sqrt((im ** 2).sum(0))
        im[:, norm < np.percentile(norm, pct)] = 0.0
    np.testing.assert_array_equal(t.numpy(), want)
    assert (want == 0).any()


@pytest.mark.parametrize("pct", [5.0, 30.0])
def test_clip_small_contribution_matches_numpy(pct):
    x, g = _imgs(2), _imgs(3)
    t = torch.from_numpy(x.copy())
    clip_small_contribution_(t, torch.from_numpy(g), pct)
    want = x.copy()
    for im, gr in zip(want, g, strict=True):
        score = np.sqrt(((im * gr) ** 2).sum(0))
        im[:, score < np.percentile(score, pct)] = 0.0
    np.testing.assert_array_equal(t.numpy(), want)


def test_clips_run_every_n_iterations():
    x0 = torch.from_numpy(_imgs(4))
    param = PixelImage(x0.clone(), MEAN_BGR)
    opt = torch.optim.SGD([param.value], lr=0.1)
    steps = GDSteps(normalize_grad=False, clip_extreme=Clipping(3, Linear(10.0, 10.0)))
    for t in range(2):  # iterations 0, 1: not due
        steps.after_step(param, opt, t, 10, None, None)
        assert torch.equal(param.value.detach(), x0.float())
    steps.after_step(param, opt, 2, 10, None, None)  # (t + 1) % 3 == 0
    want = x0.float().clone()
    clip_extreme_(want, 10.0)
    assert torch.equal(param.value.detach(), want)


def test_clipping_options_run_end_to_end():
    img, losses = icnn_gd.reconstruct_image(
        tiny_targets(), tiny_encoder(), initial_image=rgb_image(2), iter_n=8,
        clip_extreme=True, clip_small_norm=True, clip_small_contribution=True,
        clip_extreme_every=2, clip_small_norm_every=2, clip_small_contribution_every=2)
    assert np.isfinite(img).all() and np.isfinite(losses).all()


def test_image_ops_are_refused_for_generator_codes():
    from icnn_pl.engine.params import GeneratorCode
    from icnn_pl.errors import ConfigError

    code = GeneratorCode(torch.zeros(1, 8), TinyGenerator(), SIZE, 0.0, 1.0)
    with pytest.raises(ConfigError, match="blur"):
        GDSteps(blur_sigma=Linear(1.0, 1.0)).check(code)
    GDSteps(decay=Linear(0.01, 0.01)).check(code)  # fine


def test_encoder_is_any_feature_encoder():
    # guards the helpers: the tiny encoder computes what sequential_features computes
    enc = FeatureEncoder(tiny_net(), TINY_MAPPING, MEAN_BGR, SIZE)
    enc.set_layers(list(LAYERS))
    x = torch.from_numpy(rgb_to_caffe(rgb_image(0))).float()[None]
    with torch.no_grad():
        got = enc(x)
        want = sequential_features(tiny_net(), x)
    for n in LAYERS:
        assert torch.equal(got[n], want[n])


# --------------------------------------------------------------------------- small pieces
def test_linear_schedule():
    sched = Linear(2.0, 1e-10)
    assert sched.at(0, 200) == 2.0
    assert sched.at(199, 200) == pytest.approx(0.01, rel=1e-6)  # the last lr of 200 iterations
    assert [schedules_mod.as_schedule(v) for v in (0.5, (1, 2), {"start": 3, "end": 4}, None)] == \
        [Linear(0.5, 0.5), Linear(1.0, 2.0), Linear(3.0, 4.0), None]


def test_gradient_normalisation_is_per_image():
    g = torch.stack([torch.randn(3, 4, 4) * 1e-6, torch.randn(3, 4, 4) * 1e3,
                     torch.zeros(3, 4, 4)])
    want = g.clone()
    for i in range(2):
        want[i] /= want[i].abs().mean()
    optim_mod.normalize_grad_(g)
    torch.testing.assert_close(g, want)
    assert torch.equal(g[2], torch.zeros(3, 4, 4))  # a zero gradient stays zero (no NaN)
