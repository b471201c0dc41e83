"""Where a job's files go: its directory name, and the shards that share it.

* A job's directory is named after its overrides (``${icnn.run_name:...}`` in
  ``conf/config.yaml``): the same command writes to the same directory, so a re-run resumes.
* **Shards.** ``data.num_shards=N data.shard=i`` runs every N-th image of a job. The shard
  keys are not part of the job's directory name, so all shards of a job share ONE results
  directory (per-image files never collide: the shards are disjoint). Each shard's own
  records (Hydra's ``.hydra/``, the log, the W&B / CSV / TensorBoard run) go to
  ``<job dir>/shard-<i>of<N>/`` (:func:`shard_dir`), so shards running at the same time
  never write the same file. Tables are rebuilt from every finished image of the job by
  whichever shard ends last (and by any re-run), one shard at a time under the job's
  report lock (``pipeline.claims``); ``failures.json`` collects every shard's failures.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def run_name(overrides: str | None) -> str:
    """A directory name from the override string; long ones (e.g. many labels) are cut
    and made unique with a hash, to stay under the file system's 255-byte limit."""
    name = (overrides or "default").replace("/", "_")
    if len(name.encode()) > 200:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[:180].decode(errors="ignore") + "-" + digest
    return name


def shard_name(num_shards: int, shard: int) -> str:
    """``shard-<i>of<N>``, or "" for an unsharded job."""
    return f"shard-{int(shard)}of{int(num_shards)}" if int(num_shards) > 1 else ""


def shard_dir(num_shards: int, shard: int) -> str:
    """``${icnn.shard_dir:...}``: the suffix of a job's Hydra directory ("" or
    ``/shard-<i>of<N>``): a shard's own records live below the job's shared directory."""
    name = shard_name(num_shards, shard)
    return f"/{name}" if name else ""


def results_dir(run_dir: str | os.PathLike, num_shards: int, shard: int) -> Path:
    """Where a job's images and tables go: the shared job directory above a shard's own
    directory, else the run directory itself (e.g. an explicit ``hydra.run.dir``)."""
    run_dir = Path(run_dir)
    name = shard_name(num_shards, shard)
    return run_dir.parent if name and run_dir.name == name else run_dir
