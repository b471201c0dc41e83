"""The functional API and the pieces under it: name matching, input forms, frozen networks,
any nn.Module as encoder, early stop, pre-ReLU features, clear errors, masks, layer
weights and loss types."""

from __future__ import annotations

import gc
from functools import partial

import numpy as np
import pytest
import torch
from engine_helpers import (
    LAYERS,
    MEAN_BGR,
    SIZE,
    TINY_MAPPING,
    TINY_SHAPES,
    ForwardCounter,
    TinyGenerator,
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
from torch import nn

from icnn_pl import icnn_dgn_gd, icnn_dgn_lbfgs, icnn_gd, icnn_lbfgs
from icnn_pl.engine.fit import fit
from icnn_pl.engine.icnn_steps import GDSteps
from icnn_pl.engine.objective import LOSSES, layer_weights, make_mask
from icnn_pl.engine.recipe import build_reconstruction
from icnn_pl.engine.reconstruction import Reconstruction
from icnn_pl.engine.schedules import Linear
from icnn_pl.errors import ConfigError, DataError
from icnn_pl.nets import FeatureEncoder


def _first_loss(targets, weights, masks=None, init=None, loss=None):
    """Loss of the initial image, restated: sum_l w_l * loss_l(f_l, t_l, m_l), float64."""
    init = rgb_image(2) if init is None else init
    net = double_copy(tiny_net())
    with torch.no_grad():
        feats = sequential_features(net, torch.from_numpy(rgb_to_caffe(init))[None])
    total = 0.0
    for n, t in targets.items():
        d = feats[n][0].numpy() - t
        if masks and n in masks:
            d = d * masks[n]
        total += weights[n] * float((d * d).sum() if loss is None else loss(d))
    return total


# --------------------------------------------------------------------------- input forms
def test_feature_dict_order_does_not_matter():
    t = tiny_targets()
    shuffled = {k: t[k] for k in ("fc", "c1", "c2")}
    a_img, a_loss = icnn_gd.reconstruct_image(t, tiny_encoder(), iter_n=4, seed=3)
    b_img, b_loss = icnn_gd.reconstruct_image(shuffled, tiny_encoder(), iter_n=4, seed=3)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_loss, b_loss)
    gen = TinyGenerator(seed=3)
    g = generator_targets(gen, np.ones(8))
    a = icnn_dgn_gd.reconstruct_image(g, tiny_encoder(), gen, iter_n=3, return_gen_feat=True)
    b = icnn_dgn_gd.reconstruct_image({k: g[k] for k in ("c2", "fc", "c1")}, tiny_encoder(), gen,
                                      iter_n=3, return_gen_feat=True)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_reversed_dict_is_matched_by_name_not_order():
    # bdpy pairs targets with hook call order; here the loss is the one of the named layers
    t = tiny_targets()
    rev = {k: t[k] for k in reversed(LAYERS)}
    _, loss = icnn_gd.reconstruct_image(rev, tiny_encoder(), initial_image=rgb_image(2), iter_n=1)
    assert loss[0] == pytest.approx(_first_loss(t, inverse_norm_weights(t)), rel=1e-5)


@pytest.mark.parametrize("batch_axis", [False, True])
@pytest.mark.parametrize("kind", ["numpy", "torch", "float64"])
def test_batch_axis_and_array_type_give_the_same_result(batch_axis, kind):
    t = tiny_targets()
    base_img, base_loss = icnn_gd.reconstruct_image(t, tiny_encoder(), iter_n=3)
    conv = {"numpy": lambda v: v, "torch": torch.from_numpy,
            "float64": lambda v: v.astype(np.float64)}[kind]
    given = {k: conv(v[None] if batch_axis else v) for k, v in t.items()}
    img, loss = icnn_gd.reconstruct_image(given, tiny_encoder(), iter_n=3)
    np.testing.assert_array_equal(img, base_img)
    np.testing.assert_array_equal(loss, base_loss)


# --------------------------------------------------------------------------- frozen networks
def test_encoder_and_generator_get_no_gradients_and_stay_in_eval_mode():
    net = nn.Sequential(*tiny_net(), nn.Dropout(0.5))  # dropout would make runs random
    net.train()
    enc = FeatureEncoder(net, TINY_MAPPING, MEAN_BGR, SIZE)
    gen = TinyGenerator(seed=3)
    gen.train()
    gen.requires_grad_(True)
    targets = generator_targets(gen, np.ones(8))
    a = icnn_dgn_gd.reconstruct_image(targets, enc, gen, iter_n=3)
    b = icnn_dgn_lbfgs.reconstruct_image(targets, enc, gen, maxiter=3)
    c = icnn_gd.reconstruct_image(targets, enc, iter_n=3)
    assert all(np.isfinite(x[1]).all() for x in (a, b, c))
    for module in (enc.net, gen):
        assert all(p.grad is None for p in module.parameters())
        assert all(not m.training for m in module.modules())
    # frozen and in eval mode: a second run repeats the first exactly
    again = icnn_dgn_gd.reconstruct_image(targets, enc, gen, iter_n=3)
    np.testing.assert_array_equal(a[0], again[0])


def test_feature_encoder_itself_is_in_eval_mode():
    enc = tiny_encoder()
    icnn_gd.reconstruct_image(tiny_targets(), enc, iter_n=1)
    assert all(not m.training for m in enc.modules())


@pytest.mark.parametrize("with_generator", [False, True])
def test_the_only_trainable_parameter_is_param_value(with_generator):
    enc = tiny_encoder()
    gen = TinyGenerator(seed=3).requires_grad_(False) if with_generator else None
    targets = {n: torch.from_numpy(v)[None] for n, v in tiny_targets().items()}
    module = build_reconstruction(
        targets, enc, partial(torch.optim.SGD, lr=1.0, momentum=0.9), 3, generator=gen,
        init="zeros" if with_generator else "uniform",
        steps=GDSteps(decay=Linear(0.01, 0.01)))
    assert isinstance(module, Reconstruction)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert [n for n, _ in named] == ["param.value"]
    assert len(list(module.parameters())) == 1
    # the frozen nets are not submodules (not moved / saved with each reconstruction)
    assert not any(m is enc or m is gen for m in module.modules())
    res = fit(module)
    assert res.loss_history.shape == (1, 3)
    assert all(p.grad is None for p in enc.parameters())


def test_build_reconstruction_freezes_the_generator():
    gen = TinyGenerator(seed=3)  # requires_grad=True, train mode, as a user builds it
    targets = {n: torch.from_numpy(v)[None]
               for n, v in generator_targets(gen, np.ones(8)).items()}
    module = build_reconstruction(
        targets, tiny_encoder(), partial(torch.optim.SGD, lr=1.0, momentum=0.9), 3,
        generator=gen, init="zeros", steps=GDSteps(decay=Linear(0.01, 0.01)))
    fit(module)
    assert all(p.grad is None for p in gen.parameters())
    assert not gen.training


# --------------------------------------------------------------------------- any nn.Module
class _Nested(nn.Module):
    """Size-agnostic network with nested attribute paths (body.0, head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def _nested_targets(net, size=(224, 224)):
    x = torch.from_numpy(rgb_to_caffe(rgb_image(1, size))).float()[None]
    with torch.no_grad():
        return {"conv": net.body[0](x)[0].numpy(), "out": net(x)[0].numpy()}


def test_any_module_with_a_layer_mapping_works_as_net():
    net = _Nested()
    t = _nested_targets(net)
    img, loss = icnn_gd.reconstruct_image(t, net, layer_mapping={"conv": "body.0", "out": "head"},
                                          iter_n=3)
    assert img.shape == (224, 224, 3) and loss.shape == (3,) and np.isfinite(loss).all()
    img2, loss2 = icnn_lbfgs.reconstruct_image(
        t, _Nested(), layer_mapping={"conv": "body.0", "out": "head"}, maxiter=2)
    assert img2.shape == (224, 224, 3) and loss2[-1] < loss2[0]


def test_module_paths_work_as_feature_keys():
    net = _Nested()
    t = _nested_targets(net)
    by_path = {"body.0": t["conv"], "head": t["out"]}
    _, a = icnn_gd.reconstruct_image(by_path, net, iter_n=2)
    _, b = icnn_gd.reconstruct_image(t, _Nested(), layer_mapping={"conv": "body.0", "out": "head"},
                                     iter_n=2)
    np.testing.assert_array_equal(a, b)
    # on a FeatureEncoder too: "3" is the module path of feature c2
    tt = tiny_targets(layers=("c1", "c2"))
    _, c = icnn_gd.reconstruct_image({"0": tt["c1"], "3": tt["c2"]}, tiny_encoder(), iter_n=2)
    _, d = icnn_gd.reconstruct_image(tt, tiny_encoder(), iter_n=2)
    np.testing.assert_array_equal(c, d)


def test_raw_module_can_be_used_for_several_reconstructions():
    net = _Nested()
    t = _nested_targets(net)
    mapping = {"conv": "body.0", "out": "head"}
    _, a = icnn_gd.reconstruct_image(t, net, layer_mapping=mapping, iter_n=1)
    _, b = icnn_gd.reconstruct_image(t, net, layer_mapping=mapping, iter_n=1)
    np.testing.assert_array_equal(a, b)


def test_raw_module_is_left_as_it_was():
    net = _Nested()
    t = _nested_targets(net)
    icnn_gd.reconstruct_image(t, net, layer_mapping={"conv": "body.0", "out": "head"}, iter_n=1)
    gc.collect()  # the encoder made for the call is gone: its hooks went with it
    assert all(not m._forward_hooks for m in net.modules())
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 5)


def test_raw_module_with_its_own_input_size():
    t = tiny_targets()
    kwargs = dict(layer_mapping=TINY_MAPPING, img_mean=MEAN_BGR, initial_image=rgb_image(2),
                  iter_n=2)
    try:
        img, _ = icnn_gd.reconstruct_image(t, tiny_net(), input_size=SIZE, **kwargs)
    except TypeError:  # no input_size option: it must come from the initial image
        img, _ = icnn_gd.reconstruct_image(t, tiny_net(), **kwargs)
    assert img.shape == (*SIZE, 3)


def test_img_mean_as_numpy_array():
    net = _Nested()
    img, _ = icnn_gd.reconstruct_image(
        _nested_targets(net), net, layer_mapping={"conv": "body.0", "out": "head"}, iter_n=1,
        img_mean=np.array([104.0, 117.0, 123.0], dtype=np.float32))
    assert img.shape == (224, 224, 3)


def test_img_mean_sets_the_caffe_space():
    """The returned RGB image is the Caffe-space image plus the given mean."""
    net = _Nested()
    t = _nested_targets(net)
    mapping = {"conv": "body.0", "out": "head"}
    init = rgb_image(4, (224, 224))
    a, _ = icnn_gd.reconstruct_image(t, net, layer_mapping=mapping, initial_image=init,
                                     iter_n=1, img_mean=(0.0, 0.0, 0.0), image_blur=False,
                                     decay_start=0.0, lr_start=0.0)
    np.testing.assert_allclose(a, init, atol=1e-4)  # lr 0, no decay, no blur: unchanged


# --------------------------------------------------------------------------- early stop
@pytest.mark.parametrize("method", ["gd", "dgn_gd", "lbfgs"])
def test_encoder_does_not_run_layers_after_the_deepest_target(method):
    enc = tiny_encoder()
    names = ["c1", "c2"]
    enc.feature_shapes(enc.forward_order(names))  # the one-off shape probe
    later = [ForwardCounter(enc.net[i]) for i in (4, 5, 6)]
    earlier = ForwardCounter(enc.net[3])
    if method == "gd":
        icnn_gd.reconstruct_image(tiny_targets(layers=names), enc, iter_n=4)
    elif method == "lbfgs":
        icnn_lbfgs.reconstruct_image(tiny_targets(layers=names), enc, maxiter=3)
    else:
        gen = TinyGenerator(seed=3)
        icnn_dgn_gd.reconstruct_image(generator_targets(gen, np.ones(8), layers=names), enc, gen,
                                      iter_n=4)
    assert [c.count for c in later] == [0, 0, 0]
    assert earlier.count >= 4


@pytest.mark.parametrize("first, second", [(LAYERS, ("c1",)), (("c1",), LAYERS)])
def test_one_encoder_serves_reconstructions_with_different_layer_sets(first, second):
    enc = tiny_encoder()
    t = tiny_targets()
    icnn_gd.reconstruct_image({k: t[k] for k in first}, enc, iter_n=1)
    sub = {k: t[k] for k in second}
    _, loss = icnn_gd.reconstruct_image(sub, enc, initial_image=rgb_image(2), iter_n=1)
    assert loss[0] == pytest.approx(_first_loss(sub, inverse_norm_weights(sub)), rel=1e-5)


def test_shape_probe_runs_at_most_once():
    enc = tiny_encoder()
    full = ForwardCounter(enc.net[6])
    grad = ForwardCounter(enc.net[6], grad_only=True)
    icnn_gd.reconstruct_image(tiny_targets(layers=("c1",)), enc, iter_n=5)
    assert grad.count == 0 and full.count <= 1


def test_features_are_taken_before_the_relu():
    net = tiny_net(relu_inplace=True)  # an in-place ReLU would overwrite the conv output
    enc = FeatureEncoder(net, TINY_MAPPING, MEAN_BGR, SIZE)
    enc.set_layers(["c1", "c2"])
    x = torch.from_numpy(rgb_to_caffe(rgb_image(0))).float()[None]
    with torch.no_grad():
        got = enc(x)
        want = sequential_features(tiny_net(), x, {"c1": 0, "c2": 3})
    assert (got["c1"] < 0).any() and (got["c2"] < 0).any()
    for n in ("c1", "c2"):
        torch.testing.assert_close(got[n], want[n])


@pytest.fixture(scope="module")
def vgg19_encoder():
    from icnn_pl.nets import build_encoder

    return build_encoder("vgg19")


@pytest.mark.slow
def test_vgg19_conv1_1_features_are_pre_relu(vgg19_encoder):
    enc = vgg19_encoder
    # all 19 layers, as the end-to-end test below (a shared encoder cannot switch layer
    # sets: see test_one_encoder_serves_reconstructions_with_different_layer_sets)
    enc.set_layers(list(enc.known_layers))
    x = torch.from_numpy(rgb_to_caffe(rgb_image(0, (224, 224)), enc.mean_bgr)).float()[None]
    with torch.no_grad():
        feats = enc(x)
        conv = enc.net.features[0](x)
    assert feats["conv1_1"].shape == (1, 64, 224, 224)
    assert (feats["conv1_1"] < 0).any()
    torch.testing.assert_close(feats["conv1_1"], conv)


@pytest.mark.slow
def test_vgg19_end_to_end_pixel_and_dgn(vgg19_encoder):
    """Real-size run: 19 VGG19 layers, 2 pixel GD iterations; relu7 DGN, 1 iteration."""
    from icnn_pl.nets import build_generator

    enc = vgg19_encoder
    names = list(enc.known_layers)
    assert len(names) == 19
    enc.set_layers(names)
    x = torch.from_numpy(rgb_to_caffe(rgb_image(0, (224, 224)), enc.mean_bgr)).float()[None]
    with torch.no_grad():
        feats = {k: v[0].numpy() for k, v in enc(x).items()}
    img, losses = icnn_gd.reconstruct_image(feats, enc, iter_n=2, initial_image="mean")
    assert img.shape == (224, 224, 3) and losses.shape == (2,)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    gen = build_generator("relu7")
    upper = np.loadtxt("/work/shared/reference/act_range_3x_fc7.txt")
    img, losses, code = icnn_dgn_gd.reconstruct_image(
        feats, enc, gen, iter_n=1, feat_upper_bound=upper, return_gen_feat=True)
    assert img.shape == (224, 224, 3) and losses.shape == (1,) and np.isfinite(losses).all()
    assert code.shape == (4096,)


# --------------------------------------------------------------------------- errors
def _gd(features, **kw):
    kw.setdefault("iter_n", 1)
    return icnn_gd.reconstruct_image(features, tiny_encoder(), **kw)


def test_unknown_layer_name():
    t = tiny_targets()
    with pytest.raises(ConfigError, match="nope") as exc:
        _gd({**t, "nope": t["fc"]})
    assert "c1" in str(exc.value)  # lists the valid names


def test_target_shape_mismatch_names_the_layer():
    t = tiny_targets()
    with pytest.raises(DataError, match="c2") as exc:
        _gd({**t, "c2": t["c2"][:3]})
    assert "(6, 8, 8)" in str(exc.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layer", ["c1", "fc"])
def test_non_finite_targets(bad, layer):
    t = tiny_targets()
    v = t[layer].copy()
    v.flat[3] = bad
    with pytest.raises(DataError, match=layer) as exc:
        _gd({**t, layer: v})
    assert "NaN" in str(exc.value)


def test_all_zero_target_with_inverse_norm_weights():
    t = tiny_targets()
    with pytest.raises(DataError, match="c2") as exc:
        _gd({**t, "c2": np.zeros_like(t["c2"])})
    assert "zero" in str(exc.value)
    # uniform weights have no division: fine
    _, loss = _gd({**t, "c2": np.zeros_like(t["c2"])}, layer_weight="uniform")
    assert np.isfinite(loss).all()


@pytest.mark.parametrize("layer, mask", [
    ("fc", np.ones(9)),
    ("c2", np.ones((5, 8, 8))),
    ("c2", np.ones((1, 6, 8, 8))),
    ("c2", np.ones(6 * 8 * 8)),
    ("fc", np.ones((2, 5))),
])
def test_mask_of_the_wrong_shape(layer, mask):
    with pytest.raises(ConfigError, match=layer):
        _gd(tiny_targets(), mask={layer: mask})


def test_mask_or_channels_for_a_layer_that_is_not_a_target():
    with pytest.raises(ConfigError, match="zz"):
        _gd(tiny_targets(), mask={"zz": np.ones(3)})
    with pytest.raises(ConfigError, match="c2"):
        _gd(tiny_targets(), channel={"c2": [0, 6]})  # c2 has channels 0..5


@pytest.mark.parametrize("method", [icnn_dgn_gd, icnn_dgn_lbfgs])
def test_lower_bound_above_upper_bound(method):
    gen = TinyGenerator()
    t = generator_targets(gen, np.ones(8))
    kw = {"iter_n": 1} if method is icnn_dgn_gd else {"maxiter": 1}
    with pytest.raises(ConfigError, match="lower"):
        method.reconstruct_image(t, tiny_encoder(), gen, feat_lower_bound=5.0,
                                 feat_upper_bound=1.0, **kw)
    upper = np.full(8, 3.0)
    upper[2] = -1.0  # one unit crosses
    with pytest.raises(ConfigError, match="lower"):
        method.reconstruct_image(t, tiny_encoder(), gen, feat_upper_bound=upper, **kw)


@pytest.mark.parametrize("shape", [(15, 16, 3), (16, 16), (16, 16, 4), (3, 16, 16)])
def test_initial_image_of_the_wrong_size(shape):
    with pytest.raises(ConfigError, match="initial image"):
        _gd(tiny_targets(), initial_image=np.zeros(shape, dtype=np.float32))
    with pytest.raises(ConfigError, match="initial image"):
        icnn_lbfgs.reconstruct_image(tiny_targets(), tiny_encoder(), maxiter=1,
                                     initial_image=np.zeros(shape, dtype=np.float32))


def test_initial_code_of_the_wrong_size():
    gen = TinyGenerator()
    with pytest.raises(ConfigError, match="code"):
        icnn_dgn_gd.reconstruct_image(generator_targets(gen, np.ones(8)), tiny_encoder(), gen,
                                      iter_n=1, initial_gen_feat=np.zeros(7))


@pytest.mark.parametrize("n", [0, -1])
def test_non_positive_iterations(n):
    t = tiny_targets()
    gen = TinyGenerator()
    with pytest.raises(ConfigError, match="n_iter"):
        _gd(t, iter_n=n)
    with pytest.raises(ConfigError):
        icnn_lbfgs.reconstruct_image(t, tiny_encoder(), maxiter=n)
    with pytest.raises(ConfigError):
        icnn_dgn_gd.reconstruct_image(t, tiny_encoder(), gen, iter_n=n)
    with pytest.raises(ConfigError):
        icnn_dgn_lbfgs.reconstruct_image(t, tiny_encoder(), gen, maxiter=n)


def test_other_bad_options():
    t = tiny_targets()
    with pytest.raises(DataError):
        _gd({})
    with pytest.raises(ConfigError, match="bogus"):
        _gd(t, initial_image="bogus")
    with pytest.raises(ConfigError, match="bogus"):
        _gd(t, loss_type="bogus")
    with pytest.raises(ConfigError, match="bogus"):
        _gd(t, layer_weight="bogus")
    with pytest.raises(ConfigError, match="c2"):
        _gd(t, layer_weight={"c1": 1.0})  # names the missing layers


# --------------------------------------------------------------------------- masks
def test_channel_mask():
    m = make_mask("c2", (6, 8, 8), channels=[0, 2])
    want = np.zeros((6, 8, 8), dtype=np.float32)
    want[[0, 2]] = 1.0
    np.testing.assert_array_equal(m.numpy(), want)
    m_fc = make_mask("fc", (10,), channels=[9])
    np.testing.assert_array_equal(m_fc.numpy(), np.eye(10, dtype=np.float32)[9])


def test_full_mask_is_used_as_given():
    mask = np.random.default_rng(0).uniform(size=(6, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(make_mask("c2", (6, 8, 8), mask).numpy(), mask)
    fc = (np.arange(10) % 2).astype(np.float32)
    np.testing.assert_array_equal(make_mask("fc", (10,), fc).numpy(), fc)
    assert make_mask("c2", (6, 8, 8)) is None  # no mask: every unit


def test_2d_mask_is_tiled_over_channels():
    mask = (np.random.default_rng(1).uniform(size=(8, 8)) > 0.5).astype(np.float32)
    m = make_mask("c2", (6, 8, 8), mask).numpy()
    np.testing.assert_array_equal(m, np.broadcast_to(mask, (6, 8, 8)))


def test_smaller_2d_mask_is_centre_aligned_with_ones_around():
    mask = np.random.default_rng(2).uniform(size=(4, 6)).astype(np.float32)
    m = make_mask("c1", (4, 16, 16), mask).numpy()
    want = np.ones((16, 16), dtype=np.float32)
    want[6:10, 5:11] = mask  # offsets (16 - 4) / 2 and (16 - 6) / 2
    np.testing.assert_array_equal(m, np.broadcast_to(want, (4, 16, 16)))


def test_larger_2d_mask_is_centre_cropped():
    mask = np.random.default_rng(3).uniform(size=(12, 20)).astype(np.float32)
    m = make_mask("c2", (6, 8, 8), mask).numpy()
    np.testing.assert_array_equal(m, np.broadcast_to(mask[2:10, 6:14], (6, 8, 8)))


def test_masks_and_channels_enter_the_loss():
    t = tiny_targets()
    w = inverse_norm_weights(t)
    spatial = (np.random.default_rng(4).uniform(size=(16, 16)) > 0.3).astype(np.float32)
    fc_mask = np.random.default_rng(5).uniform(size=10).astype(np.float32)
    _, loss = _gd(t, initial_image=rgb_image(2), mask={"c1": spatial, "fc": fc_mask},
                  channel={"c2": [1, 4]})
    ch = np.zeros((6, 8, 8), dtype=np.float32)
    ch[[1, 4]] = 1.0
    masks = {"c1": np.broadcast_to(spatial, (4, 16, 16)), "c2": ch, "fc": fc_mask}
    assert loss[0] == pytest.approx(_first_loss(t, w, masks), rel=1e-5)


# --------------------------------------------------------------------------- layer weights
def test_inverse_norm_weights_per_image():
    rng = np.random.default_rng(0)
    targets = {"a": rng.normal(size=(2, 3, 4, 4)) * np.array([1.0, 5.0])[:, None, None, None],
               "b": rng.normal(size=(2, 7)) * np.array([3.0, 0.1])[:, None]}
    w = layer_weights({k: torch.from_numpy(v) for k, v in targets.items()}, "inverse_norm")
    for i in range(2):
        want = inverse_norm_weights({k: v[i] for k, v in targets.items()})
        for k in targets:
            assert float(w[k][i]) == pytest.approx(want[k], rel=1e-6)
    assert sum(float(w[k][0]) for k in targets) == pytest.approx(1.0)
    assert not torch.allclose(w["a"][0], w["a"][1])  # per image


def test_uniform_and_explicit_weights():
    t = {n: torch.from_numpy(v)[None].repeat(2, *([1] * v.ndim)) for n, v in tiny_targets().items()}
    w = layer_weights(t, "uniform")
    assert all(torch.equal(w[n], torch.full((2,), 1 / 3)) for n in LAYERS)
    w = layer_weights(t, {"c1": 0.5, "c2": 2.0, "fc": 0.0})
    assert [w[n].tolist() for n in LAYERS] == [[0.5, 0.5], [2.0, 2.0], [0.0, 0.0]]


@pytest.mark.parametrize("mode", ["uniform", "explicit"])
def test_layer_weights_enter_the_loss(mode):
    t = tiny_targets()
    if mode == "uniform":
        given, w = "uniform", {n: 1 / 3 for n in LAYERS}
    else:
        given = w = {"c1": 1e-3, "c2": 0.5, "fc": 2.0}
    _, loss = _gd(t, initial_image=rgb_image(2), layer_weight=given)
    assert loss[0] == pytest.approx(_first_loss(t, w), rel=1e-5)


# --------------------------------------------------------------------------- loss types
def _np_loss(kind, f, t, m):
    """Reference formulas per image, float64."""
    if m is not None:
        f_m, t_m = f * m, t * m
    else:
        f_m, t_m = f, t
    if kind == "l2":
        return float(((f_m - t_m) ** 2).sum())
    if kind == "l1":
        return float(np.abs(f_m - t_m).sum())
    if kind == "inner":
        return float(-(f * t * (1 if m is None else m)).sum())
    n, mm = f.shape[0], f.shape[1] * f.shape[2]
    F, F0 = f_m.reshape(n, mm), t_m.reshape(n, mm)
    return float(((F @ F.T - F0 @ F0.T) ** 2).sum() / (4.0 * n * n * mm * mm))


@pytest.mark.parametrize("kind", ["l2", "l1", "inner", "gram"])
@pytest.mark.parametrize("masked", [False, True])
def test_loss_types_compute_the_reference_formulas(kind, masked):
    rng = np.random.default_rng(0)
    f, t = rng.normal(size=(2, 5, 3, 4)), rng.normal(size=(2, 5, 3, 4))
    m = (rng.uniform(size=(5, 3, 4)) > 0.4).astype(np.float64) if masked else None
    got = LOSSES[kind](torch.from_numpy(f), torch.from_numpy(t),
                       None if m is None else torch.from_numpy(m))
    assert got.shape == (2,)
    for i in range(2):
        assert float(got[i]) == pytest.approx(_np_loss(kind, f[i], t[i], m), rel=1e-10)


@pytest.mark.parametrize("kind", ["l2", "l1", "inner"])
def test_fc_losses(kind):
    rng = np.random.default_rng(1)
    f, t = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    got = LOSSES[kind](torch.from_numpy(f), torch.from_numpy(t), None)
    want = [_np_loss(kind, f[i], t[i], None) for i in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_gram_on_fc_layers_is_refused():
    with pytest.raises(ConfigError, match="gram"):
        LOSSES["gram"](torch.zeros(1, 7), torch.zeros(1, 7), None)


@pytest.mark.parametrize("kind", ["l1", "inner", "gram"])
def test_loss_type_enters_the_run(kind):
    t = tiny_targets(layers=("c1", "c2"))
    _, loss = _gd(t, initial_image=rgb_image(2), loss_type=kind, iter_n=2)
    net = double_copy(tiny_net())
    with torch.no_grad():
        feats = sequential_features(net, torch.from_numpy(rgb_to_caffe(rgb_image(2)))[None],
                                    {"c1": 0, "c2": 3})
    w = inverse_norm_weights(t)
    want = sum(w[n] * _np_loss(kind, feats[n][0].numpy(), t[n].astype(np.float64), None)
               for n in t)
    assert loss[0] == pytest.approx(want, rel=1e-5)
    assert np.isfinite(loss).all()


def test_feature_shapes_are_those_of_the_forward_pass():
    enc = tiny_encoder()
    assert enc.feature_shapes(enc.forward_order(list(LAYERS))) == TINY_SHAPES
    # the probed shapes (per image, no batch axis) are what a forward pass returns, for a
    # subset of layers asked in any order too
    enc.set_layers(list(LAYERS))
    with torch.no_grad():
        feats = enc(torch.from_numpy(rgb_to_caffe(rgb_image(0))).float()[None])
    assert {n: tuple(f.shape[1:]) for n, f in feats.items()} == TINY_SHAPES
    assert enc.feature_shapes(["fc", "c1"]) == {"fc": TINY_SHAPES["fc"], "c1": TINY_SHAPES["c1"]}


# --------------------------------------------------------------------------- defaults
def _defaults(fn):
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_icnn_gd_defaults_are_the_reference_ones():
    d = _defaults(icnn_gd.reconstruct_image)
    assert d["iter_n"] == 200
    assert (d["lr_start"], d["lr_end"]) == (2.0, 1e-10)
    assert (d["momentum_start"], d["momentum_end"]) == (0.9, 0.9)
    assert (d["decay_start"], d["decay_end"]) == (0.2, 1e-10)
    assert d["grad_normalize"] is True
    assert d["image_blur"] is True and (d["sigma_start"], d["sigma_end"]) == (2.0, 0.5)
    assert d["image_jitter"] is False and d["jitter_size"] == 32
    assert d["use_p_norm_reg"] is False and d["p"] == 3
    assert (d["lamda_start"], d["lamda_end"]) == (0.5, 0.5)
    assert d["use_TV_norm_reg"] is False
    assert (d["clip_extreme"], d["clip_small_norm"], d["clip_small_contribution"]) == \
        (False, False, False)
    assert (d["clip_extreme_every"], d["clip_small_norm_every"],
            d["clip_small_contribution_every"]) == (4, 4, 4)
    assert (d["e_pct_start"], d["n_pct_start"], d["c_pct_start"]) == (1, 5, 5)
    assert d["initial_image"] == "uniform" and d["loss_type"] == "l2"
    assert d["layer_weight"] is None  # inverse-norm weights, as every demo


def test_icnn_dgn_gd_defaults_are_the_reference_ones():
    d = _defaults(icnn_dgn_gd.reconstruct_image)
    assert d["iter_n"] == 200
    assert (d["lr_start"], d["lr_end"]) == (2.0, 1e-10)
    assert (d["momentum_start"], d["momentum_end"]) == (0.9, 0.9)
    assert (d["decay_start"], d["decay_end"]) == (0.01, 0.01)
    assert (d["feat_lower_bound"], d["feat_upper_bound"]) == (0.0, 100.0)
    assert d["initial_gen_feat"] == "normal"


@pytest.mark.parametrize("method", [icnn_lbfgs, icnn_dgn_lbfgs])
def test_lbfgs_defaults_are_scipys(method):
    d = _defaults(method.reconstruct_image)
    assert d["maxiter"] == 500 and d["m"] == 10 and d["maxls"] == 20
    assert d["ftol"] == pytest.approx(2.220446049250313e-09) and d["gtol"] == 1e-5
    if method is icnn_dgn_lbfgs:
        assert (d["feat_lower_bound"], d["feat_upper_bound"]) == (0.0, 100.0)


def test_default_initial_image_is_seeded_uniform_integer_noise():
    frozen = dict(lr_start=0.0, lr_end=0.0, decay_start=0.0, decay_end=0.0, image_blur=False,
                  iter_n=1)  # the returned image is the initial image
    a, _ = _gd(tiny_targets(), seed=0, **frozen)
    b, _ = _gd(tiny_targets(), seed=0, **frozen)
    c, _ = _gd(tiny_targets(), seed=1, **frozen)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(a, np.round(a), atol=1e-4)  # integers 0..255 in RGB
    assert a.min() >= 0 and a.max() <= 255 and a.std() > 50
