"""The decoding stage of one job: (subject, ROI, layers) from the composed config.

Order: everything that can be wrong is checked first (files, ROI, labels of the fMRI vs
the features, NaNs, k vs voxels, the memory budget), then the features, then each layer.
Outputs (``out_dir``) are shared by every job, so a multirun over subjects, ROIs and
layers fills one tree, and a re-run skips finished layers and chunks.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from icnn_pl.atomic import atomic_path
from icnn_pl.data.images import IMAGE_SUFFIXES
from icnn_pl.data.matio import load_mat, save_mat
from icnn_pl.data.readers import subject_id
from icnn_pl.data.std_correction import feature_std
from icnn_pl.decoding.bdata import Trials, read_bdata
from icnn_pl.decoding.decoder import TopKRidge, check_inputs, dtype_of, units_per_chunk
from icnn_pl.decoding.features import (
    check_tree,
    feature_path,
    layer_matrix,
    write_features,
)
from icnn_pl.decoding.layer import WEIGHT_FORMATS, decode_layer, finish_layer, is_done, layer_dir
from icnn_pl.decoding.scores import collect, decoding_scores, write_table
from icnn_pl.decoding.simulate import SimSpec, SimulatedFmri
from icnn_pl.errors import ConfigError, DataError
from icnn_pl.image import load_rgb
from icnn_pl.pipeline.data_sources import existing_path, plain
from icnn_pl.pipeline.factory import build_encoder_from_cfg

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """What the decoders of one (subject, ROI) need, checked."""

    subject: str
    roi: str
    train: Trials              # every training trial
    test: Trials               # averaged per label
    features: Path             # <root>/<layer>/<label>.mat of training and test images
    train_images: list[str]    # unique training labels (rows of a layer matrix)
    has_test_truth: bool


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available", "use device=cpu or auto")
    return torch.device(name)


def _path(template: str, sub: str, key: str) -> Path:
    return existing_path(str(template).format(subject=sub), key)


def _image_fn(folders: list[Path], labels: list[str], size: tuple[int, int]):
    """``label -> RGB image`` over the folders; every label's file is looked up now, so a
    label without an image fails before any feature is computed."""
    files = {}
    for folder in folders:
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.setdefault(p.stem, p)
    missing = [lab for lab in labels if lab not in files]
    if missing:
        raise DataError(f"{len(missing)} fMRI label(s) have no image in"
                        f" {', '.join(map(str, folders))} (e.g. {', '.join(missing[:4])})",
                        "name the images by the fMRI labels (<label>.<ext>), or check"
                        " fmri.label_key")
    return lambda label: load_rgb(files[label], size)


def copy_test_images(folders: list[Path], labels: list[str], dest: Path) -> None:
    """The test images beside the decoded features (``data.stimuli`` of the reconstruction),
    where the folders hold them."""
    for folder in folders:
        for p in sorted(folder.iterdir()):
            target = dest / p.name
            if p.stem in labels and p.suffix.lower() in IMAGE_SUFFIXES and not target.exists():
                with atomic_path(target) as tmp:
                    shutil.copyfile(p, tmp)


def prepare(cfg: DictConfig, layers: list[str]) -> Inputs:
    """Read and check the fMRI data, make sure the features exist."""
    f = cfg.fmri
    encoder = None
    if f.kind == "demo":
        encoder, network_id = build_encoder_from_cfg(cfg)
        spec = SimSpec(**{k: int(f[k]) for k in ("n_train", "repeats", "test_repeats",
                                                  "voxels_per_area") if k in f})
        sim = SimulatedFmri(f.root, encoder, network_id, spec).ensure(cfg.subject)
        sub = subject_id(cfg.subject, "bdpy")
        train_file, test_file = sim.bdata(sub, "train"), sim.bdata(sub, "test")
        feat_root, folders = sim.features_dir, [sim.images_dir("train"), sim.images_dir("test")]
    elif f.kind == "bdata":
        sub = subject_id(cfg.subject, "bdpy")
        train_file = _path(f.train, sub, "fmri.train")
        test_file = _path(f.test, sub, "fmri.test")
        folders = [existing_path(f[k], f"fmri.{k}") for k in ("train_images", "test_images")
                   if f.get(k)]
        feat_root = Path(cfg.features.root) if cfg.features.root else Path(cfg.out_dir) / "features"
    else:
        raise ConfigError(f"fmri.kind={f.kind!r} is not known", "use fmri=demo or fmri=bdata")
    train = read_bdata(train_file, cfg.roi, f.label_key)
    test = read_bdata(test_file, cfg.roi, f.label_key).averaged()
    if train.X.shape[1] != test.X.shape[1]:
        raise DataError(f"ROI {cfg.roi}: {train.X.shape[1]} voxels in {train_file.name},"
                        f" {test.X.shape[1]} in {test_file.name}",
                        "use training and test files of the same subject and ROI mask")
    train_images = list(dict.fromkeys(train.labels))
    check_inputs(train.X, test.X, cfg.decoder.k, float(cfg.decoder.alpha))
    if str(cfg.decoder.save_weights) not in WEIGHT_FORMATS:
        raise ConfigError(f"decoder.save_weights={cfg.decoder.save_weights!r} is not valid",
                          f"use one of {WEIGHT_FORMATS}")
    if f.kind == "bdata" and not cfg.features.root:
        if not folders:
            raise ConfigError("no features of the training images: set features.root=<tree>"
                              " or fmri.train_images=<folder of images>",
                              "features.root=<root>/<layer>/<label>.mat, or the image folder")
        if encoder is None:
            encoder, _ = build_encoder_from_cfg(cfg)
        labels = train_images + ([lab for lab in test.labels if lab not in train_images]
                                 if f.get("test_images") else [])
        image = _image_fn(folders, labels, encoder.input_size)
        write_features(feat_root, encoder, layers, labels, image, int(cfg.features.batch))
    check_tree(feat_root, layers, train_images, "training images")
    copy_test_images(folders, test.labels, Path(cfg.out_dir) / "stimuli")
    has_truth = all(feature_path(feat_root, n, lab).exists() for n in layers for lab in test.labels)
    return Inputs(sub, cfg.roi, train, test, feat_root, train_images, has_truth)


def check_budget(cfg: DictConfig, inputs: Inputs) -> None:
    """The memory budget holds the Gram matrix and at least one unit: one line if not."""
    d = cfg.decoder
    n, v = inputs.train.X.shape
    k = None if d.k in (None, 0) or d.k == v else int(d.k)
    item = torch.empty((), dtype=dtype_of(d.dtype)).element_size()
    units_per_chunk(n, v, len(inputs.test.labels), k, item, float(d.memory_gb) * 2**30)


def run(cfg: DictConfig) -> list[dict]:
    """Decode every requested layer of (subject, ROI); returns the layers' score rows."""
    layers = list(plain(cfg.layers.names))
    out = Path(cfg.out_dir)
    t0 = time.perf_counter()
    inputs = prepare(cfg, layers)
    check_budget(cfg, inputs)
    todo = [n for n in layers if not is_done(out, n, inputs.subject, inputs.roi)]
    log.info("%s %s: %d training trials (%d images), %d test images, %d voxels; %d of %d"
             " layer(s) to decode (setup %.1f s)", inputs.subject, inputs.roi,
             len(inputs.train.labels), len(inputs.train_images), len(inputs.test.labels),
             inputs.train.X.shape[1], len(todo), len(layers), time.perf_counter() - t0)
    rows = []
    if todo:
        device = device_of(str(cfg.device))
        d = cfg.decoder
        t = time.perf_counter()
        decoder = TopKRidge(inputs.train.X, inputs.test.X, float(d.alpha), d.k, device, d.dtype)
        log.info("Gram matrix of %d voxels on %s in %.1f s", decoder.v, device,
                 time.perf_counter() - t)
        row_of = {lab: i for i, lab in enumerate(inputs.train_images)}
        rows_idx = np.array([row_of[lab] for lab in inputs.train.labels])
        budget = float(d.memory_gb) * 2**30
        for layer in todo:
            rows.append(_one_layer(cfg, inputs, decoder, layer, rows_idx, budget, out, device))
    write_feature_std(out, inputs, layers)
    write_table(out, layers)
    return rows


def _one_layer(cfg, inputs: Inputs, decoder: TopKRidge, layer: str, rows_idx: np.ndarray,
               budget: float, out: Path, device: torch.device) -> dict:
    d = cfg.decoder
    t = time.perf_counter()
    F, shape = layer_matrix(inputs.features, layer, inputs.train_images, budget / 2,
                            out / ".cache")
    read_s = time.perf_counter() - t
    chunk = decoder.chunk_size(budget, F.shape[1])
    if d.get("chunk_units"):
        chunk = min(chunk, int(d.chunk_units))
    where = layer_dir(out, layer, inputs.subject, inputs.roi)
    res = decode_layer(decoder, F, rows_idx, shape, inputs.test.labels, where, chunk,
                       str(d.save_weights))
    info = {"layer": layer, "subject": inputs.subject, "roi": inputs.roi, "units": F.shape[1],
            "voxels": decoder.v, "k": decoder.k, "alpha": decoder.alpha,
            "samples": decoder.n, "chunk": chunk, "chunks": res.chunks,
            "seconds": round(res.seconds, 3), "read_seconds": round(read_s, 3),
            "device": str(device), "dtype": d.dtype, "labels": inputs.test.labels,
            "feat_std": float(np.mean([feature_std(np.asarray(F[i]).reshape(shape))
                                       for i in range(F.shape[0])]))}
    if inputs.has_test_truth:
        true = np.stack([load_mat(feature_path(inputs.features, layer, lab)).reshape(-1)
                         for lab in inputs.test.labels])
        info.update(decoding_scores(res.pred, true, res.y_mean))
    finish_layer(where, info)
    log.info("%s: %d units in %d chunk(s) of %d, %.1f s (%.0f units/s; features read %.1f s)%s",
             layer, F.shape[1], res.chunks, chunk, res.seconds, F.shape[1] / max(res.seconds, 1e-9),
             read_s, "" if "profile_r" not in info else
             f"; profile r {info['profile_r']:.3f}, pattern r {info['pattern_r']:.3f},"
             f" identification {info['ident_acc']:.1%}")
    return info


def write_feature_std(out: Path, inputs: Inputs, layers: list[str]) -> None:
    """``<out>/feat_std.mat``: the reference std of each finished layer (``feature_std``
    averaged over the training images, as the lab's ``std_ref`` over many images), and
    ``<out>/train_mean/<subject>-<roi>.mat``: each layer's ``y_mean`` (for
    ``data.std_correction=centered``)."""
    stds = {r["layer"]: np.float64(r["feat_std"]) for r in collect(out) if "feat_std" in r}
    if stds:
        save_mat(out / "feat_std.mat", stds)
    means = {n: load_mat(layer_dir(out, n, inputs.subject, inputs.roi) / "model" / "y_mean.mat",
                         "y_mean")[0]
             for n in layers if is_done(out, n, inputs.subject, inputs.roi)}
    if means:
        save_mat(out / "train_mean" / f"{inputs.subject}-{inputs.roi}.mat", means)
