"""``.caffemodel`` files: written by ``tests/caffe_writer.py`` (an encoder independent of the
reader), read by ``icnn_pl.nets.caffemodel``; the loaded networks must compute exactly what
the same arrays compute when loaded as a state dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from caffe_writer import net, vgg_layers, write, write_generator
from custom_nets import MiniVGG
from torch import nn

from icnn_pl.errors import WeightsError
from icnn_pl.nets import build_encoder, build_generator, build_network
from icnn_pl.nets.caffemodel import caffe_layer_map, caffe_state_dict, read_layers
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.nets.vgg import VGG19_LAYERS
from icnn_pl.nets.weights import load_weights, main, read_state_dict


def _features(module: nn.Module, size: int = 64) -> dict[str, torch.Tensor]:
    enc = FeatureEncoder(module, VGG19_LAYERS, input_size=(size, size))
    enc.set_layers(list(VGG19_LAYERS))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 50
    return {k: v.clone() for k, v in enc(x).items()}


def _mini_state() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {k: v.numpy().copy() for k, v in MiniVGG().state_dict().items()}


@pytest.mark.parametrize("v1,packed,legacy_shape,double,packed_dims", [
    (True, True, True, False, True),     # VGG_ILSVRC_19_layers.caffemodel's format
    (True, False, True, False, True),    # V1, one field per number
    (False, True, False, False, True),   # current format (the DeePSiM generators)
    (False, False, False, False, False),  # current, unpacked data and dims
    (False, True, True, False, True),    # current format with the legacy 4-D shape
    (True, True, False, True, True),     # V1 with BlobShape and double_data
])
def test_formats_give_the_same_features(tmp_path, v1, packed, legacy_shape, double, packed_dims):
    state = _mini_state()
    path = tmp_path / "mini.caffemodel"
    write(path, net(vgg_layers(state, VGG19_LAYERS), v1=v1, packed=packed,
                    legacy_shape=legacy_shape, double=double, packed_dims=packed_dims))
    reference = MiniVGG()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    loaded = MiniVGG()
    load_weights(loaded, path, "mini", VGG19_LAYERS)
    want, got = _features(reference), _features(loaded)
    assert list(got) == list(VGG19_LAYERS)
    for name in VGG19_LAYERS:  # layer by layer, bit for bit
        assert torch.equal(got[name], want[name]), name
    legacy_fc = next(b for layer in read_layers(path) if layer.name == "fc6" for b in layer.blobs)
    assert legacy_fc.shape == ((1, 1, 16, 32) if legacy_shape else (16, 32))


@pytest.mark.slow
def test_vgg19_caffemodel_through_build_encoder(tmp_path):
    """The full VGG19 (V1, as the lab's file): every layer equals the state-dict network."""
    torch.manual_seed(0)
    reference = build_network("vgg19", seed=3)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    path = tmp_path / "VGG_ILSVRC_19_layers.caffemodel"
    write(path, net(vgg_layers(state, VGG19_LAYERS), v1=True))
    del state
    enc = build_encoder("vgg19", weights=path, input_size=(32, 32))
    ref = FeatureEncoder(reference, VGG19_LAYERS, enc.mean_bgr, (32, 32))
    names = list(VGG19_LAYERS)
    enc.set_layers(names)
    ref.set_layers(names)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 50
    got, want = enc(x), ref(x)
    for name in names:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory):
    """The relu7 generator as the DeePSiM release stores it (current format, packed)."""
    reference = build_generator(seed=5)
    path = tmp_path_factory.mktemp("gen") / "generator.caffemodel"
    write_generator(path, reference)
    return reference, path


def test_generator_caffemodel_gives_the_same_image(generator_file, tmp_path):
    reference, path = generator_file
    z = torch.rand(2, 4096, generator=torch.Generator().manual_seed(0)) * 3
    loaded = build_generator(weights=path)
    assert torch.equal(loaded(z), reference(z))
    # and converted to safetensors by the CLI, loaded again
    dst = tmp_path / "generator.safetensors"
    main([str(path), str(dst), "--arch", "relu7"])
    assert torch.equal(build_generator(weights=dst)(z), reference(z))


def test_read_state_dict_gives_caffe_names_and_file_shapes(tmp_path):
    state = _mini_state()
    path = tmp_path / "mini.caffemodel"
    write(path, net(vgg_layers(state, VGG19_LAYERS), v1=True))
    raw = read_state_dict(path)
    assert len(raw) == 38
    assert raw["fc6.weight"].shape == (1, 1, 16, 32)  # V1 legacy 4-D InnerProduct
    np.testing.assert_array_equal(raw["conv1_1.weight"].numpy(), state["features.0.weight"])


def _mini_file(tmp_path, edit) -> tuple[nn.Module, object]:
    layers = vgg_layers(_mini_state(), VGG19_LAYERS)
    path = tmp_path / "bad.caffemodel"
    write(path, net(edit(layers), v1=True))
    return MiniVGG(), path


def _load_error(module: nn.Module, path) -> str:
    with pytest.raises(WeightsError) as exc:
        caffe_state_dict(path, module.state_dict(), caffe_layer_map(module, VGG19_LAYERS))
    return str(exc.value)


def test_missing_extra_and_misshaped_layers_are_listed(tmp_path):
    module, path = _mini_file(tmp_path, lambda ls: [
        (n, t, [a.T.copy() if (n == "conv1_1" and a.ndim == 4) else a for a in arrs])
        for n, t, arrs in ls if n != "fc8"] + [("fc9", "InnerProduct", [np.zeros((3, 10))])])
    msg = _load_error(module, path)
    assert "missing layers: fc8 (weight (10, 16), bias (10,))" in msg
    assert "extra layers: fc9 [InnerProduct] ((1, 1, 3, 10))" in msg
    assert "conv1_1 weight: file (3, 3, 3, 4) vs model (4, 3, 3, 3)" in msg


def test_truncated_random_and_empty_files_say_so(tmp_path):
    module, path = _mini_file(tmp_path, lambda ls: ls)
    data = path.read_bytes()
    bad = tmp_path / "cut.caffemodel"
    bad.write_bytes(data[: len(data) * 2 // 3])
    assert "is truncated" in _load_error(module, bad)
    noise = tmp_path / "noise.caffemodel"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not a .caffemodel" in _load_error(module, noise)
    text = tmp_path / "deploy.caffemodel"
    text.write_bytes(b'name: "VGG_ILSVRC_19_layers"\nlayers {\n  name: "conv1_1"\n}\n')
    assert "not a .caffemodel" in _load_error(module, text)
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    assert "is empty" in _load_error(module, empty)
    with pytest.raises(WeightsError, match="not found"):
        build_generator(weights=tmp_path / "absent.caffemodel")
