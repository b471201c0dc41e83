"""Decode one layer for one (subject, ROI), chunk by chunk, resumable, in the lab's layout.

Outputs under ``<out>/<layer>/<subject>/<roi>/``:

- ``<label>.mat``: decoded features of each test image, ``feat`` ``(1, *unit_shape)``
  float32 (the layout ``train_recon.py data=decoded`` reads);
- ``model/``: ``x_mean``, ``x_norm`` (1 x voxels), ``y_mean``, ``y_norm``, ``b``
  (``(1, *unit_shape)``), and the weights per chunk, ``W/<chunk>.mat`` with ``units``
  (first, last+1 of the flattened layer) and, by ``save_weights``: ``sparse`` (default)
  ``index`` and ``weight`` (units x k: the selected voxels and their weights), ``dense``
  ``W`` (voxels x units, fastl2lir's, zero off the selection: v/k times larger), ``none``;
  all in the normalised space; ``info.json`` last: its presence means the layer is done.

Each finished chunk's predictions go to ``.chunks/<i>.npz`` first (atomically), so a killed
run redoes at most the chunk in flight; the plan (chunk size, k, alpha, voxel count) is
kept beside them and a changed plan starts the layer over.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icnn_pl.atomic import atomic_path, write_text_atomic
from icnn_pl.data.matio import save_mat
from icnn_pl.decoding.decoder import ChunkFit, TopKRidge, zscore_stats

log = logging.getLogger(__name__)


@dataclass
class LayerResult:
    pred: np.ndarray        # test images x units, de-normalised
    y_mean: np.ndarray      # units (training mean over trials)
    unit_shape: tuple[int, ...]
    seconds: float
    chunks: int
    resumed: int


def layer_dir(out: Path, layer: str, subject: str, roi: str) -> Path:
    return Path(out) / layer / subject / roi


def is_done(out: Path, layer: str, subject: str, roi: str) -> bool:
    return (layer_dir(out, layer, subject, roi) / "model" / "info.json").exists()


def decode_layer(decoder: TopKRidge, F: np.ndarray, rows: np.ndarray,
                 unit_shape: tuple[int, ...], test_labels: Sequence[str], where: Path,
                 chunk: int, save_weights: str) -> LayerResult:
    """Fit and predict every unit of the layer. ``F``: images x units (memory or memmap);
    ``rows``: the image row of each training trial (repeats included)."""
    units = F.shape[1]
    chunks_dir, model_dir = where / ".chunks", where / "model"
    plan = {"chunk": chunk, "units": units, "k": decoder.k, "alpha": decoder.alpha,
            "voxels": decoder.v, "samples": decoder.n, "dtype": str(decoder.dtype),
            "test": list(test_labels)}
    plan_file = chunks_dir / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != plan:
        log.info("%s: settings changed since the last run; starting the layer over", where)
        shutil.rmtree(chunks_dir)
    chunks_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan_file, json.dumps(plan))
    t0, resumed = time.perf_counter(), 0
    starts = range(0, units, chunk)
    for i, s in enumerate(starts):
        path = chunks_dir / f"{i:06d}.npz"
        if path.exists():
            resumed += 1
            continue
        e = min(s + chunk, units)
        Y = np.asarray(F[:, s:e])[rows]            # trials x units of this chunk
        y_mean, y_norm = zscore_stats(Y)
        fit = decoder.fit_predict(Y, y_mean, y_norm)
        save_weights_chunk(model_dir / "W" / f"{i:06d}.mat", fit, (s, e), save_weights)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, pred=fit.pred.double().cpu().numpy(), b=fit.b.double().cpu().numpy(),
                     y_mean=y_mean, y_norm=y_norm)
    parts = [np.load(chunks_dir / f"{i:06d}.npz") for i in range(len(starts))]
    pred = np.concatenate([p["pred"] for p in parts], 1)
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("b", "y_mean", "y_norm")}
    for j, lab in enumerate(test_labels):
        save_mat(where / f"{lab}.mat", {"feat": pred[j].reshape(1, *unit_shape).astype(np.float32)})
    for k, v in cat.items():
        save_mat(model_dir / f"{k}.mat", {k: v.reshape(1, *unit_shape).astype(np.float32)})
    save_mat(model_dir / "x_mean.mat", {"x_mean": decoder.x_mean[None].astype(np.float32)})
    save_mat(model_dir / "x_norm.mat", {"x_norm": decoder.x_norm[None].astype(np.float32)})
    seconds = time.perf_counter() - t0
    return LayerResult(pred, cat["y_mean"], unit_shape, seconds, len(starts), resumed)


WEIGHT_FORMATS = ("sparse", "dense", "none")


def save_weights_chunk(path: Path, fit: ChunkFit, units: tuple[int, int], how: str) -> None:
    """One chunk's weights in the ``save_weights`` format (plain ridge: always dense)."""
    if how == "none":
        return
    span = np.array(units)
    if how == "dense" or fit.index is None:
        save_mat(path, {"W": fit.W.float().cpu().numpy(), "units": span})
    else:
        save_mat(path, {"index": fit.index.cpu().numpy().astype(np.int32),
                        "weight": fit.weight.float().cpu().numpy(), "units": span})


def finish_layer(where: Path, info: dict) -> None:
    """Mark the layer done (``model/info.json``) and drop the chunk files."""
    write_text_atomic(where / "model" / "info.json", json.dumps(info, indent=1))
    shutil.rmtree(where / ".chunks", ignore_errors=True)
