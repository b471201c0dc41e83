"""Networks: VGG19 / VGG19-leaky layout, the relu7 generator, and weight files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from icnn_pl.errors import ConfigError, WeightsError
from icnn_pl.nets import ARCHITECTURES, build_encoder, build_generator, build_network, center_crop
from icnn_pl.nets.generator import Relu7Generator
from icnn_pl.nets.vgg import VGG19, VGG19_LAYERS
from icnn_pl.nets.weights import load_weights, main, read_state_dict

# --------------------------------------------------------------------------- reference facts
CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
VGG_KEYS = sorted(
    [f"features.{i}.{p}" for i in CONV_IDX for p in ("weight", "bias")]
    + [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
)
REF_LAYERS = {
    "conv1_1": "features.0", "conv1_2": "features.2", "conv2_1": "features.5",
    "conv2_2": "features.7", "conv3_1": "features.10", "conv3_2": "features.12",
    "conv3_3": "features.14", "conv3_4": "features.16", "conv4_1": "features.19",
    "conv4_2": "features.21", "conv4_3": "features.23", "conv4_4": "features.25",
    "conv5_1": "features.28", "conv5_2": "features.30", "conv5_3": "features.32",
    "conv5_4": "features.34", "fc6": "classifier.0", "fc7": "classifier.3",
    "fc8": "classifier.6",
}
REF_SHAPES = {
    **{f"conv1_{i}": (64, 224, 224) for i in (1, 2)},
    **{f"conv2_{i}": (128, 112, 112) for i in (1, 2)},
    **{f"conv3_{i}": (256, 56, 56) for i in (1, 2, 3, 4)},
    **{f"conv4_{i}": (512, 28, 28) for i in (1, 2, 3, 4)},
    **{f"conv5_{i}": (512, 14, 14) for i in (1, 2, 3, 4)},
    "fc6": (4096,), "fc7": (4096,), "fc8": (1000,),
}
# relu7 generator: name, kind, in, out, kernel, stride, padding, output (C, H, W)
GEN_LAYERS = [
    ("defc7", "fc", 4096, 4096, None, None, None, (4096,)),
    ("defc6", "fc", 4096, 4096, None, None, None, (4096,)),
    ("defc5", "fc", 4096, 4096, None, None, None, (4096,)),
    ("deconv5", "tconv", 256, 256, 4, 2, 1, (256, 8, 8)),
    ("conv5_1", "tconv", 256, 512, 3, 1, 1, (512, 8, 8)),
    ("deconv4", "tconv", 512, 256, 4, 2, 1, (256, 16, 16)),
    ("conv4_1", "tconv", 256, 256, 3, 1, 1, (256, 16, 16)),
    ("deconv3", "tconv", 256, 128, 4, 2, 1, (128, 32, 32)),
    ("conv3_1", "tconv", 128, 128, 3, 1, 1, (128, 32, 32)),
    ("deconv2", "tconv", 128, 64, 4, 2, 1, (64, 64, 64)),
    ("deconv1", "tconv", 64, 32, 4, 2, 1, (32, 128, 128)),
    ("deconv0", "tconv", 32, 3, 4, 2, 1, (3, 256, 256)),
]
# bdpy's AlexNetGenerator also stores the layers in Sequentials
GEN_ALIASES = {"defc.0": "defc7", "defc.2": "defc6", "defc.4": "defc5"} | {
    f"deconv.{2 * i}": name for i, name in enumerate(
        ["deconv5", "conv5_1", "deconv4", "conv4_1", "deconv3", "conv3_1", "deconv2",
         "deconv1", "deconv0"])
}


def _meta(make):
    with torch.device("meta"):
        return make()


def _cheap_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Distinct random tensors of the given shapes whose storage is one row (expanded), so
    full-size weight files stay a few MB."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        row = torch.randn(shape[0], generator=gen)
        out[k] = row.view(-1, *([1] * (len(shape) - 1))).expand(shape)
    return out


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _assert_loaded(module: nn.Module, state: dict[str, torch.Tensor], rename=None) -> None:
    got = module.state_dict()
    rename = rename or {}
    expected = {rename.get(k, k): v for k, v in state.items()}
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def vgg_meta():
    return _meta(VGG19)


@pytest.fixture(scope="module")
def gen_meta():
    return _meta(Relu7Generator)


@pytest.fixture(scope="module")
def random_generator():
    return build_generator("relu7", seed=0)


# --------------------------------------------------------------------------- VGG19
def test_vgg19_state_dict_keys_equal_torchvision(vgg_meta):
    assert sorted(vgg_meta.state_dict()) == VGG_KEYS
    assert _meta(lambda: VGG19(leaky=True)).state_dict().keys() == vgg_meta.state_dict().keys()


def test_vgg19_layer_names(vgg_meta):
    assert VGG19_LAYERS == REF_LAYERS
    for name, path in REF_LAYERS.items():
        kind = nn.Linear if name.startswith("fc") else nn.Conv2d
        assert isinstance(vgg_meta.get_submodule(path), kind), name
    assert ARCHITECTURES["vgg19"].layers == REF_LAYERS
    assert ARCHITECTURES["vgg19_leaky"].layers == REF_LAYERS


def test_vgg19_layout(vgg_meta):
    convs = [m for m in vgg_meta.features if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg_meta.modules()) == 5
    acts = [m for m in vgg_meta.modules() if isinstance(m, nn.ReLU)]
    assert len(acts) == 18 and not any(m.inplace for m in acts)
    assert [m.out_features for m in vgg_meta.classifier if isinstance(m, nn.Linear)] == \
        [4096, 4096, 1000]


def test_vgg19_leaky_uses_leaky_relu_02_and_average_pooling():
    net = _meta(lambda: VGG19(leaky=True))
    mods = list(net.modules())
    leaky = [m for m in mods if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 18 and all(m.negative_slope == 0.2 for m in leaky)
    assert not any(type(m) is nn.ReLU for m in mods)
    pools = [m for m in mods if isinstance(m, nn.AvgPool2d)]
    assert len(pools) == 5 and all(m.kernel_size == 2 and m.stride == 2 for m in pools)
    assert not any(isinstance(m, nn.MaxPool2d) for m in mods)


@pytest.mark.slow
def test_vgg19_feature_shapes_at_224():
    enc = build_encoder("vgg19")
    assert enc.input_size == (224, 224)
    enc.set_layers(list(REF_SHAPES))
    x = torch.randn(1, 3, 224, 224) * 50
    with torch.no_grad():
        feats = enc(x)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == REF_SHAPES
    assert all(torch.isfinite(v).all() and v.std() > 0 for v in feats.values())
    assert not enc.net.training and not any(p.requires_grad for p in enc.net.parameters())


# --------------------------------------------------------------------------- relu7 generator
def test_relu7_generator_layout(gen_meta):
    children = dict(gen_meta.named_children())
    assert [n for n, m in children.items() if not isinstance(m, nn.LeakyReLU)] == \
        [row[0] for row in GEN_LAYERS]
    for name, kind, c_in, c_out, k, s, p, _ in GEN_LAYERS:
        m = children[name]
        if kind == "fc":
            assert isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (c_in, c_out)
        else:
            assert isinstance(m, nn.ConvTranspose2d), name
            assert (m.in_channels, m.out_channels) == (c_in, c_out), name
            assert m.kernel_size == (k, k) and m.stride == (s, s) and m.padding == (p, p), name
    leaky = [m for m in gen_meta.modules() if isinstance(m, nn.LeakyReLU)]
    assert leaky and all(m.negative_slope == 0.3 for m in leaky)
    assert gen_meta.input_size == 4096


def test_relu7_generator_parameter_count(gen_meta):
    expected = 0
    for _, kind, c_in, c_out, k, _, _, _ in GEN_LAYERS:
        expected += c_in * c_out * (1 if kind == "fc" else k * k) + c_out
    n = sum(p.numel() for p in gen_meta.parameters())
    assert n == expected
    assert 55e6 < n < 57e6


def test_relu7_generator_output_and_intermediate_shapes(random_generator):
    shapes = {}
    handles = [random_generator.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name, *_ in GEN_LAYERS]
    z = torch.relu(torch.randn(2, 4096, generator=torch.Generator().manual_seed(0))) * 2
    try:
        with torch.no_grad():
            img = random_generator(z)
    finally:
        for h in handles:
            h.remove()
    assert img.shape == (2, 3, 256, 256)
    assert shapes == {row[0]: row[7] for row in GEN_LAYERS}
    assert not random_generator.training
    assert not any(p.requires_grad for p in random_generator.parameters())


def test_relu7_random_init_gives_pixel_contrast(random_generator):
    g = torch.Generator().manual_seed(1)
    act_range = torch.from_numpy(np.loadtxt("/work/shared/reference/act_range_3x_fc7.txt")).float()
    codes = {
        "relu": torch.relu(torch.randn(1, 4096, generator=g)) * 2.0,
        "act_range": torch.rand(1, 4096, generator=g) * act_range,
        "relu_other": torch.relu(torch.randn(1, 4096, generator=g)) * 2.0,
    }
    with torch.no_grad():
        imgs = {k: random_generator(z) for k, z in codes.items()}
    for k, img in imgs.items():
        assert 20.0 < float(img.std()) < 200.0, (k, float(img.std()))
        # contrast inside the image, not just between channels or a constant offset
        assert float(img[0, 0].std()) > 5.0, k
    diff = (imgs["relu"] - imgs["relu_other"]).abs().mean()
    assert float(diff) > 5.0


def test_relu7_random_init_is_seeded(random_generator):
    again = build_generator("relu7", seed=0)
    for (k, a), b in zip(random_generator.state_dict().items(), again.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def test_center_crop_256_to_224_at_offset_16():
    x = torch.arange(2 * 3 * 256 * 256, dtype=torch.float32).view(2, 3, 256, 256)
    y = center_crop(x, (224, 224))
    assert torch.equal(y, x[:, :, 16:240, 16:240])
    assert torch.equal(center_crop(x, (227, 227)), x[:, :, 14:241, 14:241])  # AlexNet size
    with pytest.raises(ValueError):
        center_crop(x, (300, 224))


# --------------------------------------------------------------------------- weight files
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_vgg19_torch_files_round_trip(tmp_path, vgg_meta, suffix):
    """bdpy's VGG_ILSVRC_19_layers.pt and torchvision's vgg19-*.pth: plain state dicts."""
    state = _cheap_state(_shapes(vgg_meta), seed=1)
    path = tmp_path / f"vgg19{suffix}"
    torch.save(state, path)
    net = build_network("vgg19", weights=path)
    _assert_loaded(net, state)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.slow
def test_vgg19_safetensors_round_trip(tmp_path, vgg_meta):
    """A full-size .safetensors file (548 MB); our writer is checked by the converter test."""
    from safetensors.torch import save_file

    state = _cheap_state(_shapes(vgg_meta), seed=2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vgg19.safetensors"))
    _assert_loaded(build_network("vgg19_leaky", weights=tmp_path / "vgg19.safetensors"), state)


def test_wrapped_and_data_parallel_files_load(tmp_path, gen_meta):
    state = _cheap_state(_shapes(gen_meta), seed=3)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    assert set(read_state_dict(tmp_path / "ckpt.pth")) == set(state)


@pytest.mark.parametrize("key_sets", ["both", "aliases"])
def test_bdpy_generator_files_load(tmp_path, gen_meta, key_sets):
    state = _cheap_state(_shapes(gen_meta), seed=4)
    to_alias = {v: k for k, v in GEN_ALIASES.items()}
    aliased = {}
    for key, value in state.items():
        layer, leaf = key.rsplit(".", 1)
        aliased[f"{to_alias[layer]}.{leaf}"] = value
    assert len(aliased) == len(state) == 24
    file_state = {**state, **aliased} if key_sets == "both" else aliased
    torch.save(file_state, tmp_path / "generator.pt")
    gen = build_network("relu7", weights=tmp_path / "generator.pt")
    _assert_loaded(gen, state)


@pytest.mark.parametrize("arch", ["vgg19", "relu7"])
def test_state_dict_of_bdpy_model_loads(tmp_path, arch):
    """The file bdpy writes, ``torch.save(model.state_dict())``, with the key set of bdpy's
    own classes (its generator lists each layer twice, both names on one tensor)."""
    from bdpy.dl.torch import models

    with torch.device("meta"):
        bdpy_net = models.VGG19() if arch == "vgg19" else models.AlexNetGenerator(device="meta")
    keys = list(bdpy_net.state_dict())
    canonical = {k: f"{GEN_ALIASES.get(k.rsplit('.', 1)[0], k.rsplit('.', 1)[0])}."
                    f"{k.rsplit('.', 1)[1]}" for k in keys}
    state = _cheap_state({canonical[k]: tuple(v.shape)
                          for k, v in bdpy_net.state_dict().items()}, seed=10)
    torch.save({k: state[canonical[k]] for k in keys}, tmp_path / f"{arch}.pt")
    assert len(keys) == (38 if arch == "vgg19" else 48)
    _assert_loaded(build_network(arch, weights=tmp_path / f"{arch}.pt"), state)


def test_generator_file_with_disagreeing_key_sets_fails(tmp_path, gen_meta):
    state = _cheap_state(_shapes(gen_meta), seed=5)
    bad = {**state, "deconv.0.weight": state["deconv5.weight"] + 1.0}
    torch.save(bad, tmp_path / "generator.pt")
    with pytest.raises(WeightsError, match="deconv"):
        load_weights(_meta(Relu7Generator), tmp_path / "generator.pt", "relu7")


def test_vgg_file_loaded_as_relu7_lists_missing_and_unexpected_keys(tmp_path, vgg_meta):
    torch.save(_cheap_state(_shapes(vgg_meta), seed=6), tmp_path / "vgg19.pt")
    with pytest.raises(WeightsError) as exc:
        build_network("relu7", weights=tmp_path / "vgg19.pt")
    msg = str(exc.value)
    assert "missing keys" in msg and "unexpected keys" in msg
    assert "conv3_1.weight" in msg and "classifier.0.bias" in msg
    assert "(24 in all)" in msg and "(38 in all)" in msg
    assert "relu7" in msg


def test_wrong_shapes_are_listed(tmp_path, vgg_meta):
    state = _cheap_state(_shapes(vgg_meta), seed=7)
    state["classifier.6.weight"] = torch.zeros(10, 4096)
    state["classifier.6.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "vgg19_10cls.pt")
    with pytest.raises(WeightsError, match="wrong shape") as exc:
        load_weights(_meta(VGG19), tmp_path / "vgg19_10cls.pt", "vgg19")
    assert "classifier.6.weight: file (10, 4096) vs model (1000, 4096)" in str(exc.value)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_truncated_file_fails(tmp_path, gen_meta, fmt):
    state = {k: v.contiguous() for k, v in _cheap_state(
        {"deconv0.weight": (32, 3, 4, 4), "deconv0.bias": (3,)}, seed=8).items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cannot read"):
        read_state_dict(path)
    with pytest.raises(WeightsError):
        load_weights(gen_meta, path, "relu7")


def test_missing_file_fails(tmp_path):
    missing = tmp_path / "nope" / "VGG_ILSVRC_19_layers.pt"
    with pytest.raises(WeightsError, match="not found") as exc:
        build_network("relu7", weights=missing)
    assert str(missing) in str(exc.value)


def test_not_a_state_dict_fails(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="resnet50"):
        build_network("resnet50")


def test_converter_cli(tmp_path, gen_meta, capsys):
    state = _cheap_state(_shapes(gen_meta), seed=9)
    aliased = {f"{ {v: k for k, v in GEN_ALIASES.items()}[k.rsplit('.', 1)[0]] }."
               f"{k.rsplit('.', 1)[1]}": v for k, v in state.items()}
    torch.save({**state, **aliased}, tmp_path / "generator.pt")
    dst = tmp_path / "out" / "relu7.safetensors"
    main([str(tmp_path / "generator.pt"), str(dst), "--arch", "relu7"])
    assert dst.is_file() and "wrote" in capsys.readouterr().out
    # our own format holds the canonical keys only
    assert sorted(read_state_dict(dst)) == sorted(state)
    _assert_loaded(build_network("relu7", weights=dst), state)
    assert not list(dst.parent.glob(".*.tmp"))  # atomic write left nothing behind
