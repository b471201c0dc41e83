"""Shared test set-up."""

import os
from pathlib import Path

import pytest
from engine_helpers import torch_threads

REPO = Path(__file__).resolve().parents[1]


def _threads_per_worker() -> int | None:
    """Under pytest-xdist (addopts: -n 2): the CPU cores per worker; None in one process."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers) if workers > 1 else None


# Each worker and the runs it starts (train_recon.py subprocesses inherit the environment)
# use their share of the cores: with more threads than cores, OpenMP threads spin while
# they wait and the whole suite slows down.
WORKER_THREADS = _threads_per_worker()
if WORKER_THREADS is not None:
    os.environ.setdefault("OMP_NUM_THREADS", str(WORKER_THREADS))
# Folders of the checkout the tests must not write into (a run's defaults point there:
# data.root=data/demo, hydra.run.dir=outputs/...), and folders that must not appear at its
# root (Lightning's ./lightning_logs, Hydra's ./multirun, W&B's ./wandb).
GUARDED_DIRS = ("data", "outputs")
GUARDED_ROOT_NAMES = ("lightning_logs", "multirun", "wandb")


def checkout_listing() -> set[str]:
    """Every path under the guarded folders, and the guarded root names that exist."""
    found = {name for name in GUARDED_ROOT_NAMES if (REPO / name).exists()}
    for top in GUARDED_DIRS:
        for dirpath, dirnames, filenames in os.walk(REPO / top):
            rel = Path(dirpath).relative_to(REPO)
            found.update(str(rel / name) for name in (*dirnames, *filenames))
    return found


@pytest.fixture(scope="session", autouse=True)
def _checkout_stays_clean():
    """Fails the session (at the last test's teardown) if the tests added anything under the
    checkout's data/ or outputs/ (or ./lightning_logs, ./multirun, ./wandb), or removed
    anything there (data/README.md and outputs/README.md are committed). With pytest-xdist
    each worker checks what appeared between its first and its last test."""
    before = checkout_listing()
    yield
    after = checkout_listing()
    added, removed = sorted(after - before), sorted(before - after)
    assert not added, f"the tests wrote into the checkout (use tmp_path): {added[:20]}"
    assert not removed, f"the tests removed files from the checkout: {removed[:20]}"


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_nets(request):
    # Tiny networks run faster on one thread (two threads fight over 2 cores under load);
    # the slow real-size VGG19 tests keep torch's default, or the worker's share of the
    # cores under pytest-xdist.
    if not request.node.get_closest_marker("slow"):
        with torch_threads(1):
            yield
    elif WORKER_THREADS is not None:
        with torch_threads(WORKER_THREADS):
            yield
    else:
        yield


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests run where CUDA is usable (``python -m benchmarks.device_check``
    runs them on a lent GPU) and are skipped elsewhere; every other test picks its device
    explicitly (the CPU) and never moves to a GPU by itself."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
