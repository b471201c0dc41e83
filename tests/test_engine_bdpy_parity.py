"""Parity with the peer implementation, ``bdpy.recon.torch.icnn.reconstruct`` (bdpy 0.26),
for the two gradient-descent methods, on the same tiny network, targets, initial image /
code, layer weights and options."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from engine_helpers import (
    LAYERS,
    MEAN_BGR,
    PAD,
    SIZE,
    TinyGenerator,
    caffe_to_rgb,
    generator_targets,
    inverse_norm_weights,
    rgb_image,
    rgb_to_caffe,
    tiny_named_net,
    tiny_targets,
)

from icnn_pl import icnn_dgn_gd, icnn_gd
from icnn_pl.nets import FeatureEncoder

bdpy_icnn = pytest.importorskip("bdpy.recon.torch.icnn")

N_ITER = 8
NAMED_MAPPING = {n: n for n in LAYERS}  # bdpy eval()s "encoder.<path>": needs identifiers


def _bdpy_features(targets):
    # bdpy pairs targets with hook call order: give them in forward order, with batch axis
    return {n: targets[n][None].astype(np.float32) for n in LAYERS}


def _ours_encoder():
    return FeatureEncoder(tiny_named_net(), NAMED_MAPPING, mean_bgr=MEAN_BGR, input_size=SIZE)


@pytest.mark.parametrize("our_weights", ["explicit", "default"])
def test_icnn_gd_matches_bdpy(tmp_path, our_weights):
    targets = tiny_targets(seed=1)
    init = rgb_image(seed=2)
    w = inverse_norm_weights(targets)
    x_bdpy, loss_bdpy = bdpy_icnn.reconstruct(
        _bdpy_features(targets), tiny_named_net(), layer_mapping=NAMED_MAPPING, n_iter=N_ITER,
        lr=(2.0, 1e-10), momentum=(0.9, 0.9), decay=(0.2, 1e-10), blurring=True,
        sigma=(2.0, 0.5), layer_weights=w, image_size=(*SIZE, 3),
        initial_image=rgb_to_caffe(init, MEAN_BGR).astype(np.float32), preproc=None,
        postproc=None, save_snapshot=False, output_dir=str(tmp_path), disp_interval=10**6,
        return_loss=True)
    img, losses = icnn_gd.reconstruct_image(
        targets, _ours_encoder(), initial_image=init, iter_n=N_ITER,
        layer_weight=w if our_weights == "explicit" else None)
    np.testing.assert_allclose(losses, loss_bdpy, rtol=1e-4)
    np.testing.assert_allclose(img, caffe_to_rgb(x_bdpy, MEAN_BGR), rtol=1e-4, atol=1e-2)


def test_icnn_dgn_gd_matches_bdpy(tmp_path):
    gen = TinyGenerator(dim=8, seed=3)
    rng = np.random.default_rng(4)
    targets = generator_targets(gen, rng.uniform(0, 3, 8))
    z0 = rng.uniform(-0.5, 3.0, 8).astype(np.float32)
    upper = rng.uniform(1.0, 2.5, 8).astype(np.float32)
    w = inverse_norm_weights(targets)
    x_bdpy, loss_bdpy, z_bdpy = bdpy_icnn.reconstruct(
        _bdpy_features(targets), tiny_named_net(), layer_mapping=NAMED_MAPPING,
        generator=copy.deepcopy(gen), n_iter=N_ITER, lr=(2.0, 1e-10), momentum=(0.9, 0.9),
        decay=(0.01, 0.01), layer_weights=w, image_size=(*SIZE, 3),
        crop_generator_output=True, initial_feature=z0.copy(), feature_size=(8,),
        feature_upper_bound=upper, feature_lower_bound=0.0, save_snapshot=False,
        output_dir=str(tmp_path), disp_interval=10**6, return_loss=True, return_z=True)
    img, losses, code = icnn_dgn_gd.reconstruct_image(
        targets, _ours_encoder(), copy.deepcopy(gen), initial_gen_feat=z0,
        feat_lower_bound=0.0, feat_upper_bound=upper, iter_n=N_ITER, layer_weight=w,
        return_gen_feat=True)
    np.testing.assert_allclose(losses, loss_bdpy, rtol=1e-4)
    np.testing.assert_allclose(img, caffe_to_rgb(x_bdpy, MEAN_BGR), rtol=1e-4, atol=1e-2)
    # our code is the one that drew the returned image (the last forward pass) ...
    np.testing.assert_allclose(caffe_to_rgb(_draw(gen, code)), img, atol=1e-3)
    assert (code >= 0).all() and (code <= upper + 1e-6).all()
    if np.allclose(_draw(gen, z_bdpy), x_bdpy, atol=1e-3):
        np.testing.assert_allclose(code, z_bdpy, rtol=1e-4, atol=1e-5)
    else:
        # ... bdpy 0.26 on CPU returns another code: `final_f = ft.cpu().detach().numpy()[0]`
        # aliases the parameter's storage, so the following op.step() overwrites it with the
        # code after the last SGD update (before decay and clipping, outside the bounds).
        assert (z_bdpy < 0).any() or (z_bdpy > upper).any()


def _draw(gen, code):
    with torch.no_grad():
        img = gen(torch.as_tensor(code, dtype=torch.float32)[None])[0]
    return img[:, PAD:PAD + SIZE[0], PAD:PAD + SIZE[1]].numpy()
