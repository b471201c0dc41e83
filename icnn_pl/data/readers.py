"""Readers for decoded and true CNN features, the reference feature std and act_range.

Three on-disk layouts hold one ``.mat`` file per (layer, image label):

- bdpy era:  ``<root>/<layer>/<subject>/<roi>/[<fold>/][decoded_features/]<label>.mat``
- Caffe era: ``<root>/<type>/<net>/<layer>/<S1>/<roi>/<type>-<net>-<layer>-<S1>-<roi>-<label>.mat``
- true features: ``<root>/<layer>/<label>.mat``

Each reader only works out one directory and file-name prefix per layer; listing labels,
checking that every layer has the same labels and reading ``feat`` is shared.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from icnn_pl.data.matio import load_mat, load_mat_dict, mat_shape
from icnn_pl.errors import ConfigError, DataError

_SUBJECT_RE = re.compile(r"^(?:sub-?|s)?0*(\d+)$", re.IGNORECASE)
_LAYOUTS = ("bdpy", "caffe")


def subject_id(subject: int | str, layout: str) -> str:
    """Map ``1``, ``"1"``, ``"sub-01"`` or ``"S1"`` to ``"sub-01"`` (bdpy) or ``"S1"`` (caffe)."""
    if layout not in _LAYOUTS:
        raise ConfigError(
            f"unknown feature layout {layout!r}", fix=f"use one of: {', '.join(_LAYOUTS)}"
        )
    number = None
    if isinstance(subject, int) and not isinstance(subject, bool):
        number = subject
    elif isinstance(subject, str) and (m := _SUBJECT_RE.match(subject.strip())):
        number = int(m.group(1))
    if number is None or number < 1:
        raise ConfigError(
            f"subject {subject!r} is not a recognised subject id",
            fix="give the subject as 1, '1', 'sub-01' or 'S1'",
        )
    return f"sub-{number:02d}" if layout == "bdpy" else f"S{number}"


def _subject_dir(subject: int | str, layout: str) -> str:
    # Datasets other than Shen et al. may name subjects freely (e.g. "sub-AM"): a string
    # that is not a numbered id is used verbatim and checked against the directory tree.
    try:
        return subject_id(subject, layout)
    except ConfigError:
        if isinstance(subject, str) and subject and "/" not in subject and layout == "bdpy":
            return subject
        raise


def _preview(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _check_root(root: str | os.PathLike, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"{what} root directory not found: {path}",
            fix=f"set data.root=<directory holding the {what}> to an existing directory",
        )
    return path


def _descend(path: Path, steps: Sequence[tuple[str, str]]) -> Path:
    """Walk ``path/name/...``; a missing level lists what is there instead."""
    for what, name in steps:
        nxt = path / name
        if not nxt.is_dir():
            present = _subdirs(path)
            raise DataError(
                f"{what} '{name}' not found: {nxt} does not exist "
                f"({what}s present in {path}: {_preview(present)})",
                fix=f"choose one of the {what}s present, or point data.root at the right tree",
            )
        path = nxt
    return path


def _check_layers(layers: Sequence[str]) -> list[str]:
    # a bare string is a Sequence too: "conv1_1" would silently become seven "layers"
    if isinstance(layers, str) or not layers:
        raise ConfigError(
            f"layers must be a non-empty list of layer names, got {layers!r}",
            fix="pass e.g. layers=['conv1_1', 'fc8']",
        )
    layers = list(layers)
    dupes = sorted({x for x in layers if layers.count(x) > 1})
    if dupes:
        raise ConfigError(f"layers listed twice: {', '.join(dupes)}", fix="list each layer once")
    return layers


def _one_sample_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """(1,C,H,W) -> (C,H,W), (1,N) or (N,1) -> (N,); (C,H,W) and (N,) pass unchanged."""
    # Only 4-D and 2-D arrays carry a sample axis: squeezing a 3-D (C,H,W) with C == 1
    # would wrongly drop the channel axis.
    if len(shape) in (2, 4) and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 2 and shape[1] == 1:  # MATLAB column vector
        shape = shape[:1]
    if len(shape) not in (1, 3) or math.prod(shape) == 0:
        raise DataError(
            f"feature array in {path} has shape {shape}; expected one sample: "
            "(1,C,H,W) or (C,H,W) for conv layers, (1,N) or (N,) for fc layers",
            fix="save one image's features per file under the variable 'feat'",
        )
    return shape


def _as_one_sample(arr: np.ndarray, path: Path) -> np.ndarray:
    """One image's features, (C,H,W) or (N,), checked finite."""
    arr = arr.reshape(_one_sample_shape(arr.shape, path))
    if not np.isfinite(arr).all():
        raise DataError(
            f"feature array in {path} contains NaN or inf",
            fix="re-export the features; check the decoder output for failed fits",
        )
    return np.ascontiguousarray(arr)


class _LayerFiles:
    """Shared reader logic: for each layer, files ``<dir>/<prefix><label>.mat`` holding ``feat``."""

    what = "features"

    def __init__(self, locations: dict[str, tuple[Path, str]]) -> None:
        self.layers = list(locations)
        self._locations = locations

    def _path(self, layer: str, label: str) -> Path:
        directory, prefix = self._locations[layer]
        return directory / f"{prefix}{label}.mat"

    def _layer_labels(self, layer: str) -> set[str]:
        directory, prefix = self._locations[layer]
        # hidden files include atomic-write temporaries and macOS "._x.mat" forks
        return {
            e.name[len(prefix) : -len(".mat")]
            for e in os.scandir(directory)
            if e.is_file()
            and not e.name.startswith(".")
            and e.name.startswith(prefix)
            and e.name.endswith(".mat")
            and len(e.name) > len(prefix) + len(".mat")
        }

    def labels(self) -> list[str]:
        """Sorted labels; every layer must hold the same set."""
        per_layer = {layer: self._layer_labels(layer) for layer in self.layers}
        union = set().union(*per_layer.values())
        if not union:
            dirs = sorted({str(d) for d, _ in self._locations.values()})
            raise DataError(
                f"no {self.what} .mat files found in {_preview(dirs, 3)}",
                fix=f"check data.root and that the {self.what} were exported there",
            )
        gaps = {layer: sorted(union - found) for layer, found in per_layer.items() if union - found}
        if gaps:
            detail = "; ".join(f"layer {layer} lacks {_preview(m, 5)}" for layer, m in gaps.items())
            raise DataError(
                f"{self.what} are incomplete: labels present for some layers are missing "
                f"for others ({detail})",
                fix="re-export the missing files, or drop those labels or layers",
            )
        return sorted(union)

    def _existing(self, layer: str, label: str) -> Path:
        path = self._path(layer, label)
        if not path.is_file():
            raise DataError(
                f"no {self.what} for label '{label}' in layer {layer}: {path} does not exist",
                fix="use a label from labels(), or export that file",
            )
        return path

    def read(self, label: str) -> dict[str, np.ndarray]:
        """Features of one label: ``{layer: (C,H,W) or (N,) float32}`` in ``layers`` order."""
        out = {}
        for layer in self.layers:
            path = self._existing(layer, label)
            out[layer] = _as_one_sample(load_mat(path, "feat"), path)
        return out

    def shape(self, label: str, layer: str) -> tuple[tuple[int, ...], Path]:
        """Per-image shape of ``layer``'s features of ``label`` and their file, from the
        file's headers (no array data read)."""
        path = self._existing(layer, label)
        return _one_sample_shape(mat_shape(path, "feat"), path), path


class DecodedFeatures(_LayerFiles):
    """Decoded features in the bdpy layout (``bdpy.dataform.DecodedFeatures``)."""

    what = "decoded features"

    def __init__(
        self,
        root: str | os.PathLike,
        subject: int | str,
        roi: str = "VC",
        layers: Sequence[str] = (),
        fold: str | None = None,
    ) -> None:
        base = _check_root(root, self.what)
        subject = _subject_dir(subject, "bdpy")
        self.fold = fold
        locations = {}
        for layer in _check_layers(layers):
            roi_dir = _descend(base, [("layer", layer), ("subject", subject), ("ROI", roi)])
            locations[layer] = (self._feature_dir(roi_dir, fold), "")
        super().__init__(locations)

    @staticmethod
    def _feature_dir(roi_dir: Path, fold: str | None) -> Path:
        # a fold is a directory that itself holds decoded_features/
        folds = [d for d in _subdirs(roi_dir) if (roi_dir / d / "decoded_features").is_dir()]
        if fold is not None:
            if fold not in folds:
                raise DataError(
                    f"fold '{fold}' not found in {roi_dir} (folds present: {_preview(folds)})",
                    fix="choose one of the folds present, or leave the fold unset",
                )
            return roi_dir / fold / "decoded_features"
        if len(folds) > 1:
            raise ConfigError(
                f"{roi_dir} holds several folds ({_preview(folds)}) and no fold was given",
                fix=f"choose one: data.fold={folds[0]} (fold= when calling the reader)",
            )
        if folds:
            return roi_dir / folds[0] / "decoded_features"
        if (roi_dir / "decoded_features").is_dir():
            return roi_dir / "decoded_features"
        return roi_dir


class CaffeDecodedFeatures(_LayerFiles):
    """Decoded features in the Caffe-era layout; ``root`` is the ``decodedfeatures`` directory."""

    what = "decoded features"

    def __init__(
        self,
        root: str | os.PathLike,
        subject: int | str,
        roi: str = "VC",
        layers: Sequence[str] = (),
        feature_type: str = "natural",
        net: str = "VGG19",
    ) -> None:
        base = _check_root(root, self.what)
        subject = _subject_dir(subject, "caffe")
        locations = {}
        for layer in _check_layers(layers):
            directory = _descend(
                base,
                [
                    ("feature type", feature_type),
                    ("net", net),
                    ("layer", layer),
                    ("subject", subject),
                    ("ROI", roi),
                ],
            )
            # labels may contain '-': everything after this fixed prefix is the label
            locations[layer] = (directory, f"{feature_type}-{net}-{layer}-{subject}-{roi}-")
        super().__init__(locations)


class TrueFeatures(_LayerFiles):
    """True (image-computed) features, ``<root>/<layer>/<label>.mat`` (bdpy ``Features``)."""

    what = "true features"

    def __init__(self, root: str | os.PathLike, layers: Sequence[str]) -> None:
        base = _check_root(root, self.what)
        super().__init__(
            {layer: (_descend(base, [("layer", layer)]), "") for layer in _check_layers(layers)}
        )


def load_reference_std(path: str | os.PathLike, layers: Sequence[str]) -> dict[str, float]:
    """Per-layer reference feature std (e.g. ``estimated_vgg19_cnn_feat_std.mat``)."""
    path = Path(path)
    variables = load_mat_dict(path)
    missing = [layer for layer in _check_layers(layers) if layer not in variables]
    if missing:
        raise DataError(
            f"reference std file {path} has no entry for layer(s) {', '.join(missing)} "
            f"(variables present: {_preview(sorted(variables), 40)})",
            fix="use a std file estimated for the same network and layer names",
        )
    out = {}
    for layer in layers:
        value = np.asarray(variables[layer])
        if value.size != 1 or value.dtype.kind not in "biuf":
            raise DataError(
                f"reference std for layer {layer} in {path} is not one number "
                f"(shape {value.shape}, dtype {value.dtype})",
                fix="store one scalar std per layer",
            )
        std = float(value.reshape(()))
        # a zero std would scale the target to all zeros (the "black image" failure)
        if not math.isfinite(std) or std <= 0:
            raise DataError(
                f"reference std for layer {layer} in {path} is {std}; it must be positive",
                fix="re-estimate the std from true features of many images",
            )
        out[layer] = std
    return out


def load_act_range(path: str | os.PathLike, expected_len: int | None = 4096) -> np.ndarray:
    """Per-unit upper bounds of the generator input (e.g. ``act_range_3x_fc7.txt``) as float32."""
    path = Path(path)
    fix = "use the act_range text file shipped with the generator (whitespace-separated numbers)"
    if not path.is_file():
        raise DataError(f"act_range file not found: {path}", fix=fix)
    try:
        tokens = path.read_text().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read act_range file {path} ({exc})", fix=fix) from exc
    values = np.empty(len(tokens), dtype=np.float64)
    for i, token in enumerate(tokens):
        try:
            values[i] = float(token)
        except ValueError:
            raise DataError(
                f"act_range file {path}: value {i + 1} ({token!r}) is not a number", fix=fix
            ) from None
    if expected_len is not None and values.size != expected_len:
        raise DataError(
            f"act_range file {path}: expected {expected_len} values, found {values.size}",
            fix=f"use an act_range file with one bound per generator input unit; {fix}",
        )
    if values.size == 0:
        raise DataError(f"act_range file {path} is empty", fix=fix)
    if not np.isfinite(values).all():
        raise DataError(f"act_range file {path} contains NaN or inf", fix=fix)
    if (values < 0).any():
        first = int(np.argmax(values < 0))
        raise DataError(
            f"act_range file {path}: value {first + 1} is negative ({values[first]:g}); "
            "upper bounds must be >= 0",
            fix=fix,
        )
    return values.astype(np.float32)
