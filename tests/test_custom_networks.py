"""Networks users bring: bdpy's bracketed layer maps, any torch module from the config
(``network=custom``), taps on modules that return tuples, torchvision-style input, and a
residual network that reconstructs without blowing up; through the Python API and
``train_recon.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from caffe_writer import net, vgg_layers, write, write_generator
from custom_nets import BDPY_VGG19_MAP, FailingNet, MiniVGG
from hydra import compose, initialize_config_dir
from pipeline_helpers import CONF, output_of, run_many, with_defaults

from icnn_pl import icnn_gd
from icnn_pl.data.demo import load_stimulus
from icnn_pl.errors import ConfigError
from icnn_pl.image import to_caffe
from icnn_pl.nets import build_encoder, build_generator
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.nets.examples import TinyResNet, TinyViT
from icnn_pl.nets.input_space import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from icnn_pl.nets.vgg import VGG19_LAYERS
from icnn_pl.pipeline import factory

RESNET_MAP = {"stem": "stem.0", "block1": "layer1", "block2": "layer2", "block3": "layer3",
              "fc": "fc"}
VIT_MAP = {"embed": "patch_embed", "attn": "blocks[0].attn", "attn_weights": "blocks[0].attn[1]",
           "block2": "blocks[1]"}


def _image(size: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(load_stimulus("astronaut")).resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def _features(enc: FeatureEncoder, names, size: int) -> dict[str, np.ndarray]:
    enc.set_layers(list(names))
    with torch.no_grad():
        out = enc(to_caffe(_image(size), enc.mean_bgr))
    return {k: v[0].numpy().copy() for k, v in out.items()}


# -- layer maps ----------------------------------------------------------------------------
def test_bdpy_bracketed_map_equals_the_dotted_one():
    torch.manual_seed(0)
    module = MiniVGG()
    dotted = FeatureEncoder(module, VGG19_LAYERS, input_size=(32, 32))
    bracketed = FeatureEncoder(module, BDPY_VGG19_MAP, input_size=(32, 32))
    assert bracketed.module_path("fc8") == "classifier.6"
    a, b = _features(dotted, VGG19_LAYERS, 32), _features(bracketed, VGG19_LAYERS, 32)
    assert all(np.array_equal(a[k], b[k]) for k in VGG19_LAYERS)
    # through the Python API: the same reconstruction with either map
    feats = {k: a[k] for k in ("conv1_1", "conv2_1", "fc6")}
    img_a, _ = icnn_gd.reconstruct_image(feats, module, layer_mapping=VGG19_LAYERS,
                                         input_size=(32, 32), iter_n=3)
    img_b, _ = icnn_gd.reconstruct_image(feats, module, layer_mapping=BDPY_VGG19_MAP,
                                         input_size=(32, 32), iter_n=3)
    np.testing.assert_array_equal(img_a, img_b)


def test_bdpys_own_layer_map_works():
    """bdpy's ``layer_map('vgg19')`` as is (bracketed paths, and relu6/relu7 taps)."""
    models = pytest.importorskip("bdpy.dl.torch.models")
    bdpy_map = models.layer_map("vgg19")
    torch.manual_seed(0)
    module = MiniVGG()
    enc = FeatureEncoder(module, bdpy_map, input_size=(32, 32))
    feats = _features(enc, bdpy_map, 32)
    ref = _features(FeatureEncoder(module, VGG19_LAYERS, input_size=(32, 32)), VGG19_LAYERS, 32)
    assert all(np.array_equal(feats[k], ref[k]) for k in VGG19_LAYERS)
    np.testing.assert_array_equal(feats["relu7"], np.maximum(ref["fc7"], 0))
    targets = {k: feats[k] for k in ("conv1_1", "conv3_1", "relu7")}
    _, loss = icnn_gd.reconstruct_image(targets, module, layer_mapping=bdpy_map,
                                        input_size=(32, 32), iter_n=4)
    assert loss[-1] < loss[0]


def test_unknown_module_path_is_named_not_blamed_on_the_input_size():
    enc = FeatureEncoder(MiniVGG(), {"conv9": "features[99]"}, input_size=(32, 32))
    with pytest.raises(ConfigError, match=r"no module 'features\[99\]'") as exc:
        enc.set_layers(["conv9"])
    assert "input" not in str(exc.value)


def test_probe_failure_names_the_module_and_the_original_error():
    enc = FeatureEncoder(FailingNet(), {"conv": "conv", "out": "body"}, input_size=(16, 16))
    with pytest.raises(ConfigError) as exc:
        enc.set_layers(["out"])
    msg = str(exc.value)
    assert "module 'body.1' (_Explodes)" in msg
    assert "TypeError: unsupported operand for the custom block" in msg
    assert "input_size" not in msg
    # a real size problem is still blamed on the input size, with the module that failed
    small = FeatureEncoder(MiniVGG(), VGG19_LAYERS, input_size=(8, 8))
    with pytest.raises(ConfigError, match=r"does not run on a 8x8 input in module 'features"):
        small.set_layers(["fc8"])


# -- tuples and input spaces ---------------------------------------------------------------
def test_tuple_outputs_give_their_first_tensor_or_the_named_element():
    torch.manual_seed(0)
    vit = TinyViT()
    seen = []
    vit.blocks[0].attn.register_forward_hook(lambda _m, _i, out: seen.append(out))
    enc = FeatureEncoder(vit, VIT_MAP, input_size=(32, 32), input_space="rgb_imagenet")
    feats = _features(enc, VIT_MAP, 32)
    out, weights = seen[-1]
    np.testing.assert_array_equal(feats["attn"], out[0].numpy())
    np.testing.assert_array_equal(feats["attn_weights"], weights[0].numpy())
    assert feats["attn_weights"].shape == (17, 17)  # 16 patches + class token
    targets = {k: feats[k] for k in ("attn", "block2")}
    _, loss = icnn_gd.reconstruct_image(targets, enc, iter_n=8)
    assert loss[-1] < loss[0]


def test_rgb_imagenet_input_is_converted_in_the_encoder():
    torch.manual_seed(0)
    module = TinyResNet(width=4)
    enc = FeatureEncoder(module, {"fc": "fc"}, mean_bgr=(100.0, 110.0, 120.0),
                         input_size=(16, 16), input_space="rgb_imagenet")
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    enc.set_layers(["fc"])
    with torch.no_grad():
        got = enc(to_caffe(rgb, enc.mean_bgr))["fc"]
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        x = (x - torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1)) / torch.tensor(
            IMAGENET_STD_RGB).view(1, 3, 1, 1)
        want = module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _reconstruct(module: torch.nn.Module, mapping, input_space: str):
    """icnn_gd, 60 iterations at 32x32 from the module's own features of one photograph:
    (loss / first loss, largest rise above the running minimum after iteration 10, pixel r)."""
    torch.manual_seed(0)
    enc = build_encoder(module, layer_mapping=mapping, input_size=(32, 32),
                        input_space=input_space)
    img, loss = icnn_gd.reconstruct_image(_features(enc, mapping, 32), enc, iter_n=60)
    rise = float(np.max(loss[10:] / np.minimum.accumulate(loss)[10:]))
    return loss[-1] / loss[0], rise, np.corrcoef(img.ravel(), _image(32).ravel())[0, 1]


def test_residual_network_reconstructs_as_well_as_vgg():
    """DeepImageReconstruction issue 12: a ResNet's loss blew up after ~35 iterations.
    Here a residual network's loss falls steadily (small wiggles from the blur step, as with
    VGG; a blow-up would multiply it) and its image matches the target as well as a VGG19
    tree's does. Measured here: ResNet 0.41 / 1.04 / r 0.65, MiniVGG 0.29 / 1.08 / r 0.47."""
    torch.manual_seed(0)
    res = _reconstruct(TinyResNet(width=8), RESNET_MAP, "rgb_imagenet")
    torch.manual_seed(0)
    vgg = _reconstruct(MiniVGG(), VGG19_LAYERS, "caffe_bgr")
    assert res[0] < 0.5 and vgg[0] < 0.5
    assert res[1] < 1.2, "the residual network's loss rose well above its minimum"
    assert res[2] > 0.4 and res[2] >= vgg[2] - 0.05


def test_custom_module_with_caffemodel_weights_and_bdpy_map(tmp_path):
    """build_encoder(module, weights=.caffemodel, layer_mapping=bdpy map): Caffe layers are
    matched by the mapping's feature names."""
    torch.manual_seed(1)
    reference = MiniVGG()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    path = tmp_path / "mini.caffemodel"
    write(path, net(vgg_layers(state, VGG19_LAYERS), v1=True))
    enc = build_encoder(MiniVGG(), weights=path, layer_mapping=BDPY_VGG19_MAP,
                        input_size=(32, 32))
    ref = FeatureEncoder(reference, VGG19_LAYERS, enc.mean_bgr, input_size=(32, 32))
    a, b = _features(enc, VGG19_LAYERS, 32), _features(ref, VGG19_LAYERS, 32)
    assert all(np.array_equal(a[k], b[k]) for k in VGG19_LAYERS)


# -- the config ----------------------------------------------------------------------------
CUSTOM = ["network=custom", "layers=mapped",
          "network.module={_target_:icnn_pl.nets.examples.TinyResNet,width:8}",
          "network.layer_mapping={stem:stem.0,block1:layer1,block2:layer2,block3:layer3,fc:fc}"]


@pytest.mark.parametrize("overrides, match", [
    (["network.module={_target_:no_such_package.Net}"],
     r"network\.module\._target_='no_such_package\.Net' cannot be imported"),
    (["network.module={_target_:icnn_pl.nets.examples.NoSuchNet}"], r"NoSuchNet' cannot be"),
    (["network.module={width:8}"], r"network\.module must name the network's factory"),
    (["network.layer_mapping={}"], r"network\.layer_mapping=\{\} must map feature names"),
    (["network.input_space=rgb"], r"network\.input_space='rgb' is not valid"),
    # a VGG19 layer name where the custom network has no such tap
    (["layers.names=[conv1_1,block1]"],
     r"layers\.names: \['conv1_1'.* not in network\.layer_mapping"),
    (["layers=shallow"], r"layers=shallow: network custom has no layer preset 'shallow'"),
])
def test_config_checks_for_custom_networks(overrides, match):
    factory.register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=with_defaults(CUSTOM, overrides))
    with pytest.raises(ConfigError, match=match):
        factory.check_config(cfg)


def test_missing_layer_mapping_is_asked_for():
    factory.register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*CUSTOM[:3], "layers.names=[fc]"])
    with pytest.raises(ConfigError, match=r"network\.layer_mapping=None must map"):
        factory.check_config(cfg)


@pytest.mark.slow
def test_train_recon_with_custom_network_and_caffemodel_generator(tmp_path):
    """train_recon.py: a residual network from the config with the relu7 generator read
    from a .caffemodel (DGN method), and the clear one-line error of a bad module."""
    gen_file = tmp_path / "generator.caffemodel"
    write_generator(gen_file, build_generator(seed=2))
    common = [*CUSTOM, "network.input_size=[32,32]", "progress=false",
              "trainer=cpu", "logger=none", f"data.root={tmp_path / 'demo'}", "data.limit=1"]
    results = run_many([
        [*common, "method=icnn_dgn_gd", "method.n_iter=1", f"generator.weights={gen_file}",
         f"hydra.run.dir={tmp_path / 'dgn'}"],
        # bdpy-style bracketed paths from the command line (quoted for Hydra)
        [*common, "method=icnn_gd", "method.n_iter=2", f"hydra.run.dir={tmp_path / 'gd'}",
         "network.layer_mapping={stem:'stem[0]',block1:layer1,block2:layer2,block3:layer3,"
         "fc:fc}"],
        [*common, "network.module={_target_:my_lab.nets.ResNet18}",
         f"hydra.run.dir={tmp_path / 'bad'}"],
    ])
    dgn, gd, bad = results
    for ok in (dgn, gd):
        assert ok["code"] == 0, output_of(ok)[-3000:]
        assert "1 images (0 failed)" in output_of(ok)
    log = (tmp_path / "dgn" / "train_recon.log").read_text()
    assert f"loaded relu7 weights from {gen_file}" in log
    assert bad["code"] == 2
    assert "network.module._target_='my_lab.nets.ResNet18' cannot be imported" in output_of(bad)
    assert "Traceback" not in output_of(bad)
    for run in ("dgn", "gd"):
        assert list((tmp_path / run).rglob("*.png")), f"no images written by the {run} run"
