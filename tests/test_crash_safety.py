"""Crash safety of a real job (``python train_recon.py`` in a subprocess, real signals).

* ``kill -9`` in the middle of a job, then the same command again: the image finished
  before the kill is kept (not recomputed), the one in flight is redone, no temporary or
  partial file remains, and every final image equals that of an uninterrupted run.
* Ctrl-C (SIGINT): the job stops after the current iteration with exit code 130, keeps
  the finished images, says the command that resumes; that command finishes the job.

A failing image (reported, skipped, listed at the end, exit 1; ``fail_fast`` stops at the
first) is in ``test_bad_input_catalogue.py`` (``features_nan``, ``features_nan_fail_fast``).

Three images of 100 iterations each (~1 s per image here), one thread per process so the
reference run beside them is fast and deterministic.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from pipeline_helpers import (
    ENTRY,
    REPO,
    TINY,
    child_env,
    read_results,
    with_defaults,
    write_decoded_bdpy,
    write_std_ref,
)

pytestmark = pytest.mark.slow

LABELS = ("img_a", "img_b", "img_c")


class Job:
    """``python train_recon.py <args> hydra.run.dir=<run_dir>`` started in the background,
    its output in a file (a pipe could fill up and stall it)."""

    def __init__(self, args: list[str], run_dir: Path) -> None:
        self.run_dir = run_dir
        self.out = run_dir.parent / f"{run_dir.name}.log"
        env = child_env() | {"OMP_NUM_THREADS": "1"}
        with open(self.out, "w") as log:
            # SIGINT at its default: a background shell starts children with it ignored,
            # and Python then never turns it into KeyboardInterrupt
            self.proc = subprocess.Popen(
                [sys.executable, ENTRY, *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def mats(self) -> Path:
        return self.run_dir / "sub-01" / "VC"

    def wait_for_first_image(self, timeout: float = 180) -> float:
        """Block until the first image is finished; returns when (perf_counter)."""
        mat = self.mats() / f"recon_image-{LABELS[0]}.mat"
        end = time.perf_counter() + timeout
        while not mat.exists():
            assert self.proc.poll() is None, f"job ended early:\n{self.text()[-3000:]}"
            assert time.perf_counter() < end, f"no first image:\n{self.text()[-3000:]}"
            time.sleep(0.02)
        return time.perf_counter()

    def image_seconds(self, label: str, timeout: float = 30) -> float:
        """How long ``label`` took, from the job's log line."""
        pattern = re.compile(rf"{label}: final loss .* evaluations, ([0-9.]+) s")
        end = time.perf_counter() + timeout
        while not (m := pattern.search(self.text())):
            assert time.perf_counter() < end, self.text()[-3000:]
            time.sleep(0.02)
        return float(m.group(1))

    def finish(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout)

    def text(self) -> str:
        return self.out.read_text()


@pytest.fixture(scope="module")
def job_args(tmp_path_factory) -> list[str]:
    base = tmp_path_factory.mktemp("crash-inputs")
    write_decoded_bdpy(base / "decoded", "sub-01", "VC", LABELS)
    return with_defaults(TINY, [
        "method=icnn_gd", "method.n_iter=100", "layers=conv1", "logger=csv", "data=decoded",
        f"data.root={base / 'decoded'}", f"data.std_ref={write_std_ref(base / 'std.mat')}"])


@pytest.fixture(scope="module")
def reference(job_args, tmp_path_factory) -> Job:
    """The same job, uninterrupted (started now; tests wait for it when they need it)."""
    return Job(job_args, tmp_path_factory.mktemp("crash-ref") / "run")


def finished(run: Job) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run.mats().glob("recon_image-*.mat"))}


def temporaries(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp"))


def assert_same_images(run: Job, reference: Job) -> None:
    assert reference.finish() == 0, reference.text()[-3000:]
    for lab in LABELS:
        got, want = (scipy.io.loadmat(r.mats() / f"recon_image-{lab}.mat")["recon_image"]
                     for r in (run, reference))
        assert np.array_equal(got, want), f"{lab}: max diff {np.abs(got - want).max()}"
    rows, _ = read_results(run.run_dir)
    assert [r["label"] for r in rows] == list(LABELS)  # the table has every image


def test_kill9_then_rerun_equals_uninterrupted_run(job_args, reference, tmp_path):
    from icnn_pl.atomic import _HOST

    victim = Job(job_args, tmp_path / "run")
    victim.wait_for_first_image()
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.finish() == -signal.SIGKILL
    before = finished(victim)
    assert f"recon_image-{LABELS[-1]}.mat" not in before, "killed too late"
    # the killed job's claim on its image in flight (and on the run) outlives it
    assert list(victim.run_dir.rglob("*.claim"))
    # what a kill during a write leaves (the temporary file of a dead writer)
    stale = victim.mats() / f".recon_image-{LABELS[1]}.mat.{_HOST}-{victim.proc.pid}-x1y2z3.tmp"
    stale.write_bytes(b"half a file")

    t0 = time.perf_counter()
    again = Job(job_args, victim.run_dir)
    assert again.finish() == 0, again.text()[-3000:]
    seconds = time.perf_counter() - t0
    text = again.text()
    assert f"resuming: {len(before)} of {len(LABELS)} images already finished" in text
    # the planted file, and any temporary (claim, table) the kill itself left
    removed = re.search(r"removed (\d+) temporary file\(s\) left by an interrupted job", text)
    assert removed and int(removed.group(1)) >= 1, text[-3000:]
    assert {name: finished(again)[name] for name in before} == before  # not recomputed
    assert "img_a: final loss" not in text and "img_c: final loss" in text
    assert temporaries(victim.run_dir) == []
    # the dead owner's claims were taken over (same host, PID gone) and released (#14)
    assert "taking over" in text and list(victim.run_dir.rglob("*.claim")) == []
    assert_same_images(again, reference)
    print(f"\nkill -9 after {len(before)} finished image(s); re-run to the end {seconds:.1f} s")


def test_ctrl_c_stops_after_the_iteration_and_the_same_command_resumes(
        job_args, reference, tmp_path):
    run = Job(job_args, tmp_path / "run")
    first = run.wait_for_first_image()
    time.sleep(0.3 * run.image_seconds(LABELS[0]))  # part-way through the second image
    sent = time.perf_counter()
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=60) == 130, run.text()[-3000:]
    stop = time.perf_counter() - sent
    text = run.text()
    assert "Ctrl-C: stopping after the current iteration" in text
    assert f"finished images are kept in {run.run_dir}" in text
    assert "to resume, run the same command again: python train_recon.py" in text
    assert "Traceback" not in text, text[-3000:]
    kept = finished(run)
    assert set(kept) == {f"recon_image-{LABELS[0]}.mat"}, sorted(kept)
    assert not (run.mats() / f"recon_image-{LABELS[1]}.png").exists()
    assert temporaries(run.run_dir) == []

    again = Job(job_args, run.run_dir)  # the command the message gives
    assert again.finish() == 0, again.text()[-3000:]
    assert f"resuming: 1 of {len(LABELS)} images already finished" in again.text()
    assert finished(again)[f"recon_image-{LABELS[0]}.mat"] == kept[f"recon_image-{LABELS[0]}.mat"]
    assert_same_images(again, reference)
    print(f"\nCtrl-C {sent - first:.2f} s into the second image; exit 130 after {stop:.2f} s")
