"""The device check's own machinery, on the CPU with stand-in sections: the hard budget
(a section's child processes killed, an in-process section interrupted, the watchdog's
hard end), rows kept as they are written, the summary always written, the device
selected before any section. (The real sections run in CI: ``.ci/run``, ``--smoke``.)"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from fake_cuda import fake_cuda

from benchmarks import device_check
from benchmarks.harness import REPO


def _quick(check: device_check.Check) -> None:
    check.table("quick", [{"answer": 42}])


def _rows_then_sleep(check: device_check.Check) -> None:
    for i in range(2):
        check.row("slow", {"row": i})
    time.sleep(60)


def _child_then_sleep(check: device_check.Check) -> None:
    """A child that starts a grandchild (its pid in grandchild.pid), both sleeping."""
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c',"
              " 'import time; time.sleep(60)']);"
              f" open({str(check.out / 'grandchild.pid')!r}, 'w').write(str(p.pid));"
              " time.sleep(60)")
    check.run_child([sys.executable, "-c", script], check.out / "child.log")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child not yet reaped by its (killed) parent is a zombie: dead
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


def _register(monkeypatch, **sections) -> None:
    monkeypatch.setattr(device_check, "SECTIONS", dict(sections))


def _summary(out: Path) -> str:
    return (out / "summary.md").read_text()


def test_a_section_past_the_budget_is_interrupted_and_the_rest_reported(monkeypatch, tmp_path):
    _register(monkeypatch, quick=_quick, slow=_rows_then_sleep, after=_quick)
    t0 = time.perf_counter()
    code = device_check.main(["--out", str(tmp_path), "--device", "cpu", "--budget", "2",
                              "--sections", "quick", "slow", "after"])
    assert time.perf_counter() - t0 < 10  # not the section's 60 s
    assert code == 1
    summary = _summary(tmp_path)
    assert "| quick | ok" in summary and "| slow | KILLED at the 2 s budget" in summary
    assert "| after | skipped" in summary
    # the finished section's table and the killed one's rows so far are kept
    assert "## quick" in summary and "## slow" in summary
    with open(tmp_path / "slow.csv") as fh:
        assert [r["row"] for r in csv.DictReader(fh)] == ["0", "1"]


def test_a_section_past_the_budget_has_its_children_killed(monkeypatch, tmp_path):
    _register(monkeypatch, child=_child_then_sleep)
    t0 = time.perf_counter()
    code = device_check.main(["--out", str(tmp_path), "--device", "cpu", "--budget", "3",
                              "--sections", "child"])
    assert time.perf_counter() - t0 < 12 and code == 1
    assert "| child | KILLED" in _summary(tmp_path)
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    deadline = time.time() + 5
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the section's grandchild outlived the budget"


@pytest.mark.slow
def test_a_section_stuck_where_no_signal_reaches_is_ended_by_the_watchdog(tmp_path):
    """A section that blocks the alarm (as native code would hold it off): past budget
    + grace the watchdog writes the summary and ends the process."""
    script = textwrap.dedent(f"""
        import signal, sys, time
        from benchmarks import device_check as dc
        def stuck(check):
            check.row("stuck", {{"row": 0}})
            signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})
            time.sleep(60)
        dc.SECTIONS = {{"stuck": stuck}}
        dc.GRACE_S = 1.0
        sys.exit(dc.main(["--out", {str(tmp_path)!r}, "--device", "cpu", "--budget", "2"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    summary = _summary(tmp_path)
    assert "| stuck | KILLED: stuck 1 s past the 2 s budget" in summary and "## stuck" in summary
    elapsed = int(summary.split("`: ")[1].split(" s of")[0])  # the check's own clock
    assert elapsed <= 6, summary


def test_the_device_is_selected_before_any_section(monkeypatch, tmp_path):
    seen = []

    def probe(check):
        seen.extend(list(fake.calls))

    _register(monkeypatch, probe=probe)
    with fake_cuda(monkeypatch) as fake:
        assert device_check.main(["--out", str(tmp_path), "--device", "cuda:1"]) == 0
    assert seen == [("set_device", (torch.device("cuda", 1),))]
    assert device_check.child_gpu_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "1"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert device_check.child_gpu_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "6"}
    assert device_check.child_gpu_env("cpu") == {}


def test_sections_are_registered_in_order_with_the_fail_fast_pass_first():
    assert list(device_check.SECTIONS)[:2] == ["fail_fast", "environment"]
    assert {"gpu_tests", "main_command", "precision"} <= set(device_check.SECTIONS)
    assert "dgn_direct" in device_check.all_methods() and len(device_check.all_methods()) >= 7


@pytest.mark.parametrize("argv", [["--budget", "90"], ["--budget-s", "90"]])
def test_the_budget_option(monkeypatch, tmp_path, argv):
    budgets = []
    _register(monkeypatch, probe=lambda check: budgets.append(check.budget_s))
    device_check.main(["--out", str(tmp_path), "--device", "cpu", *argv])
    assert budgets == [90.0]
