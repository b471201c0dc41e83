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

from icnn_pl.pipeline import claims
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


# -- takeovers with one winner, interleaved deterministically (#21 items 2-5) -----------------
class Interleave:
    """Stops the thread named ``who`` at claims' pause point ``point`` until ``go()``:
    the test runs the other claimant in between."""

    def __init__(self, monkeypatch, who: str, point: str) -> None:
        self.who, self.point = who, point
        self.reached, self.resume = threading.Event(), threading.Event()
        monkeypatch.setattr(claims, "pause", self._pause)

    def _pause(self, point: str) -> None:
        if point == self.point and threading.current_thread().name == self.who \
                and not self.reached.is_set():
            self.reached.set()
            assert self.resume.wait(20)

    def go(self) -> None:
        self.resume.set()


def _in_thread(name: str, fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), name=name)
    t.start()
    return t, out


@pytest.mark.parametrize("stale_claim", ["empty", "dead owner"])
def test_a_takeover_never_removes_the_claim_a_racer_made_meanwhile(tmp_path, monkeypatch,
                                                                   stale_claim):
    """X judges the claim stale and is paused; Y takes it over and claims the image; X
    goes on: it must leave Y's claim alone (before: it deleted it, both computed)."""
    x, y = Claims(tmp_path, timeout=60), Claims(tmp_path, timeout=60)
    path = x.path("img")
    if stale_claim == "empty":  # its writer died between create and write
        path.write_text("")
        old = time.time() - 120
        os.utime(path, (old, old))
    else:
        _write_claim(path, HOST, _dead_pid())
    gate = Interleave(monkeypatch, "X", "stale")
    tx, got_x = _in_thread("X", lambda: x.claim("img"))
    assert gate.reached.wait(20)
    assert y.claim("img") is None  # Y takes over and holds the image
    gate.go()
    tx.join(20)
    assert got_x[0] is not None and got_x[0].token == y._held["img"]  # X: held by Y
    assert y.holds("img")
    y.close()
    x.close()
    assert list(tmp_path.iterdir()) == []  # nothing left: no claim, lock or moved file


def test_a_racer_claim_being_written_is_left_alone(tmp_path, monkeypatch):
    """Without hard links a new claim is briefly empty: X, paused after judging the old
    claim stale, finds Y's claim half-written and leaves it to Y."""
    import errno

    real_link = os.link

    def no_links(src, dst, *a, **kw):
        if str(dst).endswith(".claim"):
            raise OSError(errno.EPERM, "Operation not permitted")
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(os, "link", no_links)
    x, y = Claims(tmp_path, timeout=60), Claims(tmp_path, timeout=60)
    _write_claim(x.path("img"), HOST, _dead_pid())
    gate_x = Interleave(monkeypatch, "X", "stale")
    tx, got_x = _in_thread("X", lambda: x.claim("img"))
    assert gate_x.reached.wait(20)
    gate_y = Interleave(monkeypatch, "Y", "opened")  # Y's claim exists, still empty
    ty, got_y = _in_thread("Y", lambda: y.claim("img"))
    assert gate_y.reached.wait(20)
    assert x.path("img").read_text() == ""
    gate_x.go()  # X goes on while Y's claim is empty
    tx.join(20)
    gate_y.go()
    ty.join(20)
    assert got_y == [None] and got_x[0] is not None  # one winner: Y
    assert y.holds("img")
    y.close()
    x.close()
    assert list(tmp_path.iterdir()) == []


def test_a_takeover_in_progress_keeps_others_out(tmp_path, monkeypatch):
    """X holds the takeover lock (paused there); Y finds the same stale claim: it waits
    its turn instead of taking over too."""
    x, y = Claims(tmp_path, timeout=60), Claims(tmp_path, timeout=60)
    _write_claim(x.path("img"), HOST, _dead_pid())
    gate = Interleave(monkeypatch, "X", "locked")
    tx, got_x = _in_thread("X", lambda: x.claim("img"))
    assert gate.reached.wait(20)
    assert y.claim("img") is not None  # left to the takeover in progress
    gate.go()
    tx.join(20)
    assert got_x == [None] and x.holds("img")
    x.close()
    y.close()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_takeover_lock_is_removed(tmp_path):
    c = Claims(tmp_path, timeout=60)
    _write_claim(c.path("img"), HOST, _dead_pid())
    _write_claim(tmp_path / (c.path("img").name + claims.TAKEOVER), HOST, _dead_pid())
    assert c.claim("img") is None
    c.close()
    assert list(tmp_path.iterdir()) == []


def test_claims_name_their_slurm_task(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    c = Claims(tmp_path)
    assert c.claim("img") is None
    data = json.loads(c.path("img").read_text())
    assert data["slurm_task"] == "4242/4240/2" and data["restart"] == 3
    c.close()


@pytest.mark.parametrize(("task", "restart", "taken"), [
    ("4242//", 0, True),  # this very task before its requeue, on a node that died
    ("4242//", 1, False),  # this incarnation (another process of it): alive
    ("999//", 0, False),  # another job: alive until its claim expires
])
def test_a_requeued_task_takes_over_its_earlier_claims_at_once(tmp_path, monkeypatch, task,
                                                               restart, taken):
    """#21 item 2: the dead node's claim is fresh (< timeout) and on another host."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    c = Claims(tmp_path)
    c.path("img").write_text(json.dumps({"host": "node-that-died", "pid": 77, "started": "x",
                                         "token": "old", "slurm_task": task,
                                         "restart": restart}))
    assert (c.claim("img") is None) == taken
    c.close()


def test_a_full_disk_while_claiming_leaves_no_claim_and_one_error(tmp_path, monkeypatch):
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    c = Claims(tmp_path)
    with pytest.raises(claims.ClaimError) as err:
        c.claim("img")
    monkeypatch.undo()
    assert "No space left on device" in err.value.problem and "\n" not in err.value.problem
    assert err.value.fix and "free space" in err.value.fix
    c.close()
    assert list(tmp_path.iterdir()) == []
