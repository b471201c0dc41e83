"""Files a job leaves behind, written atomically so a crash never leaves half a file.

Per image, under ``<run dir>/<subject>/<roi>/``: ``recon_image-<label>.mat`` (the raw
HxWx3 RGB float image ``recon_image``, ``loss_history`` and, for DGN methods, the final
code ``recon_gen_feat``) and ``recon_image-<label>.png`` (display image). The ``.mat`` is
written last and marks the image as finished: a re-run skips it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from icnn_pl.atomic import atomic_path, remove_stale_temps, temp_prefix, write_text_atomic
from icnn_pl.data.matio import load_mat_dict, save_mat
from icnn_pl.errors import ConfigError, DataError
from icnn_pl.image import display_image

log = logging.getLogger(__name__)

RUN_INFO = "run_info.json"  # what a job was: its presence marks a run directory


def check_writable_dir(folder: str | Path, key: str = "hydra.run.dir") -> None:
    """Create ``folder`` if needed and write a probe file there: a read-only or impossible
    output directory fails now, with the setting to change, not after the first image."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # named like a temporary file: swept if the process is killed right here
        with tempfile.NamedTemporaryFile(dir=folder, prefix=temp_prefix("write-test"),
                                         suffix=".tmp"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the output directory {folder}: {exc.strerror or exc}",
            f"choose a writable directory: {key}=<path> (the default is outputs/ under the"
            " directory you run from)") from exc


def recon_mat_path(outputs_dir: Path, label: str) -> Path:
    """The finished-image file of ``label`` (its existence marks the image done)."""
    return Path(outputs_dir) / f"recon_image-{label}.mat"


class ReconOutputs:
    """Paths and writers for one (subject, ROI) of a run directory."""

    def __init__(self, run_dir: str | Path, subject: str, roi: str) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / subject / roi
        check_writable_dir(self.dir)
        # leftovers of a job killed mid-write (kill -9, power loss): never read, but not kept
        stale = remove_stale_temps(self.run_dir) + remove_stale_temps(self.dir, recursive=True)
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted job", len(stale))

    def mat_path(self, label: str) -> Path:
        return recon_mat_path(self.dir, label)

    def png_path(self, label: str) -> Path:
        return self.dir / f"recon_image-{label}.png"

    def is_done(self, label: str) -> bool:
        return self.mat_path(label).is_file()

    def write(self, label: str, image: np.ndarray, loss_history: np.ndarray,
              code: np.ndarray | None = None, meta: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
        """PNG first, then the ``.mat`` that marks the image finished; returns the
        variables written (what ``read`` gives back), so the job need not read them."""
        with atomic_path(self.png_path(label)) as tmp:
            Image.fromarray(display_image(image)).save(tmp, format="PNG")
        variables: dict[str, Any] = {
            "recon_image": np.asarray(image, dtype=np.float32),
            "loss_history": np.asarray(loss_history, dtype=np.float32),
        }
        if code is not None:
            variables["recon_gen_feat"] = np.asarray(code, dtype=np.float32)
        for k, v in (meta or {}).items():
            variables[k] = v
        save_mat(self.mat_path(label), variables)
        return variables

    def read(self, label: str) -> dict[str, np.ndarray]:
        """A finished image's variables (raises DataError if unreadable)."""
        return load_mat_dict(self.mat_path(label))


FAILURES = "failures.json"  # label -> reason, for every shard and launch of the job


def update_failures(outputs: ReconOutputs, failures: Mapping[str, str]) -> dict[str, str]:
    """Merge this process's failed images into the job's ``failures.json`` and return the
    job's failures. Every other entry (other shards', other launches') is kept until its
    image is finished: a failure is removed only by that image's success, never by a
    launch that merely did not run the image. Call it under the job's report lock
    (``pipeline.claims``): read, merge and write are not atomic together."""
    merged = {lab: why for lab, why in read_failures(outputs).items()
              if not outputs.is_done(lab)}
    merged.update(failures)
    path = outputs.run_dir / FAILURES
    if merged or path.exists():
        write_text_atomic(path, json.dumps(merged, indent=2))
    return merged


def read_failures(outputs: ReconOutputs) -> dict[str, str]:
    """The job's ``failures.json`` (label -> reason); {} when absent or unreadable (it is
    rebuilt from what the launches report from then on)."""
    path = outputs.run_dir / FAILURES
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        known = {}
    return {str(k): str(v) for k, v in known.items()} if isinstance(known, dict) else {}


def write_table(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as CSV (``.csv``) or JSON (``.json``), atomically; NaN becomes empty / null."""
    path = Path(path)
    if path.suffix == ".json":
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                  for k, v in r.items()} for r in rows]
        write_text_atomic(path, json.dumps(clean, indent=2, default=_jsonable))
        return
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v)
                         for k, v in r.items()})
    write_text_atomic(path, buf.getvalue())


def read_table(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"results file {path} is corrupt: {exc}", "delete it to rebuild") from exc


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
