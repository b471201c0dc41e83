"""Which GPU each job of a local multirun takes: job (shard) i on GPU i.

submitit's local launcher sets ``CUDA_VISIBLE_DEVICES`` for every job it starts: to
nothing with ``gpus_per_node: 0`` (every GPU hidden: ``trainer=auto`` silently runs on the
CPU) and to ``0`` with ``gpus_per_node: 1`` (every concurrent job on GPU 0). So the
launching process records the GPUs it sees (``remember_host_gpus``) in an environment
variable its jobs inherit, and each local job, before anything touches CUDA, narrows
``CUDA_VISIBLE_DEVICES`` to its own GPU (``pin_job_gpu``): shard i of a sharded run (or
job i of any other sweep) on the i-th GPU, modulo their number.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

HOST_GPUS_ENV = "ICNN_PL_HOST_GPUS"  # the launching process's GPUs, e.g. "0,1,2,3"


def visible_gpus(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch  # counts via NVML where Lightning set it up: no CUDA context is made

    return [str(i) for i in range(torch.cuda.device_count())]


def remember_host_gpus(environ: MutableMapping[str, str] | None = None) -> None:
    """In the launching process: record its GPUs for the jobs it starts (kept if set)."""
    environ = os.environ if environ is None else environ
    if HOST_GPUS_ENV not in environ:  # visible_gpus may ask torch: only when needed
        environ[HOST_GPUS_ENV] = ",".join(visible_gpus(environ))


def job_gpu(host_gpus: list[str], shard: int, num_shards: int, job_num: int) -> str:
    """The GPU of a job: shard ``shard`` of a sharded run, else sweep job ``job_num``,
    on the host's GPUs in turn; ``""`` (the CPU) on a host without GPUs."""
    if not host_gpus:
        return ""
    sharded = isinstance(shard, int) and isinstance(num_shards, int) and num_shards > 1
    slot = shard if sharded else job_num
    return host_gpus[slot % len(host_gpus)]


def pin_job_gpu(shard: int, num_shards: int, job_num: int,
                environ: MutableMapping[str, str] | None = None) -> str | None:
    """In a job started by submitit's local launcher: show it only its own GPU (before
    CUDA starts). Returns the GPU it got (``""``: none), None where nothing was changed
    (any other launcher: SLURM assigns GPUs itself, a single run keeps its settings)."""
    environ = os.environ if environ is None else environ
    if environ.get("SUBMITIT_EXECUTOR") != "local" or HOST_GPUS_ENV not in environ:
        return None
    host = [g for g in environ[HOST_GPUS_ENV].split(",") if g]
    gpu = job_gpu(host, shard, num_shards, job_num)
    environ["CUDA_VISIBLE_DEVICES"] = gpu
    log.info("local job %d (shard %d of %d): GPU %s", job_num, shard, num_shards,
             gpu or "none (CPU)")
    return gpu
