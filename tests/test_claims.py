"""Per-image claims and the job's report lock (``icnn_pl.pipeline.claims``), and shard
tables that stay complete whichever shard ends last (#14).

Two real launches of one job at once are in ``test_concurrent_launch.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from pipeline_helpers import read_results, tiny_encoder, tiny_job

from icnn_pl.pipeline.claims import HOST, Claims
from icnn_pl.pipeline.job import run_job
from icnn_pl.pipeline.outputs import FAILURES


def _write_claim(path, host, pid, token="t0", age_s=0.0):
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "then", "token": token}))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claim_is_exclusive_and_released(tmp_path):
    a, b = Claims(tmp_path), Claims(tmp_path)
    try:
        assert a.claim("img") is None
        data = json.loads(a.path("img").read_text())
        assert data["host"] == HOST and data["pid"] == os.getpid() and data["started"]
        owner = b.claim("img")  # another Claims of this process: a's claim is live
        assert owner is not None and owner.token == data["token"]
    finally:
        a.close()
        b.close()
    assert not a.path("img").exists()


def test_live_owner_on_this_host_keeps_its_claim(tmp_path):
    c = Claims(tmp_path)
    _write_claim(c.path("img"), HOST, os.getppid())  # the test runner's parent: alive
    owner = c.claim("img")
    assert owner is not None and owner.pid == os.getppid()
    c.close()  # not ours: left in place
    assert c.path("img").exists()


def test_dead_owner_on_this_host_is_taken_over(tmp_path, caplog):
    c = Claims(tmp_path)
    _write_claim(c.path("img"), HOST, _dead_pid())
    assert c.claim("img") is None
    assert json.loads(c.path("img").read_text())["pid"] == os.getpid()
    assert "taking over" in caplog.text
    c.close()
    assert list(tmp_path.iterdir()) == []  # no claim, no renamed stale claim left


def test_other_host_claim_expires_after_the_timeout(tmp_path):
    c = Claims(tmp_path, timeout=60)
    _write_claim(c.path("fresh"), "elsewhere", 1, age_s=10)
    _write_claim(c.path("old"), "elsewhere", 1, age_s=120)
    assert c.claim("fresh").host == "elsewhere"  # may be alive: left to it
    assert c.claim("old") is None  # not refreshed for 2 min: its node is gone
    c.close()


def test_leftover_claim_of_this_process_is_taken_over(tmp_path):
    """An earlier job of the same interpreter (a sweep) that did not release its claim."""
    _write_claim(tmp_path / ".img.claim", HOST, os.getpid(), token="old")
    c = Claims(tmp_path)
    assert c.claim("img") is None
    c.close()


def test_release_leaves_a_claim_that_is_no_longer_ours(tmp_path):
    c = Claims(tmp_path)
    assert c.claim("img") is None
    _write_claim(c.path("img"), "elsewhere", 1, token="theirs")  # taken over meanwhile
    c.release("img")
    assert json.loads(c.path("img").read_text())["token"] == "theirs"
    c.close()


def test_heartbeat_refreshes_held_claims(tmp_path):
    c = Claims(tmp_path, heartbeat=0.05)
    assert c.claim("img") is None
    old = time.time() - 1000
    os.utime(c.path("img"), (old, old))
    time.sleep(0.5)
    assert time.time() - c.path("img").stat().st_mtime < 100
    c.close()


def test_lock_waits_for_a_live_holder(tmp_path):
    waiter = Claims(tmp_path)
    held = waiter.path("report")
    _write_claim(held, HOST, os.getppid())  # another live process on this host holds it
    order = []

    def wait():
        with waiter.lock("report", poll_s=0.02):
            order.append("waiter")

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    order.append("holder done")
    held.unlink()
    t.join(10)
    assert order == ["holder done", "waiter"]
    waiter.close()
    assert not held.exists()


# -- shards of one job: tables and failures complete whichever ends last ----------------------
LABELS = ("img_a", "img_b", "img_c", "img_d")
LAYERS = ("c1", "c2", "fc")


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder(0)


def shard_job(encoder, run_dir, shard, broken=()):
    return tiny_job(encoder, run_dir, labels=LABELS, layers=LAYERS, broken=broken,
                    data_kw={"num_shards": 2, "shard": shard}, feature_fit=False)


def test_shards_finishing_together_leave_complete_tables(encoder, tmp_path):
    """Shard 1 ends while shard 0 holds the report lock: it waits, then rebuilds the
    tables from every finished image; run_info.json lists both shards' failures."""
    first = run_job(shard_job(encoder, tmp_path, 0, broken=["img_a"]))  # img_a, img_c
    assert list(first.failures) == ["img_a"]
    lock = Claims(tmp_path).path("report")
    _write_claim(lock, HOST, os.getppid())  # shard 0, still writing its tables, holds it
    results = []
    job1 = shard_job(encoder, tmp_path, 1, broken=["img_d"])  # img_b, img_d
    t = threading.Thread(target=lambda: results.append(run_job(job1)))
    t.start()
    deadline = time.monotonic() + 60
    while not job1.outputs.is_done("img_b") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert t.is_alive()  # waiting for the lock, tables untouched
    assert [r["label"] for r in read_results(tmp_path)[1]] == ["img_c"]
    lock.unlink()  # shard 0's report is done
    t.join(60)
    assert list(results[0].failures) == ["img_d"]  # its own exit code: its own failures
    rows_csv, rows_json = read_results(tmp_path)
    assert [r["label"] for r in rows_csv] == ["img_b", "img_c"]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert sorted(info["failures"]) == ["img_a", "img_d"]
    assert sorted(json.loads((tmp_path / FAILURES).read_text())) == ["img_a", "img_d"]
    # shard 0 again with its image fixed: its failure is gone, shard 1's stays
    again = run_job(shard_job(encoder, tmp_path, 0))
    assert again.failures == {}
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert list(info["failures"]) == ["img_d"]
    assert [r["label"] for r in read_results(tmp_path)[0]] == ["img_a", "img_b", "img_c"]
    assert not list(tmp_path.rglob("*.claim"))
