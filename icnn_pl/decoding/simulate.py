"""A simulated fMRI data set in BData format, for the demo and the tests.

Training images are natural-statistics images: random-phase noise with the 1/f amplitude
spectrum of natural photographs (the spectrum the Fourier prior assumes), luminance plus
weaker colour-opponent fields. Not crops or flips of the bundled photographs: those 8
photographs are the demo's test images, and training on pieces of them would let the
decoder see the test content (identification would be inflated); 1/f images are as many
as wanted, share no content with the test images, and carry the natural-image statistics
that the network's features respond to.

A voxel is a sparse random mixture of pooled features (each channel averaged over a 2x2
grid of its feature map) of one group of layers, its "visual area": early layers for V1,
deeper for V2, V3, hV4, the fully connected ones for HVC; VC is their union. Each sample is
a block (one image's presentation, averaged): signal plus a per-run offset plus white
noise, noisier for higher subjects. Training: every image once per repeat, repeats in
separate runs, shuffled; test: the 8 demo photographs, several repeats each.
Everything is deterministic (seeded by the subject) and written on first use.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from icnn_pl.atomic import atomic_path
from icnn_pl.data.demo import STIMULI, demo_subject, load_stimulus, stable_seed
from icnn_pl.data.matio import load_mat
from icnn_pl.decoding.bdata import write_bdata
from icnn_pl.decoding.features import feature_path, write_features
from icnn_pl.image import load_rgb
from icnn_pl.nets.encoder import FeatureEncoder

log = logging.getLogger(__name__)

AREAS = ("V1", "V2", "V3", "hV4", "HVC")
NOISE = {"sub-01": 1.0, "sub-02": 1.5, "sub-03": 2.2}  # noise std / signal std per voxel
RUN_OFFSET = 0.3          # per-run, per-voxel offset std (relative to the signal)
MIX = 8                   # pooled features per voxel
VERSION = 1


@dataclass(frozen=True)
class SimSpec:
    n_train: int = 200          # training images
    repeats: int = 3            # training repeats (one run set each)
    test_repeats: int = 4
    voxels_per_area: int = 200
    run_length: int = 50        # samples per run


def one_over_f_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 noise with a 1/f amplitude spectrum: luminance plus two opponent fields."""
    h, w = size
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
    fields = []
    for scale in (1.0, 0.35, 0.35):
        spec = amp * np.exp(2j * np.pi * rng.random(amp.shape)) * rng.standard_normal(amp.shape)
        f = np.fft.irfft2(spec, s=(h, w))
        fields.append(scale * (f - f.mean()) / (f.std() + 1e-12))
    lum, rg, by = fields
    rgb = np.stack([lum + rg + 0.5 * by, lum - rg + 0.5 * by, lum - by], -1)
    rgb = rgb * rng.uniform(35, 60) + rng.uniform(90, 160)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def areas_of(layers: Sequence[str]) -> dict[str, list[str]]:
    """Split the network's layers (in forward order) into the five areas, shallow to deep."""
    fc = [n for n in layers if n.startswith("fc")]
    rest = [n for n in layers if n not in fc] if fc else list(layers)
    groups = np.array_split(np.arange(len(rest)), len(AREAS) - (1 if fc else 0))
    out = {a: [rest[i] for i in g] for a, g in zip(AREAS, groups, strict=False)}
    if fc:
        out["HVC"] = fc
    return {a: v for a, v in out.items() if v}


def _pooled(feat: np.ndarray) -> np.ndarray:
    """A channel's mean over each cell of a 2x2 grid (conv), or the units (fc)."""
    if feat.ndim < 3:
        return feat.reshape(-1)
    c, h, w = feat.shape[-3:]
    t = torch.as_tensor(feat.reshape(1, c, h, w), dtype=torch.float32)
    return torch.nn.functional.adaptive_avg_pool2d(t, (min(2, h), min(2, w))).reshape(-1).numpy()


class SimulatedFmri:
    """``<root>/<network key>/``: ``images/{train,test}/``, ``features/<layer>/<label>.mat``,
    ``sub-0N_train.h5``, ``sub-0N_test.h5``."""

    def __init__(self, root: str | Path, encoder: FeatureEncoder, network_id: str,
                 spec: SimSpec = SimSpec()) -> None:
        self.encoder, self.spec = encoder, spec
        self.layers = list(encoder.forward_order(encoder.known_layers))
        key = (f"{network_id}|{encoder.mean_bgr}|{encoder.input_size}|{self.layers}|{spec}"
               f"|v{VERSION}")
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        self.dir = Path(root) / f"{network_id.split('|')[0]}-{digest}"
        self.train_labels = [f"noise_{i:05d}" for i in range(spec.n_train)]
        self.test_labels = list(STIMULI)

    @property
    def features_dir(self) -> Path:
        return self.dir / "features"

    def images_dir(self, split: str) -> Path:
        return self.dir / "images" / split

    def bdata(self, subject: str, split: str) -> Path:
        return self.dir / f"{subject}_{split}.h5"

    def ensure(self, subject: int | str) -> SimulatedFmri:
        sub = demo_subject(subject)
        self._images()
        write_features(self.features_dir, self.encoder, self.layers,
                       self.train_labels + self.test_labels, self._image)
        if not (self.bdata(sub, "train").exists() and self.bdata(sub, "test").exists()):
            log.info("simulating fMRI of %s (%d voxels) in %s", sub,
                     self.spec.voxels_per_area * len(areas_of(self.layers)), self.dir)
            self._simulate(sub)
        return self

    def _images(self) -> None:
        h, w = self.encoder.input_size
        for lab in self.train_labels:
            path = self.images_dir("train") / f"{lab}.png"
            if not path.exists():
                img = one_over_f_image(np.random.default_rng(stable_seed("image", lab)), (h, w))
                with atomic_path(path) as tmp:
                    Image.fromarray(img).save(tmp, format="PNG")
        for lab in self.test_labels:
            path = self.images_dir("test") / f"{lab}.png"
            if not path.exists():
                im = Image.fromarray(load_stimulus(lab)).convert("RGB")
                im = im.resize((w, h), Image.BICUBIC)
                with atomic_path(path) as tmp:
                    im.save(tmp, format="PNG")

    def _image(self, label: str) -> np.ndarray:
        split = "test" if label in self.test_labels else "train"
        return load_rgb(self.images_dir(split) / f"{label}.png", self.encoder.input_size)

    def _pooled_area(self, labels: Sequence[str], layers: Sequence[str]) -> np.ndarray:
        def pooled(lab: str) -> np.ndarray:
            return np.concatenate([_pooled(load_mat(feature_path(self.features_dir, n, lab))[0])
                                   for n in layers])
        return np.stack([pooled(lab) for lab in labels])

    def _simulate(self, sub: str) -> None:
        s, rng = self.spec, np.random.default_rng(stable_seed("fmri", sub, self.dir.name))
        train_order = np.concatenate([rng.permutation(s.n_train) for _ in range(s.repeats)])
        test_order = np.concatenate([rng.permutation(len(self.test_labels))
                                     for _ in range(s.test_repeats)])
        blocks: dict[str, list[np.ndarray]] = {"train": [], "test": []}
        roi_of: list[str] = []
        for area, layers in areas_of(self.layers).items():
            P_train = self._pooled_area(self.train_labels, layers)
            P_test = self._pooled_area(self.test_labels, layers)
            mu, sd = P_train.mean(0), P_train.std(0) + 1e-6
            mix = np.zeros((P_train.shape[1], s.voxels_per_area))
            for j in range(s.voxels_per_area):
                mix[rng.choice(P_train.shape[1], MIX, replace=False), j] = rng.standard_normal(MIX)
            for split, P, order in (("train", P_train, train_order), ("test", P_test, test_order)):
                sig = ((P - mu) / sd) @ mix / np.sqrt(MIX)
                blocks[split].append(sig[order])
            roi_of += [area] * s.voxels_per_area
        for split, order, labels in (("train", train_order, self.train_labels),
                                     ("test", test_order, self.test_labels)):
            sig = np.hstack(blocks[split])
            n = len(order)
            run = np.arange(n) // s.run_length + 1
            offsets = rng.standard_normal((run.max(), sig.shape[1])) * RUN_OFFSET
            X = sig + offsets[run - 1] + rng.standard_normal(sig.shape) * NOISE[sub] + 100.0
            self._write(sub, split, X, order, labels, run, roi_of)

    def _write(self, sub: str, split: str, X: np.ndarray, order: np.ndarray,
               labels: Sequence[str], run: np.ndarray, roi_of: Sequence[str]) -> None:
        nvox, n = X.shape[1], len(order)
        block = np.arange(n) % self.spec.run_length + 1
        ncol = nvox + 3
        flags = []
        for area in [*AREAS, "VC"]:
            row = np.full(ncol, np.nan)
            row[:nvox] = [1.0 if area in ("VC", r) else 0.0 for r in roi_of]
            flags.append((f"ROI_{area}", row, f"1 = ROI {area}"))
        write_bdata(self.bdata(sub, split),
                    [("VoxelData", X, "1 = voxel data"), ("Run", run.astype(float), "1 = run"),
                     ("Block", block.astype(float), "1 = block"),
                     ("stimulus_name", order + 1.0, "1 = stimulus_name")],
                    flags=flags,
                    vmaps={"stimulus_name": {float(i + 1): lab for i, lab in enumerate(labels)}})
