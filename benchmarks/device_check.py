"""The device check: one command that shows icnn-pl working and measured on a device.

    python -m benchmarks.device_check --out results/gpu          # a CUDA GPU, < 8 min on an H200
    python -m benchmarks.device_check --out /tmp/dc --device cpu --smoke   # CI, 1-2 min

In order, each section with its own table (CSV in ``--out``) and one ``summary.md``:
1. environment: device, driver, torch, CUDA and cuDNN versions;
2. gpu_tests: the GPU-marked tests (``pytest -m gpu``; skipped without CUDA);
3. main_command: ``train_recon.py`` on the demo with ``trainer=gpu`` (a few images, short
   budget), its results.csv;
4. api_methods: all four methods through the Python API (``icnn_pl.icnn_gd`` ...);
5. iteration: floor / icnn-pl / bdpy seconds per iteration at 224x224 with all 19 layers,
   as the slope between a short and a longer run, with the fixed cost (set-up, Trainer,
   first-touch allocations) apart (``bench_iteration``'s candidates);
6. batch: images per second at batch 1, 4, 16, 64 for icnn_gd and icnn_dgn_gd, until the
   memory runs out, with the peak GPU memory (slope and fixed cost per batch, throughput at
   the paper's 200 iterations);
7. precision: float32 vs tf32 vs bf16-mixed, final loss and seconds per iteration of a
   200-iteration reconstruction.
A section that fails is reported and the next one runs; the exit status is 1 if any failed.
Sections stop being started when the time budget (``--budget-s``) is spent. ``--smoke``
runs every section reduced (32x32, 1-3 iterations, batches 1 and 2): a check of the
script itself, with no meaningful figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
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

GD_METHODS = ("icnn_gd", "icnn_dgn_gd")
METHODS = ("icnn_gd", "icnn_lbfgs", "icnn_dgn_gd", "icnn_dgn_lbfgs")
PRECISIONS = {"float32": {}, "tf32": {"tf32": True}, "bf16-mixed": {"precision": "bf16-mixed"}}


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
    bdpy: bool = True
    layers: str = "all"  # a conf/layers option: all 19 layers of VGG19
    warmup: bool = True  # one uncounted round before the timed ones


FULL = Plan()
# The smoke run checks the script, not the speed: the CPU time goes to the fc layers and
# the generator whatever the image size, so it uses conv1-3 and 1-3 iterations.
SMOKE = Plan(size=32, main_images=1, main_iters=2, api_iters=2, short=1, long=2, repeats=1,
             batches=(1, 2), batch_short=1, batch_long=2, precision_iters=2, layers="conv1-3",
             warmup=False)


@dataclass
class Check:
    """Where the check writes, what it runs on, what happened so far."""

    out: Path
    device: str
    plan: Plan
    budget_s: float
    t0: float = field(default_factory=time.perf_counter)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)  # section -> ok / failed: ... / skipped
    encoder: Any = None  # built once, shared by every section

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.tables[name] = rows
        write_csv(rows, self.out / f"{name}.csv")
        print(f"\n## {name}\n", flush=True)
        print_markdown(rows)


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


def gpu_tests(check: Check) -> None:
    """``pytest -m gpu`` in a child process (skipped there without CUDA)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-n", "0",
                           "-p", "no:cacheprovider", "tests"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    (check.out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
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
    proc = subprocess.run([sys.executable, "train_recon.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    (check.out / "main_command.log").write_text(
        "python train_recon.py " + " ".join(args) + "\n" + proc.stdout + proc.stderr)
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
    rows, bad = [], []
    for name, call in calls.items():
        sync()
        t0 = time.perf_counter()
        image, losses = call()[:2]
        sync()
        ok = bool(np.isfinite(image).all() and np.isfinite(losses).all())
        rows.append({"method": name, "evaluations": len(losses),
                     "seconds": round(time.perf_counter() - t0, 3),
                     "first_loss": float(losses[0]), "final_loss": float(losses[-1]),
                     "finite": ok})
        if not ok:
            bad.append(name)
    check.table("api_methods", rows)
    if bad:
        raise RuntimeError(f"non-finite results from {bad}")


def iteration(check: Check) -> None:
    """Seconds per iteration (slope) and fixed seconds of floor, icnn-pl and bdpy."""
    p = check.plan
    rows = []
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
        rows.append(row)
    check.table("iteration", rows)


def batch(check: Check) -> None:
    """Images per second against batch size, until the device's memory runs out."""
    p = check.plan
    rows = []
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
                rows.append(row)
                _release(check)
                break
            per_iter, fixed = slope_and_fixed(p.batch_short, totals[p.batch_short],
                                              p.batch_long, totals[p.batch_long])
            row |= {"s_per_iter": round(per_iter, 5), "fixed_s": round(fixed, 3),
                    "images_per_s_at_200_iter": round(images_per_second(b, per_iter, fixed), 4),
                    "peak_mb": round(peak), "result": "ok"}
            rows.append(row)
            print(row, flush=True)
            _release(check)
    check.table("batch", rows)


def precision(check: Check) -> None:
    """float32 vs tf32 vs bf16-mixed on the same targets and start."""
    p = check.plan
    rows = []
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
            rows.append({"method": method, "precision": name, "iterations": result.n_evals,
                         "s_per_iter": round(wall / result.n_evals, 5),
                         "final_loss": float(result.loss_history[0, -1])})
    base = {r["method"]: r["final_loss"] for r in rows if r["precision"] == "float32"}
    for r in rows:
        r["loss_vs_float32"] = round(r["final_loss"] / base[r["method"]], 5)
    check.table("precision", rows)


SECTIONS: dict[str, Callable[[Check], None]] = {
    "environment": environment, "gpu_tests": gpu_tests, "main_command": main_command,
    "api_methods": api_methods, "iteration": iteration, "batch": batch, "precision": precision,
    "decoding": decoding_section,  # benchmarks/bench_decoding.py: one VGG19 layer decoded
}


# -- helpers -----------------------------------------------------------------------------------
def _total(candidate: Callable[..., float], setup: Any, targets: Any, n: int) -> float:
    """Seconds of an n-iteration run (``bench_iteration``'s candidates give per iteration)."""
    return candidate(setup, targets, n) * n


def _setup(check: Check, method: str, n_iter: int):
    """``method``'s pipeline setup with ``n_iter`` iterations; one encoder for the check
    (built by the first call, ``check.encoder`` after that)."""
    size = check.plan.size
    setup = method_setup(method, n_iter, check.device,
                         [f"network.input_size=[{size},{size}]", f"layers={check.plan.layers}",
                          *trainer_overrides(check.device)], check.encoder)
    check.encoder = setup.encoder
    return setup


def _release(check: Check) -> None:
    if check.cuda:
        torch.cuda.empty_cache()


def write_summary(check: Check, argv: Sequence[str]) -> Path:
    """``summary.md``: the command, each section's status and table."""
    smoke = " (smoke: reduced sizes, not figures)" if check.plan is SMOKE else ""
    lines = ["# icnn-pl device check", "",
             f"`python -m benchmarks.device_check {' '.join(argv)}`: {check.elapsed:.0f} s{smoke}",
             "", "| section | status |", "|---|---|"]
    lines += [f"| {name} | {status} |" for name, status in check.status.items()]
    for name, rows in check.tables.items():
        lines += ["", f"## {name}", "", markdown(rows)]
    path = check.out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(check: Check, sections: Sequence[str]) -> bool:
    ok = True
    for name in sections:
        if check.elapsed > check.budget_s:
            check.status[name] = f"skipped: time budget ({check.budget_s:.0f} s) spent"
            continue
        t0 = time.perf_counter()
        print(f"\n== {name} ({check.elapsed:.0f} s in)", flush=True)
        try:
            SECTIONS[name](check)
            check.status[name] = f"ok ({time.perf_counter() - t0:.0f} s)"
        except Exception as exc:  # reported; the next section still runs
            ok = False
            traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            check.status[name] = f"FAILED: {first}"
            _release(check)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), cuda:i or cpu: never chosen by itself")
    parser.add_argument("--smoke", action="store_true", help="every section, reduced")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no section after this many seconds (default: 7.5 min)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no usable CUDA GPU"
                     " (use --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.device, SMOKE if args.smoke else FULL, args.budget_s)
    ok = run(check, args.sections)
    summary = write_summary(check, argv)
    print(f"\n{summary}: {'all sections ok' if ok else 'SOME SECTIONS FAILED'}"
          f" in {check.elapsed:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
