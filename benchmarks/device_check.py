"""The device check: one command that shows icnn-pl working and measured on a device.

    python -m benchmarks.device_check --out results/gpu          # a CUDA GPU, < 8 min on an H200
    python -m benchmarks.device_check --out /tmp/dc --device cpu --smoke   # CI, 1-2 min

In order, each section with its own table (CSV in ``--out``) and one ``summary.md``:
1. fail_fast: "will anything fail": every method (``conf/method``) for 3 iterations in
   float32, tf32 and bf16-mixed at batch 2 (1 for L-BFGS), one row per run, ~30 s on a
   GPU, so that even a short device loan gives a yes or no;
2. environment: device, driver, torch, CUDA and cuDNN versions;
3. gpu_tests: the GPU-marked tests (``pytest -m gpu``; skipped without CUDA);
4. main_command: ``train_recon.py`` on the demo with ``trainer=gpu`` (a few images, short
   budget), its results.csv;
5. api_methods: all four methods through the Python API (``icnn_pl.icnn_gd`` ...);
6. iteration: floor / icnn-pl / bdpy seconds per iteration at 224x224 with all 19 layers,
   as the slope between a short and a longer run, with the fixed cost (set-up, Trainer,
   first-touch allocations) apart (``bench_iteration``'s candidates);
7. batch: images per second at batch 1, 4, 16, 64 for icnn_gd and icnn_dgn_gd, until the
   memory runs out, with the peak GPU memory (slope and fixed cost per batch, throughput at
   the paper's 200 iterations);
8. precision: float32 vs tf32 vs bf16-mixed, final loss and seconds per iteration of a
   200-iteration reconstruction.
A section is a function registered with ``@section("name")`` (run in registration order).
A section that fails is reported and the next one runs; the exit status is 1 if any failed.
One hard wall-clock limit holds for the whole run (``--budget``, 480 s): when it is
reached the running section is stopped (its child processes killed, an in-process section
interrupted) and no other starts; every section writes its rows as it makes them, and the
summary is rewritten after each section, so a timeout loses at most the unfinished rows of
the running section. The device is selected before anything is timed. ``--smoke`` runs
every section reduced (32x32, 1-3 iterations, batches 1 and 2): a check of the script
itself, with no meaningful figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import bench_iteration
from benchmarks.bench_batch import per_image_iteration
from benchmarks.bench_decoding import device_section as decoding_section
from benchmarks.harness import (
    REPO,
    PeakMemory,
    interleave,
    markdown,
    method_setup,
    print_markdown,
    read_csv,
    reconstruct,
    sync,
    trainer_overrides,
    true_targets,
    write_csv,
)
from icnn_pl.atomic import atomic_path, write_text_atomic
from icnn_pl.engine.params import TARGET_INIT

GD_METHODS = ("icnn_gd", "icnn_dgn_gd")
METHODS = ("icnn_gd", "icnn_lbfgs", "icnn_dgn_gd", "icnn_dgn_lbfgs")
PRECISIONS = {"float32": {}, "tf32": {"tf32": True}, "bf16-mixed": {"precision": "bf16-mixed"}}
BUDGET_S = 480.0  # the whole check, hard
GRACE_S = 30.0  # past the budget, a section stuck in native code ends the process


class BudgetSpent(BaseException):
    """The check's wall-clock budget is spent (a BaseException: a section's own
    ``except Exception`` must not swallow it)."""


@dataclass(frozen=True)
class Plan:
    """Sizes of each section (the full check, or the smoke run)."""

    size: int = 224
    main_images: int = 3
    main_iters: int = 50
    api_iters: int = 20
    short: int = 10  # iteration slopes: t(long) - t(short) over long - short
    long: int = 60
    repeats: int = 2
    batches: tuple[int, ...] = (1, 4, 16, 64)
    batch_short: int = 3
    batch_long: int = 10
    precision_iters: int = 200
    fail_fast_iters: int = 3
    fail_fast_batch: int = 2
    bdpy: bool = True
    layers: str = "all"  # a conf/layers option: all 19 layers of VGG19
    warmup: bool = True  # one uncounted round before the timed ones


FULL = Plan()
# The smoke run checks the script, not the speed: the CPU time goes to the fc layers and
# the generator whatever the image size, so it uses conv1-3 and 1-3 iterations.
# (bf16 on a CPU is slow: the generator's bf16 passes took 20-70 s each with 3 iterations)
SMOKE = Plan(size=32, main_images=1, main_iters=2, api_iters=2, short=1, long=2, repeats=1,
             batches=(1, 2), batch_short=1, batch_long=2, precision_iters=2, layers="conv1-3",
             warmup=False, fail_fast_iters=1)


@dataclass
class Check:
    """Where the check writes, what it runs on, what happened so far."""

    out: Path
    device: str
    plan: Plan
    budget_s: float = BUDGET_S
    argv: Sequence[str] = ()
    t0: float = field(default_factory=time.perf_counter)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)  # section -> ok / failed: ... / skipped
    encoder: Any = None  # built once, shared by every section
    children: set[int] = field(default_factory=set)  # process groups of running children
    running: str | None = None  # the section now running

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def remaining(self) -> float:
        return self.budget_s - self.elapsed

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.tables[name] = rows
        self._write(name)
        print(f"\n## {name}\n", flush=True)
        print_markdown(rows)

    def row(self, name: str, row: dict[str, Any]) -> None:
        """Add one row to table ``name`` and rewrite its CSV at once (a timeout keeps it)."""
        self.tables.setdefault(name, []).append(row)
        self._write(name)
        print(row, flush=True)

    def _write(self, name: str) -> None:
        with atomic_path(self.out / f"{name}.csv") as tmp:
            write_csv(self.tables[name], tmp)

    def run_child(self, args: Sequence[str], log: Path, **kwargs: Any
                  ) -> subprocess.CompletedProcess[str]:
        """Run a child process (its own process group) until it ends or the budget is
        spent; then the whole group is killed (its own children too) and ``BudgetSpent``
        raised. Its command line and output go to ``log``."""
        with open(log, "w") as fh:
            fh.write(" ".join(str(a) for a in args) + "\n")
            fh.flush()
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True, **kwargs)
            self.children.add(proc.pid)
            try:
                code = proc.wait(timeout=max(self.remaining, 0.0))
            except subprocess.TimeoutExpired:
                raise BudgetSpent from None
            finally:
                _kill_group(proc.pid)  # its own children too, whether it ended or not
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)  # reaped
                self.children.discard(proc.pid)
        return subprocess.CompletedProcess(args, code, log.read_text(), "")


def _kill_group(pid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# -- the math of the timing tables -------------------------------------------------------------
def slope_and_fixed(n_short: int, t_short: float, n_long: int, t_long: float
                    ) -> tuple[float, float]:
    """Seconds per iteration and fixed seconds of ``t(n) = fixed + n * per_iter`` through
    two runs of ``n_short`` and ``n_long`` iterations."""
    if n_long <= n_short:
        raise ValueError("the long run must have more iterations than the short one")
    per_iter = (t_long - t_short) / (n_long - n_short)
    return per_iter, t_short - n_short * per_iter


def images_per_second(batch: int, per_iter: float, fixed: float, iters: int = 200) -> float:
    """Throughput of ``batch`` images reconstructed together over ``iters`` iterations."""
    return batch / (fixed + iters * per_iter)


# -- sections ----------------------------------------------------------------------------------
SECTIONS: dict[str, Callable[[Check], None]] = {}


def section(name: str) -> Callable[[Callable[[Check], None]], Callable[[Check], None]]:
    """Register a section (run in registration order): its one line of registration."""
    def register(fn: Callable[[Check], None]) -> Callable[[Check], None]:
        SECTIONS[name] = fn
        return fn
    return register


@section("fail_fast")
def fail_fast(check: Check) -> None:
    """Will anything fail? Every method, a few iterations, each precision, a batch of 2
    (1 for L-BFGS, whose problems are one image each); one row per run, written at once."""
    from icnn_pl.engine.lbfgsb import check_one_problem

    p, bad = check.plan, []
    for method in all_methods():
        setup = _setup(check, method, p.fail_fast_iters)
        init = str(setup.cfg.method.init)
        if init.startswith(TARGET_INIT) and init[len(TARGET_INIT):] not in setup.layers:
            setup = _setup(check, method, p.fail_fast_iters, ["layers=all"])  # dgn_direct: fc7
        batch = p.fail_fast_batch
        try:
            check_one_problem(setup.recipe.optimizer, batch)
        except Exception:
            batch = 1
        one = true_targets(check.encoder, setup.layers)
        targets = {n: t.expand(batch, *t.shape[1:]).clone() for n, t in one.items()}
        labels = [f"im{i}" for i in range(batch)]
        for name, options in PRECISIONS.items():
            row: dict[str, Any] = {"method": method, "precision": name, "batch": batch}
            t0 = time.perf_counter()
            try:
                result = reconstruct(setup, targets, build={"labels": labels}, **options)
                finite = bool(np.isfinite(result.images).all()
                              and np.isfinite(result.loss_history).all())
                row |= {"result": "ok" if finite else "NOT FINITE",
                        "evaluations": result.n_evals}
            except Exception as exc:  # recorded: every other run still goes
                row["result"] = f"FAILED: {type(exc).__name__}: {_first_line(exc)}"
            row["seconds"] = round(time.perf_counter() - t0, 2)
            check.row("fail_fast", row)
            if row["result"] != "ok":
                bad.append(f"{method}/{name}")
            _release(check)
    print_markdown(check.tables["fail_fast"])
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(check.tables['fail_fast'])} runs failed: {bad}")


@section("environment")
def environment(check: Check) -> None:
    row = {"device": check.device, "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda or "none",
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else "none"}
    import pytorch_lightning

    row["lightning"] = pytorch_lightning.__version__
    if check.cuda:
        props = torch.cuda.get_device_properties(torch.device(check.device))
        row |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "driver": _driver_version()}
    else:
        row |= {"gpu": "none", "cpu_threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine()}
    check.table("environment", [row])


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


@section("gpu_tests")
def gpu_tests(check: Check) -> None:
    """``pytest -m gpu`` in a child process (skipped there without CUDA), on the check's GPU."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **child_gpu_env(check.device)}
    t0 = time.perf_counter()
    proc = check.run_child([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-n", "0",
                            "-p", "no:cacheprovider", "tests"], check.out / "gpu_tests.log",
                           cwd=REPO, env=env)
    tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)",
                                               tail)}
    check.table("gpu_tests", [{"passed": counts.get("passed", 0),
                               "failed": counts.get("failed", 0) + counts.get("error", 0),
                               "skipped": counts.get("skipped", 0), "exit_code": proc.returncode,
                               "seconds": round(time.perf_counter() - t0, 1), "summary": tail}])
    if proc.returncode != 0:
        raise RuntimeError(f"GPU-marked tests failed (exit {proc.returncode}): {tail}; see"
                           f" {check.out / 'gpu_tests.log'}")


@section("main_command")
def main_command(check: Check) -> None:
    """``python train_recon.py`` on the demo, as a user runs it (a child process)."""
    p = check.plan
    run_dir = check.out / "main_run"
    args = ["method=icnn_dgn_gd", *trainer_overrides(check.device), f"data.limit={p.main_images}",
            f"method.n_iter={p.main_iters}", f"network.input_size=[{p.size},{p.size}]",
            f"layers={p.layers}",
            "logger=csv", "progress=false", f"data.root={check.out / 'demo'}",
            f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = check.run_child([sys.executable, "train_recon.py", *args],
                           check.out / "main_command.log", cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"train_recon.py failed (exit {proc.returncode}); see"
                           f" {check.out / 'main_command.log'}")
    results = read_csv(run_dir / "results.csv")
    check.table("main_command", [
        {"command": "python train_recon.py " + " ".join(args[:5]), "images": len(results),
         "wall_s": round(wall, 1),
         "recon_s_per_image": round(float(np.median([float(r["seconds"]) for r in results])), 3),
         "final_loss_median": float(np.median([float(r["final_loss"]) for r in results]))}])
    if len(results) != p.main_images:
        raise RuntimeError(f"train_recon.py wrote {len(results)} results, not {p.main_images}")


@section("api_methods")
def api_methods(check: Check) -> None:
    """The four methods through the Python API, on the check's device."""
    from icnn_pl import icnn_dgn_gd, icnn_dgn_lbfgs, icnn_gd, icnn_lbfgs

    p = check.plan
    gd = _setup(check, "icnn_gd", p.api_iters)
    dgn = _setup(check, "icnn_dgn_gd", p.api_iters)
    feats = {n: t.cpu().numpy() for n, t in true_targets(gd.encoder, gd.layers).items()}
    calls: dict[str, Callable[[], tuple[np.ndarray, ...]]] = {
        "icnn_gd": lambda: icnn_gd.reconstruct_image(feats, gd.encoder, iter_n=p.api_iters),
        "icnn_lbfgs": lambda: icnn_lbfgs.reconstruct_image(feats, gd.encoder,
                                                           maxiter=p.api_iters),
        "icnn_dgn_gd": lambda: icnn_dgn_gd.reconstruct_image(feats, gd.encoder, dgn.generator,
                                                             iter_n=p.api_iters),
        "icnn_dgn_lbfgs": lambda: icnn_dgn_lbfgs.reconstruct_image(
            feats, gd.encoder, dgn.generator, maxiter=p.api_iters),
    }
    bad = []
    for name, call in calls.items():
        sync()
        t0 = time.perf_counter()
        image, losses = call()[:2]
        sync()
        ok = bool(np.isfinite(image).all() and np.isfinite(losses).all())
        check.row("api_methods", {"method": name, "evaluations": len(losses),
                                  "seconds": round(time.perf_counter() - t0, 3),
                                  "first_loss": float(losses[0]),
                                  "final_loss": float(losses[-1]), "finite": ok})
        if not ok:
            bad.append(name)
    if bad:
        raise RuntimeError(f"non-finite results from {bad}")


@section("iteration")
def iteration(check: Check) -> None:
    """Seconds per iteration (slope) and fixed seconds of floor, icnn-pl and bdpy."""
    p = check.plan
    for method in GD_METHODS:
        setups = {n: _setup(check, method, n) for n in (p.short, p.long)}
        targets = true_targets(check.encoder, setups[p.short].layers)
        candidates = {"floor": bench_iteration.floor, "icnn-pl": bench_iteration.icnn_pl}
        if p.bdpy:
            candidates["bdpy"] = bench_iteration.bdpy_peer

        cases = {(k, n): functools.partial(_total, fn, setups[n], targets, n)
                 for k, fn in candidates.items() for n in (p.short, p.long)}
        times, peaks = interleave(cases, p.repeats, check.device, warmup=p.warmup)
        row: dict[str, Any] = {"method": method, "size": p.size, "layers": len(targets)}
        for k in candidates:
            per_iter, fixed = slope_and_fixed(p.short, times[(k, p.short)],
                                              p.long, times[(k, p.long)])
            row |= {f"{k}_s_per_iter": round(per_iter, 5), f"{k}_fixed_s": round(fixed, 4),
                    f"{k}_peak_mb": round(max(peaks[(k, p.short)], peaks[(k, p.long)]))}
        row["icnn-pl_over_floor"] = round(row["icnn-pl_s_per_iter"] / row["floor_s_per_iter"], 3)
        if p.bdpy:
            row["bdpy_over_icnn-pl"] = round(row["bdpy_s_per_iter"] / row["icnn-pl_s_per_iter"], 3)
        check.row("iteration", row)


@section("batch")
def batch(check: Check) -> None:
    """Images per second against batch size, until the device's memory runs out."""
    p = check.plan
    for method in GD_METHODS:
        setups = {n: _setup(check, method, n) for n in (p.batch_short, p.batch_long)}
        targets = true_targets(check.encoder, setups[p.batch_short].layers)
        for b in p.batches:
            row: dict[str, Any] = {"method": method, "batch": b}
            try:
                totals, peak = {}, 0.0
                runs = (p.batch_short,) * (1 + p.warmup) + (p.batch_long,)  # first: warm-up
                for n in runs:
                    with PeakMemory(check.device) as mem:
                        totals[n] = per_image_iteration(setups[n], targets, b, n) * n * b
                    peak = max(peak, mem.peak_mb)
            except torch.OutOfMemoryError:
                row["result"] = "out of memory"
                check.row("batch", row)
                _release(check)
                break
            per_iter, fixed = slope_and_fixed(p.batch_short, totals[p.batch_short],
                                              p.batch_long, totals[p.batch_long])
            row |= {"s_per_iter": round(per_iter, 5), "fixed_s": round(fixed, 3),
                    "images_per_s_at_200_iter": round(images_per_second(b, per_iter, fixed), 4),
                    "peak_mb": round(peak), "result": "ok"}
            check.row("batch", row)
            _release(check)


@section("precision")
def precision(check: Check) -> None:
    """float32 vs tf32 vs bf16-mixed on the same targets and start."""
    p = check.plan
    for method in GD_METHODS:
        setup = _setup(check, method, p.precision_iters)
        targets = true_targets(check.encoder, setup.layers)
        if p.warmup:
            reconstruct(setup, targets)  # first-touch allocations, cuDNN plans
        for name, options in PRECISIONS.items():
            sync()
            t0 = time.perf_counter()
            result = reconstruct(setup, targets, **options)
            sync()
            wall = time.perf_counter() - t0
            final = float(result.loss_history[0, -1])
            if name == "float32":
                base = final
            check.row("precision", {"method": method, "precision": name,
                                    "iterations": result.n_evals,
                                    "s_per_iter": round(wall / result.n_evals, 5),
                                    "final_loss": final,
                                    "loss_vs_float32": round(final / base, 5)})


# benchmarks/bench_decoding.py: one VGG19 layer of a simulated subject decoded
section("decoding")(decoding_section)


# -- helpers -----------------------------------------------------------------------------------
def _total(candidate: Callable[..., float], setup: Any, targets: Any, n: int) -> float:
    """Seconds of an n-iteration run (``bench_iteration``'s candidates give per iteration)."""
    return candidate(setup, targets, n) * n


def _setup(check: Check, method: str, n_iter: int, extra: Sequence[str] = ()):
    """``method``'s pipeline setup with ``n_iter`` iterations; one encoder for the check
    (built by the first call, ``check.encoder`` after that)."""
    size = check.plan.size
    setup = method_setup(method, n_iter, check.device,
                         [f"network.input_size=[{size},{size}]", f"layers={check.plan.layers}",
                          *trainer_overrides(check.device), *extra], check.encoder)
    check.encoder = setup.encoder
    return setup


def all_methods() -> list[str]:
    """Every method the pipeline offers (``conf/method``)."""
    return sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def child_gpu_env(device: str) -> dict[str, str]:
    """The environment that shows a child process the check's GPU as its only one (the
    GPU tests use the first GPU they see)."""
    d = torch.device(device)
    if d.type != "cuda" or d.index is None:
        return {}
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return {"CUDA_VISIBLE_DEVICES": visible[d.index] if d.index < len(visible) else str(d.index)}


def select_device(device: str) -> None:
    """Make ``device`` the current CUDA device before anything is timed: the harness's
    synchronisation and peak-memory readings act on the current device."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is not None:
        torch.cuda.set_device(d)


def _release(check: Check) -> None:
    if check.cuda:
        torch.cuda.empty_cache()


def write_summary(check: Check) -> Path:
    """``summary.md`` (atomically): the command, each section's status and table."""
    smoke = " (smoke: reduced sizes, not figures)" if check.plan is SMOKE else ""
    lines = ["# icnn-pl device check", "",
             f"`python -m benchmarks.device_check {' '.join(check.argv)}`:"
             f" {check.elapsed:.0f} s of a {check.budget_s:.0f} s budget{smoke}",
             "", "| section | status |", "|---|---|"]
    lines += [f"| {name} | {status} |" for name, status in check.status.items()]
    for name, rows in check.tables.items():
        lines += ["", f"## {name}", "", markdown(rows)]
    path = check.out / "summary.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


@contextmanager
def _alarm_at_budget(check: Check) -> Iterator[None]:
    """Interrupt the running section (``BudgetSpent``) when the budget is spent: a signal
    to this (main) thread, which Python delivers between two bytecodes."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only: the watchdog alone then
        return

    def interrupt(signum: int, frame: Any) -> None:
        if check.running is not None:
            raise BudgetSpent

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, max(check.remaining, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _watchdog(check: Check, finished: threading.Event) -> None:
    """The hard end: a section stuck in native code past budget + ``GRACE_S`` (where the
    alarm cannot reach it) gets its children killed, the summary written, the process
    ended (exit status 3)."""
    if finished.wait(max(check.remaining, 0.0) + GRACE_S):
        return
    for pid in list(check.children):
        _kill_group(pid)
    if check.running is not None:
        check.status[check.running] = (f"KILLED: stuck {GRACE_S:.0f} s past the"
                                       f" {check.budget_s:.0f} s budget (rows so far kept)")
    try:
        path = write_summary(check)
        print(f"\n{path}: killed at the budget", flush=True)
    finally:
        os._exit(3)


def run(check: Check, sections: Sequence[str]) -> bool:
    """Run ``sections`` in order within the budget; the summary is rewritten after each."""
    ok, finished = True, threading.Event()
    threading.Thread(target=_watchdog, args=(check, finished), daemon=True).start()
    try:
        with _alarm_at_budget(check):
            for name in sections:
                ok = _run_section(check, name) and ok
                write_summary(check)
    finally:
        finished.set()
    return ok


def _run_section(check: Check, name: str) -> bool:
    if check.remaining <= 0:
        check.status[name] = f"skipped: the {check.budget_s:.0f} s budget is spent"
        return False
    t0 = time.perf_counter()
    print(f"\n== {name} ({check.elapsed:.0f} s in, {check.remaining:.0f} s left)", flush=True)
    try:
        check.running = name
        SECTIONS[name](check)
        check.status[name] = f"ok ({time.perf_counter() - t0:.0f} s)"
        return True
    except BudgetSpent:
        check.status[name] = (f"KILLED at the {check.budget_s:.0f} s budget after"
                              f" {time.perf_counter() - t0:.0f} s (rows so far kept)")
        print(f"\n{name}: killed at the budget", flush=True)
    except Exception as exc:  # reported; the next section still runs
        traceback.print_exc()
        check.status[name] = f"FAILED: {_first_line(exc)}"
    finally:
        check.running = None
        _release(check)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), cuda:i or cpu: never chosen by itself")
    parser.add_argument("--smoke", action="store_true", help="every section, reduced")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budget", "--budget-s", dest="budget", type=float, default=BUDGET_S,
                        help="hard wall-clock limit of the whole check, seconds (default: 480)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no usable CUDA GPU"
                     " (use --device cpu)")
    select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.device, SMOKE if args.smoke else FULL, args.budget,
                  argv)
    ok = run(check, args.sections)
    summary = write_summary(check)
    print(f"\n{summary}: {'all sections ok' if ok else 'SOME SECTIONS FAILED OR STOPPED'}"
          f" in {check.elapsed:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
