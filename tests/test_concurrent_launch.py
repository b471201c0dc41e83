"""Two launches of one job at once (a re-launch while it runs, an overlapping requeue):
two real ``python train_recon.py`` processes on the demo, same command, same directory.
Every image is reconstructed exactly once (per-image claims), both exit 0, the tables
hold every image, the second launch's logger writes in its own folder, no claim is left.
"""

from __future__ import annotations

import re

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


def test_two_launches_of_one_job_share_the_images(tmp_path):
    demo = write_demo(tmp_path / "demo", LABELS, (1,))
    run_dir = tmp_path / "run"
    args = with_defaults(TINY, ["method.n_iter=3", "data.limit=3", f"data.root={demo}",
                                "logger=csv", f"hydra.run.dir={run_dir}"])
    started = [start_many([args], timeout=240, env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    try:
        results = [many_results(run)[0] for run in started]
    finally:  # one failed: do not leave the other running
        for run in started:
            if run.proc.poll() is None:
                run.proc.kill()
    codes = [r["code"] for r in results]
    texts = [output_of(r) for r in results]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    computed = [re.findall(r" - (\w+): final loss", t) for t in texts]
    every = sorted(computed[0] + computed[1])
    assert every == sorted(LABELS), computed  # each image once, by one launch
    rows_csv, rows_json = read_results(run_dir)
    assert sorted(r["label"] for r in rows_csv) == sorted(LABELS)
    assert sorted(r["label"] for r in rows_json) == sorted(LABELS)
    assert not list(run_dir.rglob("*.claim")) and not list(run_dir.rglob("*.tmp"))
    if all(computed):  # they overlapped: the second one's records are apart
        assert len(list(run_dir.glob("launch-*"))) == 1
        assert any("another launch of this job is running" in t for t in texts)
