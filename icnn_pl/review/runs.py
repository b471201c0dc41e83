"""Finished run directories, read back: settings, raw reconstructions, losses, true images.

A run directory is what one ``train_recon.py`` job leaves: ``run_info.json``,
``results.csv/json`` and ``<outputs>/recon_image-<label>.mat`` (raw reconstruction). A Hydra
multirun directory holds several run directories; :func:`find_runs` finds them all. True
images are the stimulus files resized (bicubic) to the encoder's input size, read through
:class:`icnn_pl.data.images.ImageFolder` as the pipeline does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icnn_pl.data.images import ImageFolder
from icnn_pl.data.matio import load_mat_dict
from icnn_pl.errors import DataError
from icnn_pl.pipeline.outputs import RUN_INFO, recon_mat_path


@dataclass
class Run:
    """One run directory, read: settings, raw reconstructions, losses and true images."""

    path: Path
    info: dict[str, Any]
    recons: dict[str, np.ndarray] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)
    trues: dict[str, np.ndarray] = field(default_factory=dict)
    note: str | None = None  # why (some) images are not scored

    @property
    def layers(self) -> str:
        return _layers_str(self.info.get("layers"))

    @property
    def ident(self) -> dict[str, str]:
        return {k: str(self.info.get(k, "?")) for k in ("method", "subject", "roi")}

    @property
    def title(self) -> str:
        i = self.ident
        return f"{i['method']} {i['subject']} {i['roi']} [{self.layers}]"


def _layers_str(layers: Any) -> str:
    if layers is None:
        return "-"
    if isinstance(layers, list | tuple):
        return ",".join(str(x) for x in layers)
    return str(layers)


def read_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_INFO
    if not path.is_file():
        raise DataError(f"{run_dir} is not a run directory (no {RUN_INFO})",
                        "pass a directory written by train_recon.py (or a multirun parent)")
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}",
                        "re-run the job (its run_info.json is written at the end)") from exc
    if not isinstance(info, dict):
        raise DataError(f"{path} does not hold a JSON object", "re-run the job")
    return info


def _outputs_dir(run_dir: Path, info: Mapping[str, Any]) -> Path:
    rel = info.get("outputs") or Path(str(info.get("subject", ""))) / str(info.get("roi", ""))
    return run_dir / rel


def finished_labels(run_dir: Path, info: Mapping[str, Any]) -> list[str]:
    """Labels whose ``.mat`` exists: run_info's list, or every ``recon_image-*.mat``."""
    out = _outputs_dir(run_dir, info)
    listed = info.get("labels")
    if isinstance(listed, list) and listed:
        labels = [str(lab) for lab in listed]
    else:
        labels = sorted(p.stem.removeprefix("recon_image-") for p in out.glob("recon_image-*.mat"))
    labels = [lab for lab in labels if recon_mat_path(out, lab).is_file()]
    if not labels:
        raise DataError(f"run {run_dir} has no finished images in {out}",
                        "run (or resume) the job until at least one image is finished")
    return labels


def load_run(run_dir: str | os.PathLike, labels: Sequence[str] | None = None) -> Run:
    """Read a run's reconstructions (all finished ones, or ``labels``) and true images."""
    path = Path(run_dir)
    info = read_info(path)
    run = Run(path, info)
    finished = finished_labels(path, info)
    if labels is not None:
        missing = [lab for lab in labels if lab not in finished]
        if missing:
            raise DataError(f"run {path} has no finished image(s) {missing[:5]}",
                            "pick labels that every compared run has finished")
        finished = list(labels)
    out = _outputs_dir(path, info)
    for lab in finished:
        data = load_mat_dict(recon_mat_path(out, lab))
        if "recon_image" not in data:
            raise DataError(f"{recon_mat_path(out, lab)} has no variable 'recon_image'",
                            "delete the file and resume the job to redo the image")
        run.recons[lab] = np.asarray(data["recon_image"], dtype=np.float64)
        hist = np.ravel(np.asarray(data.get("loss_history", []), dtype=np.float64))
        run.final_loss[lab] = float(hist[-1]) if hist.size else float("nan")

    stimuli = info.get("stimuli")
    if not stimuli:
        run.note = "no stimulus images (run_info.json 'stimuli' is null): not scored"
        return run
    first = next(iter(run.recons.values()))
    size = tuple(info.get("input_size") or first.shape[:2])
    try:
        folder = ImageFolder(stimuli, (int(size[0]), int(size[1])))
    except DataError as exc:
        raise DataError(f"run {path}: {exc.problem}",
                        f"restore the stimulus folder or edit 'stimuli' in {path / RUN_INFO}"
                        ) from exc
    run.trues = {lab: folder.image(lab) for lab in finished if lab in folder}
    if len(run.trues) < len(finished):
        run.note = f"no true image in {folder.folder}: not scored"
    return run



def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Every directory at or below ``paths`` that holds a ``run_info.json``, sorted."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"path not found: {p}",
                            "pass a run directory or a Hydra multirun directory that exists")
        if p.is_file():
            if p.name != RUN_INFO:
                raise DataError(f"{p} is a file, not a run directory",
                                "pass a run directory or a Hydra multirun directory")
            found.add(p.parent.resolve())
            continue
        found.update(f.parent.resolve() for f in p.rglob(RUN_INFO) if f.is_file())
    if not found:
        raise DataError(f"no run directories ({RUN_INFO}) found under "
                        f"{', '.join(str(p) for p in paths)}",
                        "pass the output directory of finished train_recon.py job(s)")
    return sorted(found)
