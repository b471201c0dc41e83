"""Features of the training and test images in bdpy's Features layout.

``<root>/<layer>/<label>.mat``, variable ``feat`` of shape ``(1, *unit_shape)``: computed
by our encoder (any network, ``network=custom`` included) from a folder of images and
written on first use (a re-run computes only the missing files), or a user's existing
tree. For decoding, one layer at a time is gathered into an images x units matrix: in
memory when it fits the memory budget, else a memory-mapped ``.npy`` cache on disk, so
that chunks of units can be read without holding the layer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from icnn_pl.atomic import atomic_path
from icnn_pl.data.matio import load_mat, mat_shape, save_mat
from icnn_pl.errors import DataError
from icnn_pl.image import to_caffe
from icnn_pl.nets.encoder import FeatureEncoder

log = logging.getLogger(__name__)


def feature_path(root: Path, layer: str, label: str) -> Path:
    return Path(root) / layer / f"{label}.mat"


def missing_labels(root: Path, layers: Sequence[str], labels: Sequence[str]) -> list[str]:
    """Labels lacking a feature file of any of ``layers``."""
    return [lab for lab in labels
            if not all(feature_path(root, n, lab).exists() for n in layers)]


@torch.no_grad()
def write_features(root: Path, encoder: FeatureEncoder, layers: Sequence[str],
                   labels: Sequence[str], image: Callable[[str], np.ndarray],
                   batch: int = 16) -> int:
    """Encode the images of ``labels`` lacking files (``image(label)``: RGB HxWx3 0-255 at
    the encoder's input size) and write every layer's file; returns how many were encoded."""
    todo = missing_labels(root, layers, labels)
    if todo:
        log.info("computing %s features of %d image(s) into %s", ", ".join(layers[:3]) +
                 (" ..." if len(layers) > 3 else ""), len(todo), root)
    encoder.set_layers(list(layers))
    for s in range(0, len(todo), batch):
        names = todo[s:s + batch]
        x = to_caffe(np.stack([image(lab) for lab in names]), encoder.mean_bgr)
        feats = encoder(x.to(encoder.device))
        for n, t in feats.items():
            arr = t.float().cpu().numpy()
            for i, lab in enumerate(names):
                save_mat(feature_path(root, n, lab), {"feat": arr[i:i + 1]})
    return len(todo)


def check_tree(root: Path, layers: Sequence[str], labels: Sequence[str], what: str) -> None:
    """Every (layer, label) file exists; one line naming the first missing ones otherwise."""
    missing = missing_labels(root, layers, labels)
    if missing:
        raise DataError(
            f"{what}: {len(missing)} of {len(labels)} image(s) have no features under {root}"
            f" (e.g. {', '.join(missing[:4])}; expected <root>/<layer>/<label>.mat)",
            "check that the fMRI labels name the images (fmri.label_key), or set"
            " features.root=null to compute the features from the images")


def unit_shape(root: Path, layer: str, label: str) -> tuple[int, ...]:
    """A layer's unit shape, read from one file's header (leading 1 dropped)."""
    shape = mat_shape(feature_path(root, layer, label))
    return tuple(shape[1:]) if len(shape) > 1 and shape[0] == 1 else tuple(shape)


def layer_matrix(root: Path, layer: str, labels: Sequence[str], budget_bytes: float,
                 cache_dir: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """The layer's features of ``labels`` as an images x units float32 matrix, and the unit
    shape; memory-mapped from ``cache_dir`` when larger than ``budget_bytes``."""
    shape = unit_shape(root, layer, labels[0])
    units = int(np.prod(shape))
    nbytes = len(labels) * units * 4
    if nbytes <= budget_bytes:
        F = np.empty((len(labels), units), dtype=np.float32)
    else:
        cache = cache_dir / f"{layer}-{len(labels)}x{units}.npy"
        done = cache.with_suffix(".done")
        if done.exists():
            return np.load(cache, mmap_mode="r"), shape
        cache.parent.mkdir(parents=True, exist_ok=True)
        F = np.lib.format.open_memmap(cache, mode="w+", dtype=np.float32,
                                      shape=(len(labels), units))
    for i, lab in enumerate(labels):
        f = load_mat(feature_path(root, layer, lab))
        if f.size != units:
            raise DataError(f"{feature_path(root, layer, lab)}: {f.size} units, the layer's"
                            f" other files {units} ({shape})",
                            "recompute the features tree (all files from one network)")
        F[i] = f.reshape(-1)
    if isinstance(F, np.memmap):
        F.flush()
        with atomic_path(done) as tmp:
            tmp.write_text("ok")
        log.info("%s: %.1f GB of training features memory-mapped from %s", layer,
                 nbytes / 2**30, os.fspath(cache))
    return F, shape
