"""Every image of a launch's shard accounted for (#21 items 1, 2, 5): launches that
overlap or are requeued. The other launch is a claim file written by the test (a live
process on this host, a dead node, an earlier incarnation of this SLURM task), so each
interleaving is set, not hoped for; two real overlapping launches are in
``test_concurrent_launch.py``."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from pipeline_helpers import tiny_encoder, tiny_job

from icnn_pl.errors import DataError
from icnn_pl.pipeline import claims as claims_mod
from icnn_pl.pipeline import job as job_mod
from icnn_pl.pipeline.claims import HOST, Claims
from icnn_pl.pipeline.job import run_job
from icnn_pl.pipeline.outputs import FAILURES

LABELS = ("img_a", "img_x")


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder(0)


@pytest.fixture(autouse=True)
def quick_wait(monkeypatch):
    monkeypatch.setattr(job_mod, "WAIT_POLL_S", 0.05, raising=False)


def _job(encoder, run_dir, **kw):
    return tiny_job(encoder, run_dir, labels=LABELS, layers=("c1", "c2"), feature_fit=False,
                    **kw)


def _claim_image(job, label, **owner):
    path = Claims(job.outputs.dir).path(f"recon_image-{label}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": "then", "token": "theirs", **owner}))
    return path


def _run_in_thread(job):
    out: list = []
    t = threading.Thread(target=lambda: out.append(run_job(job)))
    t.start()
    return t, out


def _wait_until(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_failure_of_another_launch_is_waited_for_and_kept(encoder, tmp_path):
    """Launch A (a live process) holds img_x and fails it while B runs: B waits for it,
    and B ending last keeps img_x in failures.json and run_info.json (before: B dropped
    it and exited 0 with img_x neither done nor listed)."""
    job = _job(encoder, tmp_path)
    claim = _claim_image(job, "img_x", host=HOST, pid=os.getppid())  # alive
    t, result = _run_in_thread(job)
    _wait_until(lambda: job.outputs.is_done("img_a"))
    time.sleep(0.3)
    assert t.is_alive()  # B waits for A's image
    (tmp_path / FAILURES).write_text(json.dumps({"img_x": "A: diverged"}))  # A fails it,
    claim.unlink()  # then releases its claim
    t.join(60)
    summary = result[0]
    assert summary.failures == {"img_x": "A: diverged"}  # B's shard has a failed image
    assert json.loads((tmp_path / FAILURES).read_text()) == {"img_x": "A: diverged"}
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["failures"] == {"img_x": "A: diverged"} and info["labels"] == ["img_a"]


def test_a_finished_image_of_another_launch_is_waited_for_and_reported(encoder, tmp_path):
    job = _job(encoder, tmp_path)
    claim = _claim_image(job, "img_x", host=HOST, pid=os.getppid())
    t, result = _run_in_thread(job)
    _wait_until(lambda: job.outputs.is_done("img_a"))
    other = _job(encoder, tmp_path / "elsewhere")  # "A" computes img_x
    run_job(other)
    (job.outputs.dir / "recon_image-img_x.mat").write_bytes(
        other.outputs.mat_path("img_x").read_bytes())
    claim.unlink()
    t.join(60)
    assert result[0].failures == {}
    assert [r["label"] for r in result[0].rows] == ["img_a", "img_x"]


def test_a_failure_is_removed_only_by_that_images_success(encoder, tmp_path):
    (tmp_path / FAILURES).write_text(json.dumps({"img_x": "earlier", "img_other": "shard 2"}))
    job = _job(encoder, tmp_path)
    summary = run_job(job)
    assert summary.failures == {}
    assert json.loads((tmp_path / FAILURES).read_text()) == {"img_other": "shard 2"}


def test_an_image_whose_owner_went_stale_is_taken_over_and_done(encoder, tmp_path,
                                                               monkeypatch):
    """Another host's claim, fresh when B starts, not refreshed since: B waits, then
    takes it over when it expires and reconstructs the image."""
    monkeypatch.setattr(claims_mod, "TIMEOUT_S", 1.5)
    job = _job(encoder, tmp_path)
    _claim_image(job, "img_x", host="node-7", pid=1)
    summary = run_job(job)
    assert summary.failures == {} and job.outputs.is_done("img_x")
    assert not list(tmp_path.rglob("*.claim*"))


def test_a_requeued_task_redoes_the_image_in_flight_at_once(encoder, tmp_path, monkeypatch):
    """#21 item 2: the node died in img_x; SLURM requeued the task on another host within
    the claim timeout. The requeued task takes its earlier incarnation's claim over at
    once (before: img_x was left to the dead owner, the job exited 0 without it)."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    job = _job(encoder, tmp_path)
    _claim_image(job, "img_x", host="node-that-died", pid=4321, slurm_task="777//",
                 restart=0)
    t0 = time.monotonic()
    summary = run_job(job)
    assert time.monotonic() - t0 < 60  # not after the 10-minute claim timeout
    assert summary.failures == {} and job.outputs.is_done("img_x")
    assert not list(tmp_path.rglob("*.claim*"))


def test_leftover_claim_of_a_finished_image_is_removed(encoder, tmp_path):
    """kill -9 between the .mat rename and the release: a re-run removes the claim."""
    import subprocess
    import sys

    run_job(_job(encoder, tmp_path))
    job = _job(encoder, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim = _claim_image(job, "img_x", host=HOST, pid=dead.pid)
    run_job(job)
    assert not claim.exists()


def test_a_launch_that_stops_early_leaves_no_launch_claim(encoder, tmp_path, monkeypatch):
    job = _job(encoder, tmp_path, launch=Claims(tmp_path, heartbeat=0.05))
    assert job.launch.claim("launch") is None

    def broken(labels):
        raise DataError("the feature store is gone", "fix it")

    monkeypatch.setattr(job.datamodule, "check", broken)
    with pytest.raises(DataError):
        run_job(job)
    assert not job.launch.path("launch").exists()
    assert job.launch._thread is None  # heartbeat stopped
