"""BData (``.h5``), the lab's fMRI file format, read (and written) without bdpy.

Layout (bdpy 0.26 ``BData.save``; older files spell ``dataSet`` / ``metaData``):
``/dataset`` samples x columns; ``/metadata/key``, ``/metadata/description`` (bytes, one
per key) and ``/metadata/value`` (keys x columns, NaN where a key does not apply);
``/vmap/<key>/<value>`` the label of each numeric value of a label column (bdpy's
``get_label``). Voxel columns are flagged by ``VoxelData`` and ``ROI_<name>`` (1 = in);
a label column by its key (e.g. ``stimulus_name``) being 1 on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from icnn_pl.atomic import atomic_path
from icnn_pl.errors import ConfigError, DataError


@dataclass
class Trials:
    """The samples of one ROI: ``X`` (samples x voxels) and one label per sample."""

    X: np.ndarray
    labels: list[str]

    def averaged(self) -> Trials:
        """One sample per label, the mean of its repeats (the lab's test set), labels in
        order of first appearance."""
        order = list(dict.fromkeys(self.labels))
        where = {lab: i for i, lab in enumerate(order)}
        idx = np.array([where[lab] for lab in self.labels])
        sums = np.zeros((len(order), self.X.shape[1]))
        np.add.at(sums, idx, self.X)
        return Trials(sums / np.bincount(idx)[:, None], order)


def _pick(fh: h5py.File, *names: str) -> str:
    for n in names:
        if n in fh:
            return n
    raise DataError(f"{fh.filename}: not a BData file (no {' or '.join(names)})",
                    "give the .h5 that bdpy's BData.save wrote")


def _text(x: bytes | str) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _label_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def read_bdata(path: str | os.PathLike, roi: str, label_key: str = "stimulus_name") -> Trials:
    """The voxels of ``ROI_<roi>`` (and ``VoxelData``, when flagged) and the labels of every
    sample, numbers mapped to names through ``/vmap/<label_key>``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"fMRI file not found: {path}", "set fmri.train / fmri.test to a BData .h5")
    try:
        with h5py.File(path, "r") as fh:
            md = fh[_pick(fh, "metadata", "metaData")]
            keys = [_text(k) for k in md["key"][()]]
            value = np.asarray(md["value"][()], dtype=np.float64)
            data = fh[_pick(fh, "dataset", "dataSet")]
            vmap = {}
            if "vmap" in fh and label_key in fh["vmap"]:
                g = fh["vmap"][label_key]
                vmap = {float(k): _text(g[k][()]) for k in g}
            roi_key = f"ROI_{roi}"
            if roi_key not in keys:
                rois = sorted(k[4:] for k in keys if k.startswith("ROI_"))
                raise ConfigError(f"{path.name}: no ROI {roi!r} (no metadata key {roi_key})",
                                  f"use roi= one of {rois}")
            cols = value[keys.index(roi_key)] == 1
            if "VoxelData" in keys:
                cols &= value[keys.index("VoxelData")] == 1
            if not cols.any():
                raise DataError(f"{path.name}: ROI {roi!r} has no voxels", "choose another roi=")
            if label_key not in keys:
                raise ConfigError(f"{path.name}: no label column {label_key!r}",
                                  f"set fmri.label_key to one of {keys[:20]}")
            label_cols = np.nonzero(value[keys.index(label_key)] == 1)[0]
            if label_cols.size != 1:
                raise DataError(f"{path.name}: {label_key!r} flags {label_cols.size} columns,"
                                " not one", "set fmri.label_key to a single label column")
            col_idx = np.nonzero(cols)[0]
            X = np.asarray(data[:, col_idx[0]:col_idx[-1] + 1], dtype=np.float64)
            X = X[:, col_idx - col_idx[0]]
            raw = np.asarray(data[:, int(label_cols[0])], dtype=np.float64)
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: cannot read as BData ({exc})",
                        "give the .h5 that bdpy's BData.save wrote") from exc
    labels = [vmap.get(float(v), _label_text(v)) if vmap else _label_text(v) for v in raw]
    return Trials(X, labels)


def write_bdata(path: str | os.PathLike, columns: Sequence[tuple[str, np.ndarray, str]],
                flags: Sequence[tuple[str, np.ndarray, str]] = (),
                vmaps: dict[str, dict[float, str]] | None = None) -> None:
    """Write a BData file as bdpy does, atomically.

    ``columns``: ``(key, block, description)``, each block (samples x n) added as bdpy's
    ``add`` does (its key is 1 on its own columns); ``flags``: extra metadata rows over all
    columns (``ROI_*``, voxel coordinates), NaN where they do not apply.
    """
    blocks = [np.asarray(b, dtype=np.float64).reshape(len(b), -1) for _, b, _ in columns]
    data = np.hstack(blocks)
    keys, descs, rows = [], [], []
    start = 0
    for (key, _, desc), b in zip(columns, blocks, strict=True):
        row = np.full(data.shape[1], np.nan)
        row[start:start + b.shape[1]] = 1
        keys.append(key), descs.append(desc or f"1 = {key}"), rows.append(row)
        start += b.shape[1]
    for key, row, desc in flags:
        keys.append(key), descs.append(desc), rows.append(np.asarray(row, dtype=np.float64))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("dataset", data=data)
        fh.create_dataset("metadata/key", data=[k.encode() for k in keys])
        fh.create_dataset("metadata/description", data=[d.encode() for d in descs])
        fh.create_dataset("metadata/value", data=np.vstack(rows))
        fh.create_group("vmap")
        for key, vm in (vmaps or {}).items():
            for v, name in vm.items():
                fh.create_dataset(f"vmap/{key}/{v!r}", data=name.encode())
