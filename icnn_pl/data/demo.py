"""The embedded demo: stimuli bundled with scikit-image, their true features, and simulated
"decoded" features for three subjects, written on first use in the lab's file layouts.
It shows the pipeline end to end on a machine with no data; it is not the paper's data.
Simulated decoded features mimic a decoder's errors: each is a blend of the image's true
features with the mean features of the other stimuli (the structured confusion a decoder
makes, which white noise alone does not reproduce: the optimisation averages white noise
away) plus white noise, with more confusion per subject (sub-01 best, sub-03 worst), so
reconstructions degrade from subject 1 to 3 and stay above chance. Everything is
deterministic and keyed by the network that computed the features, so another network
(e.g. the real VGG19 weights) gets its own demo folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from icnn_pl.atomic import atomic_path, write_text_atomic
from icnn_pl.data.matio import load_mat, save_mat
from icnn_pl.data.readers import subject_id
from icnn_pl.data.std_correction import feature_std
from icnn_pl.errors import ConfigError
from icnn_pl.image import to_caffe
from icnn_pl.nets.encoder import FeatureEncoder

log = logging.getLogger(__name__)

# Colour photographs bundled inside scikit-image (nothing is downloaded).
STIMULI = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left",
           "hubble_deep_field", "immunohistochemistry", "retina")
# Weight of the other stimuli's mean features in each subject's "decoded" features.
# Measured with icnn_gd (VGG19 at 64x64, 50 iterations, 8 images), pixel r / pairwise
# identification: 0.58 / 0.91, 0.51 / 0.86, 0.39 / 0.71.
CONFUSION = {"sub-01": 0.25, "sub-02": 0.5, "sub-03": 0.7}
NOISE = 0.5  # white noise std, as a multiple of each layer's feature std
# Part of the demo folder's key: a change of the simulation gets a fresh folder.
DEMO_VERSION = 2
ROI = "VC"


def demo_subject(subject: int | str) -> str:
    """The demo's id of ``subject`` (``sub-01`` .. ``sub-03``); others have no data here."""
    sub = subject_id(subject, "bdpy")
    if sub not in CONFUSION:
        raise ConfigError(f"subject={subject}: the demo has no such subject",
                          f"use subject=1, 2 or 3 ({', '.join(CONFUSION)})")
    return sub


def load_stimulus(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as an RGB uint8 array."""
    import skimage.data

    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    if name not in STIMULI:
        raise ConfigError(f"unknown demo stimulus {name!r}", f"use one of {STIMULI}")
    return getattr(skimage.data, name)()


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process and on every machine (unlike
    ``hash``), so demo files are reproducible."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8],
                          "little")


class Demo:
    """The demo folder for one encoder: ``<root>/<network fingerprint>/``.

    Layout: ``stimuli/<label>.png``; true features ``true/<layer>/<label>.mat``; decoded
    features ``decoded/<layer>/<sub-0N>/VC/decoded_features/<label>.mat`` (bdpy layout);
    reference stds ``feat_std.mat``. Files are written atomically and only when missing.
    """

    def __init__(self, root: str | Path, encoder: FeatureEncoder, network_id: str) -> None:
        self.encoder = encoder
        self.layers = list(encoder.forward_order(encoder.known_layers))
        key = (f"{network_id}|{encoder.mean_bgr}|{encoder.input_size}|{self.layers}"
               f"|v{DEMO_VERSION}")
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        self.dir = Path(root) / f"{network_id.split('|')[0]}-{digest}"

    @property
    def stimuli_dir(self) -> Path:
        return self.dir / "stimuli"

    @property
    def true_dir(self) -> Path:
        return self.dir / "true"

    @property
    def decoded_dir(self) -> Path:
        return self.dir / "decoded"

    @property
    def std_file(self) -> Path:
        return self.dir / "feat_std.mat"

    def ensure(self, labels: Sequence[str] = STIMULI, subject: int | str | None = None) -> Demo:
        """Write whatever is missing for ``labels`` (and ``subject``'s decoded features)."""
        unknown = [lab for lab in labels if lab not in STIMULI]
        if unknown:
            raise ConfigError(f"demo has no images {unknown}", f"demo labels are {STIMULI}")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.dir / "README.txt", __doc__ or "")
        # Reference stds (and the decoded features' confusion term) come from all demo
        # stimuli, as the lab's stds came from many images; only the requested labels'
        # features are kept on disk (each image is ~60 MB at 224x224).
        true = {lab: self._true_features(lab) for lab in labels}
        sub = None if subject is None else demo_subject(subject)
        todo = [lab for lab in labels if sub is not None and not self._decoded_done(lab, sub)]
        if todo or not self.std_file.exists():
            stds: dict[str, list[float]] = {n: [] for n in self.layers}
            total: dict[str, np.ndarray] = {}
            for lab in STIMULI:
                feats = true.get(lab) or self._true_features(lab, save=False)
                for n in self.layers:
                    stds[n].append(feature_std(feats[n]))
                    total[n] = total[n] + feats[n] if n in total else feats[n].astype(np.float64)
            if not self.std_file.exists():
                save_mat(self.std_file, {n: np.float64(np.mean(v)) for n, v in stds.items()})
            for lab in todo:
                self._decoded_features(lab, sub, true[lab], total)
        return self

    def _stimulus(self, label: str) -> np.ndarray:
        path = self.stimuli_dir / f"{label}.png"
        if not path.exists():
            h, w = self.encoder.input_size
            im = Image.fromarray(load_stimulus(label)).convert("RGB").resize((w, h), Image.BICUBIC)
            with atomic_path(path) as tmp:
                im.save(tmp, format="PNG")
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)

    def _true_features(self, label: str, save: bool = True) -> dict[str, np.ndarray]:
        paths = {n: self.true_dir / n / f"{label}.mat" for n in self.layers}
        if all(p.exists() for p in paths.values()):
            return {n: load_mat(p)[0] for n, p in paths.items()}  # files hold (1, ...)
        image = to_caffe(self._stimulus(label), self.encoder.mean_bgr).to(self.encoder.device)
        self.encoder.set_layers(self.layers)
        with torch.no_grad():
            feats = {n: t[0].cpu().numpy() for n, t in self.encoder(image).items()}
        for n, p in paths.items():
            if save:
                save_mat(p, {"feat": feats[n][None]})
        return feats

    def _decoded_paths(self, label: str, sub: str) -> dict[str, Path]:
        return {n: self.decoded_dir / n / sub / ROI / "decoded_features" / f"{label}.mat"
                for n in self.layers}

    def _decoded_done(self, label: str, sub: str) -> bool:
        return all(p.exists() for p in self._decoded_paths(label, sub).values())

    def _decoded_features(self, label: str, sub: str, true: dict[str, np.ndarray],
                          total: dict[str, np.ndarray]) -> None:
        """(1 - m) * own features + m * mean features of the other stimuli + noise."""
        m, others = CONFUSION[sub], len(STIMULI) - 1
        for n, p in self._decoded_paths(label, sub).items():
            if p.exists():
                continue
            rng = np.random.default_rng(stable_seed(sub, label, n))
            f = true[n]
            mixed = (1.0 - m) * f + m * (total[n] - f) / others
            noise = rng.standard_normal(f.shape, dtype=np.float32) * (NOISE * feature_std(f))
            save_mat(p, {"feat": (mixed + noise)[None].astype(np.float32)})
