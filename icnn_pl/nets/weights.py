"""Weight files: bdpy ``.pt`` state dicts, torchvision ``.pth``, ``.safetensors``, and
Caffe ``.caffemodel`` files (read by ``icnn_pl.nets.caffemodel``, matched by layer name).

Nothing is ever downloaded: weights come from a path the user gives. A file that does not
fit the architecture fails with the missing, unexpected and mis-shaped keys listed.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from icnn_pl.errors import WeightsError, one_line
from icnn_pl.nets.caffemodel import caffe_layer_map, caffe_state_dict, read_caffemodel

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# bdpy's AlexNetGenerator registers every layer twice: as an attribute (defc7, deconv5, ...)
# and inside Sequentials (defc.N, deconv.N). Its files may hold either key set, or both.
_GENERATOR_ALIASES = {
    "defc.0": "defc7", "defc.2": "defc6", "defc.4": "defc5",
    "deconv.0": "deconv5", "deconv.2": "conv5_1", "deconv.4": "deconv4",
    "deconv.6": "conv4_1", "deconv.8": "deconv3", "deconv.10": "conv3_1",
    "deconv.12": "deconv2", "deconv.14": "deconv1", "deconv.16": "deconv0",
}


def is_caffemodel(path: str | Path) -> bool:
    return Path(path).suffix == ".caffemodel"


def _existing_weight_file(path: str | Path) -> Path:
    """``path`` with ``~`` expanded; a WeightsError when it is not an existing file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weight file not found: {path}",
            "pass the path of an existing file (e.g. network.weights=/abs/path/"
            "VGG_ILSVRC_19_layers.pt) or leave it null to use a seeded random network",
        )
    return path


def read_state_dict(path: str | Path) -> StateDict:
    """Read a state dict from ``.safetensors``, a torch file (``.pt``/``.pth``/``.bin``) or
    a ``.caffemodel`` (keys ``<caffe layer>.weight``/``.bias``, shapes as in the file)."""
    path = _existing_weight_file(path)
    if is_caffemodel(path):
        return read_caffemodel(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure is a bad file for the user
        raise WeightsError(
            f"cannot read weight file {path}: {one_line(exc)}",
            "check that the file is a complete torch state dict or safetensors file (only"
            " tensors are loaded: save it with torch.save(model.state_dict(), path))",
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # checkpoints that wrap the weights
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path} does not hold a state dict (name -> tensor), got {type(obj).__name__}",
            "save weights with torch.save(model.state_dict(), path)",
        )
    # DataParallel / DistributedDataParallel prefix.
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def canonical_generator_keys(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Fold bdpy's duplicated generator keys (``defc.N``/``deconv.N``) onto layer names."""
    out: StateDict = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        name = _GENERATOR_ALIASES.get(prefix, prefix)
        new_key = f"{name}.{leaf}"
        if new_key in out and not torch.equal(out[new_key], value):
            raise WeightsError(
                f"generator file holds different tensors for {key!r} and {new_key!r}",
                "the two key sets of a bdpy generator file must agree; re-save the file",
            )
        out[new_key] = value
    return out


KEY_FIXERS: dict[str, Callable[[Mapping[str, torch.Tensor]], StateDict]] = {
    "relu7": canonical_generator_keys,
}


def load_weights(module: nn.Module, path: str | Path, arch: str,
                 layer_mapping: Mapping[str, str] | None = None) -> nn.Module:
    """Load ``path`` into ``module`` strictly; mismatches list every offending key.

    A ``.caffemodel`` is matched by Caffe layer name: the feature names of
    ``layer_mapping`` (``conv1_1`` -> ``features.0``), else module paths. A module built on
    the meta device (no memory, no initialisation) takes the loaded tensors as they are.
    """
    path = _existing_weight_file(path)
    expected = module.state_dict()
    if is_caffemodel(path):
        state = caffe_state_dict(path, expected, caffe_layer_map(module, layer_mapping))
    else:
        state = KEY_FIXERS.get(arch, dict)(read_state_dict(path))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", mis_shaped)):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > 8 else ""
                shown = ", ".join(items[:8]) + more
                parts.append(f"{title} keys: {shown}")
        raise WeightsError(
            f"weight file {path} does not fit the {arch!r} architecture; " + "; ".join(parts),
            f"give a weight file made for {arch} (see README: weight files), or pick the"
            " matching network/generator config",
        )
    on_meta = any(t.is_meta for t in expected.values())
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()},
                           assign=on_meta)
    log.info("loaded %s weights from %s", arch, path)
    return module


def save_safetensors(module: nn.Module, path: str | Path) -> None:
    """Write ``module``'s weights in our own format (safetensors, canonical keys), atomically."""
    from safetensors.torch import save_file

    from icnn_pl.atomic import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def main(argv: list[str] | None = None) -> None:
    """``python -m icnn_pl.nets.weights IN OUT --arch vgg19|vgg19_leaky|relu7``: convert a file."""
    from icnn_pl.nets import build_network

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("src", help="bdpy .pt, torchvision .pth, .safetensors or .caffemodel file")
    parser.add_argument("dst", help="output .safetensors path")
    parser.add_argument("--arch", required=True, help="vgg19, vgg19_leaky or relu7")
    args = parser.parse_args(argv)
    module = build_network(args.arch, weights=args.src)
    save_safetensors(module, args.dst)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
