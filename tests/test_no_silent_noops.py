"""No silent no-ops (#14): the demo's random networks have small non-zero biases, so a
constant start (mean-colour image, zero code) no longer gives an exactly zero gradient;
every reconstruction says why its optimiser stopped; a loss that did not fall is warned
about; demo files are keyed by the random network's parameters."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch
from pipeline_helpers import tiny_encoder, tiny_job
from torch import nn

from icnn_pl import icnn_dgn_lbfgs, icnn_lbfgs
from icnn_pl.data.demo import Demo
from icnn_pl.engine.lbfgsb import ScipyLBFGSB
from icnn_pl.nets import build_encoder, build_generator, fingerprint
from icnn_pl.pipeline.job import run_job
from icnn_pl.pipeline.outputs import ReconOutputs

SIZE = 32  # VGG19 at 32x32: conv5 is 2x2, fc layers as usual
DEEP = ["conv3_1", "conv4_1", "conv5_1", "fc7"]


@pytest.fixture(scope="module")
def nets():
    return build_encoder("vgg19", input_size=(SIZE, SIZE)), build_generator("relu7")


def _targets(encoder) -> dict[str, np.ndarray]:
    img = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    from icnn_pl.image import to_caffe

    encoder.set_layers(encoder.forward_order(DEEP))
    with torch.no_grad():
        return {k: v[0].numpy() for k, v in encoder(to_caffe(img, encoder.mean_bgr)).items()}


def test_random_networks_have_small_nonzero_biases(nets):
    for net in (nets[0].net, nets[1]):
        biases = [m.bias for m in net.modules()
                  if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)]
        assert biases and all(bool((b != 0).any()) for b in biases)
        assert max(float(b.abs().max()) for b in biases) < 0.1


def test_lbfgs_from_a_constant_start_moves(nets):
    """The two cases of the issue: each stopped after 1 evaluation with zero biases."""
    encoder, gen = nets
    feats = _targets(encoder)
    _, hist = icnn_lbfgs.reconstruct_image(feats, encoder, initial_image="mean", maxiter=4)
    assert len(hist) > 2 and hist[-1] < 0.9 * hist[0]
    _, hist = icnn_dgn_lbfgs.reconstruct_image(feats, encoder, gen, initial_gen_feat="zeros",
                                               feat_upper_bound=100.0, maxiter=4)
    assert len(hist) > 2 and hist[-1] < 0.9 * hist[0]


def test_fingerprint_follows_the_parameters(tmp_path):
    enc = tiny_encoder(0)
    before = fingerprint(enc.net)
    assert fingerprint(tiny_encoder(0).net) == before
    demo_dir = Demo(tmp_path, enc, f"tiny|random-seed0-{before}").dir
    with torch.no_grad():
        enc.net[0].bias.add_(0.01)  # e.g. a new initialisation
    after = fingerprint(enc.net)
    assert after != before
    assert Demo(tmp_path, enc, f"tiny|random-seed0-{after}").dir != demo_dir


def _job(encoder, run_dir, optimizer, n_iter):
    return tiny_job(encoder, run_dir, labels=("img_a", "img_b"), layers=("c1", "c2"),
                    optimizer=optimizer, n_iter=n_iter, method="tiny", feature_fit=False)


def test_stop_reason_in_results_and_mat(tmp_path):
    enc = tiny_encoder(0)
    gd = run_job(_job(enc, tmp_path / "gd",
                      functools.partial(torch.optim.SGD, lr=1.0, momentum=0.9), 3))
    assert {r["stop_reason"] for r in gd.rows} == {"iteration budget (3 iterations)"}
    lb = run_job(_job(enc, tmp_path / "lbfgs", functools.partial(ScipyLBFGSB, maxiter=2), 2))
    for r in lb.rows:
        assert r["stop_reason"] == "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"
        mat = ReconOutputs(tmp_path / "lbfgs", "sub-01", "VC").read(r["label"])
        assert str(np.ravel(mat["stop_reason"])[0]) == r["stop_reason"]
        assert r["loss_fell"] is True
    csv = (tmp_path / "lbfgs" / "results.csv").read_text()
    assert "stop_reason" in csv.splitlines()[0] and "REACHED LIMIT" in csv


def test_a_loss_that_did_not_fall_is_warned_about(tmp_path, caplog, capsys):
    """lr 0: the image never moves; the log and the printed summary say so."""
    enc = tiny_encoder(0)
    with caplog.at_level(logging.WARNING):
        summary = run_job(_job(enc, tmp_path, functools.partial(torch.optim.SGD, lr=0.0), 3))
    assert [r["loss_fell"] for r in summary.rows] == [False, False]
    assert "img_a: the loss did not fall" in caplog.text
    out = capsys.readouterr().out
    assert "WARNING: the loss did not fall for 2 image(s)" in out
    assert "img_a (iteration budget (3 iterations))" in out


# -- the functional API warns too (#21 item 10) ---------------------------------------------
def _own_features(encoder, layers=("c1", "c2")):
    """Features of an image and the image: started from it, the loss is 0 and cannot fall."""
    from icnn_pl.image import to_caffe

    img = np.random.default_rng(5).uniform(0, 255, (*encoder.input_size, 3)).astype(np.float32)
    encoder.set_layers(encoder.forward_order(list(layers)))
    with torch.no_grad():
        feats = encoder(to_caffe(img, encoder.mean_bgr))
    return {k: v[0].numpy() for k, v in feats.items()}, img


def test_functional_api_warns_once_per_call_when_the_loss_did_not_fall():
    from icnn_pl import icnn_gd
    from icnn_pl.engine.flat_loss import LossDidNotFallWarning

    enc = tiny_encoder(0)
    feats, img = _own_features(enc)
    with pytest.warns(LossDidNotFallWarning) as got:
        out, hist = icnn_lbfgs.reconstruct_image(feats, enc, initial_image=img, maxiter=5)
    assert isinstance(out, np.ndarray) and isinstance(hist, np.ndarray)  # (image, loss_list)
    flat = [w for w in got if issubclass(w.category, LossDidNotFallWarning)]
    assert len(flat) == 1
    assert "CONVERGENCE" in str(flat[0].message) and "1 evaluation" in str(flat[0].message)
    assert flat[0].filename == __file__  # points at the user's call
    with pytest.warns(LossDidNotFallWarning, match="iteration budget"):
        icnn_gd.reconstruct_image(feats, enc, initial_image=img, iter_n=3, lr_start=0.0,
                                  lr_end=0.0, image_blur=False)


def test_functional_api_is_quiet_when_the_loss_fell():
    import warnings

    enc = tiny_encoder(0)
    feats, _ = _own_features(enc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, hist = icnn_lbfgs.reconstruct_image(feats, enc, initial_image="uniform", maxiter=3)
    assert hist[-1] < hist[0]
