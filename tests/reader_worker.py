"""Readers of user files run in a child process, one file at a time, each under an
address-space limit (``RLIMIT_AS``): a reader that allocates what a damaged file declares
fails its test with ``MemoryError`` instead of taking the machine down.

The parent (``ReaderWorker``) sends ``{"kind", "path"}`` lines; the child runs
``READERS[kind](path)`` of the module named on its command line and answers with the
outcome (``read``, ``refused`` with our one-line error, or ``bad``), the seconds taken and
the memory the read added at its peak (``VmHWM``, reset before each file). A child that
dies (a crash in a C reader) is reported as ``bad`` and replaced.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _status(field: str) -> int:
    """A ``/proc/self/status`` size in bytes (VmSize, VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _memory_error_in(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what it wraps is a MemoryError (our readers wrap failures)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, MemoryError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _one(readers: dict, kind: str, path: str, budget: int, limit_s: float) -> dict[str, Any]:
    from icnn_pl.errors import IcnnError

    with open("/proc/self/clear_refs", "w") as fh:  # VmHWM := VmRSS
        fh.write("5")
    rss0 = _status("VmRSS")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + budget, hard))
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"status": "read", "msg": ""}
    try:
        readers[kind](Path(path))
    except IcnnError as exc:
        out = {"status": "refused", "msg": exc.problem}
        if _memory_error_in(exc):
            out = {"status": "bad", "msg": f"over the memory limit: {exc.problem[:200]}"}
        elif "\n" in exc.problem or not exc.problem:
            out = {"status": "bad", "msg": f"not one line: {exc.problem!r}"}
    except _Timeout:
        out = {"status": "bad", "msg": f"still reading after {limit_s} s"}
    except MemoryError:
        out = {"status": "bad", "msg": f"over the memory limit ({budget >> 20} MiB)"}
    except Exception as exc:  # noqa: BLE001 - what the test looks for
        out = {"status": "bad", "msg": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    out["seconds"] = time.perf_counter() - t0
    out["peak_bytes"] = max(0, _status("VmHWM") - rss0)
    return out


def main() -> None:
    module, budget, limit_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    answers = os.fdopen(os.dup(1), "w")  # the protocol's own channel: what the readers
    os.dup2(2, 1)  # print goes to stderr
    sys.stdout = sys.stderr
    readers = importlib.import_module(module).READERS
    signal.signal(signal.SIGALRM, _alarm)
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        print(json.dumps(_one(readers, case["kind"], case["path"], budget, limit_s)),
              file=answers, flush=True)


class ReaderWorker:
    """The parent's side: ``run(kind, path)`` -> the child's answer."""

    def __init__(self, module: str, budget_bytes: int, limit_s: float) -> None:
        self.args = [sys.executable, str(Path(__file__)), module, str(budget_bytes),
                     str(limit_s)]
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent),
                                              os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)
        assert json.loads(proc.stdout.readline())["ready"]
        return proc

    def run(self, kind: str, path: Path) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.proc.stdin.write(json.dumps({"kind": kind, "path": str(path)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:  # the child died on this file
            code = self.proc.wait()
            self.proc = None
            return {"status": "bad", "msg": f"the reader crashed the process (code {code})",
                    "seconds": 0.0, "peak_bytes": 0}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(30)
            self.proc = None


if __name__ == "__main__":
    main()
