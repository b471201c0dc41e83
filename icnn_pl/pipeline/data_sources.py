"""``data.kind`` -> the feature reader, subject id and stimuli of a job.

A new data layout is a function here and an entry in ``DATA_SOURCES`` (plus a file in
``conf/data/``). Each function gets the composed config, the job's encoder and layers, and
returns a ``DataSource``; the ``ReconDataModule`` built from it does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from icnn_pl.data.datamodule import FeatureSource, select_labels
from icnn_pl.data.demo import STIMULI, Demo, demo_subject
from icnn_pl.data.images import ImageFeatures, ImageFolder
from icnn_pl.data.readers import (
    CaffeDecodedFeatures,
    DecodedFeatures,
    TrueFeatures,
    load_reference_std,
    subject_id,
)
from icnn_pl.errors import ConfigError
from icnn_pl.nets.encoder import FeatureEncoder

TRUE_FEATURES = "true_features"  # the "subject" of runs from true features
DEMO_SOURCES = ("decoded", TRUE_FEATURES)


def plain(node: Any) -> Any:
    """A config node as plain Python containers (other values as they are)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(
        node, DictConfig | ListConfig) else node


def existing_path(value: Any, key: str) -> Path:
    """``value`` as a path that exists, or a ConfigError naming ``key``."""
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: no such file or directory: {path}",
                          f"set {key}=<existing path> (absolute, or relative to where you run)")
    return path


def required(cfg: DictConfig, key: str, hint: str) -> Any:
    """The value of ``key``, which must be set (not null, not ``???``)."""
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
    if value is None or value == "???":
        raise ConfigError(f"{key} is not set", hint)
    return value


def demo_source(d: DictConfig) -> str:
    """``data.source`` of the demo; a bare ``true`` on the command line is a YAML bool."""
    return TRUE_FEATURES if d.get("source") is True else str(d.get("source"))


@dataclass
class DataSource:
    """What a data layout gives a job."""

    features: FeatureSource
    subject: str  # the subject's id in output paths (``true_features`` for true features)
    stimuli: ImageFolder | None = None
    std_correction: str | None = None  # overrides data.std_correction (true features: none)
    ref_std: dict[str, float] | None = None  # the layout's own reference stds (demo)


def _demo(cfg: DictConfig, encoder: FeatureEncoder, layers: Sequence[str],
          network_id: str) -> DataSource:
    d = cfg.data
    demo = Demo(d.root, encoder, network_id)
    decoded = demo_source(d) == "decoded"
    sub = demo_subject(cfg.subject) if decoded else None
    demo.ensure(select_labels(STIMULI, plain(d.get("labels")), d.get("limit")), subject=sub)
    stimuli = ImageFolder(demo.stimuli_dir, encoder.input_size)
    if not decoded:
        return DataSource(TrueFeatures(demo.true_dir, layers), TRUE_FEATURES, stimuli, "none")
    # the demo's own reference stds, unless the user gives some or none are needed
    needs_own = not d.get("std_ref") and d.get("std_correction", "none") != "none"
    ref_std = load_reference_std(demo.std_file, layers) if needs_own else None
    return DataSource(DecodedFeatures(demo.decoded_dir, sub, cfg.roi, layers), sub, stimuli,
                      ref_std=ref_std)


def _stimuli(cfg: DictConfig, encoder: FeatureEncoder) -> ImageFolder | None:
    folder = cfg.data.get("stimuli")
    return ImageFolder(existing_path(folder, "data.stimuli"), encoder.input_size) \
        if folder else None


def data_root(cfg: DictConfig) -> Path:
    """``data.root``, required and existing (ConfigError naming the key otherwise)."""
    return existing_path(required(cfg, "data.root", f"set data.root=<path> for data="
                                  f"{cfg.data.name}"), "data.root")


def _decoded(cfg: DictConfig, encoder: FeatureEncoder, layers: Sequence[str],
             network_id: str) -> DataSource:
    sub = subject_id(cfg.subject, "bdpy")
    features = DecodedFeatures(data_root(cfg), sub, cfg.roi, layers, fold=cfg.data.get("fold"))
    return DataSource(features, sub, _stimuli(cfg, encoder))


def _decoded_caffe(cfg: DictConfig, encoder: FeatureEncoder, layers: Sequence[str],
                   network_id: str) -> DataSource:
    sub = subject_id(cfg.subject, "caffe")
    features = CaffeDecodedFeatures(data_root(cfg), sub, cfg.roi, layers,
                                    feature_type=cfg.data.feature_type, net=cfg.data.net)
    return DataSource(features, sub, _stimuli(cfg, encoder))


def _image_folder(cfg: DictConfig, encoder: FeatureEncoder, layers: Sequence[str],
                   network_id: str) -> DataSource:
    images = ImageFolder(data_root(cfg), encoder.input_size)
    return DataSource(ImageFeatures(images, encoder, layers), TRUE_FEATURES, images, "none")


#: data.kind -> the function that opens that layout.
DATA_SOURCES: dict[str, Callable[[DictConfig, FeatureEncoder, Sequence[str], str],
                                 DataSource]] = {
    "demo": _demo, "decoded": _decoded, "decoded_caffe": _decoded_caffe,
    "true_features": _image_folder,
}
