"""Two launches of one job at once (a re-launch while it runs, an overlapping requeue):
two real ``python train_recon.py`` processes on the demo, same command, same directory.

The overlap is made, not hoped for: as soon as one launch holds its first image it is
frozen (SIGSTOP) until the other has finished an image, so each computes at least one
and the second finds an image held by a live launch and waits for it. The test checks
that overlap first; then: every image reconstructed exactly once (per-image claims), both
exit 0, the tables hold every image, the second launch's logger writes in its own folder,
no claim is left.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time

import pytest
from pipeline_helpers import (
    TINY,
    many_results,
    output_of,
    read_results,
    start_many,
    with_defaults,
    write_demo,
)

pytestmark = pytest.mark.slow

LABELS = ("astronaut", "chelsea", "coffee")


def _claim_pids(run_dir) -> dict[str, int]:
    """image label -> PID of the launch that holds it now."""
    held = {}
    for path in run_dir.rglob(".recon_image-*.claim"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            held[path.name[len(".recon_image-"):-len(".claim")]] = json.loads(
                path.read_text())["pid"]
    return held


def _until(cond, deadline: float, what: str):
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return got


def test_two_launches_of_one_job_share_the_images(tmp_path):
    demo = write_demo(tmp_path / "demo", LABELS, (1,))
    run_dir = tmp_path / "run"
    args = with_defaults(TINY, ["method.n_iter=3", "data.limit=3", f"data.root={demo}",
                                "logger=csv", f"hydra.run.dir={run_dir}"])
    started = [start_many([args], timeout=240, env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    pids = {run.proc.pid: i for i, run in enumerate(started)}
    deadline = time.monotonic() + 200
    try:
        # the first launch to hold an image is frozen while it holds it ...
        first = _until(lambda: next((p for p in _claim_pids(run_dir).values() if p in pids),
                                    None), deadline, "a launch to claim an image")
        frozen = started[pids[first]].proc
        frozen.send_signal(signal.SIGSTOP)
        try:  # ... until the other has finished an image (nothing else writes one now)
            before = set(run_dir.rglob("recon_image-*.mat"))
            _until(lambda: set(run_dir.rglob("recon_image-*.mat")) - before, deadline,
                   "the other launch to finish an image")
        finally:
            frozen.send_signal(signal.SIGCONT)
        results = [many_results(run)[0] for run in started]
    finally:  # one failed: do not leave the other running
        for run in started:
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGCONT)
                run.proc.kill()
    texts = [output_of(r) for r in results]
    computed = [re.findall(r" - (\w+): final loss", t) for t in texts]
    # they overlapped: each computed an image, and one waited for the other's
    assert all(computed), computed
    assert any("another launch of this job is running" in t for t in texts)
    codes = [r["code"] for r in results]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    every = sorted(computed[0] + computed[1])
    assert every == sorted(LABELS), computed  # each image once, by one launch
    rows_csv, rows_json = read_results(run_dir)
    assert sorted(r["label"] for r in rows_csv) == sorted(LABELS)
    assert sorted(r["label"] for r in rows_json) == sorted(LABELS)
    assert len(list(run_dir.glob("launch-*"))) == 1  # the second one's records are apart
    assert not list(run_dir.rglob("*.claim*")) and not list(run_dir.rglob("*.tmp"))
