"""Seconds per iteration and peak memory of the four methods, side by side in one process.

    python -m benchmarks.bench_iteration --iters 10 --repeats 3 --out benchmarks/results_cpu.csv

VGG19 at 224x224 with all 19 layers, each method with its default config (``conf/``).
Per method, interleaved (floor, icnn-pl, pipeline, bdpy, floor, ...), median of the repeats
after one uncounted warm-up round:
- floor: a bare forward to the deepest target layer and backward to the input (through
  the generator for DGN methods), with the l2 loss; no optimiser, logging or Lightning;
- icnn-pl: the ``LightningModule`` with a lean Trainer, as the Python API runs it
  (seconds per iteration, or per function evaluation for L-BFGS, including set-up);
- pipeline: ``train_recon.py`` itself on one demo image, with the W&B logger on (offline).
  ``pipeline`` is the reconstruction's own time per iteration as the job reports it
  (Trainer, logging every 10 steps); ``job_overhead_s`` is the rest of the job's wall
  time (Hydra, building the networks, W&B start/finish, feature fit, outputs, gallery);
- bdpy: ``bdpy.recon.torch.icnn.reconstruct`` on the same network, targets and options,
  with snapshots off (the same work) and with its defaults (a TIFF snapshot and a printed
  line every iteration). bdpy has no L-BFGS.
Peak memory: the CUDA allocator's peak on a GPU; on a CPU the peak resident memory of the
process (``peak_rss_mb``), which only grows, so the first candidate carries the set-up.
Random weights: the cost does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    Setup,
    add_common_args,
    floor_seconds,
    interleave,
    method_setup,
    read_csv,
    reconstruct,
    report,
    run_train_recon,
    setup_run,
    sync,
    true_targets,
)

METHODS = ("icnn_gd", "icnn_dgn_gd", "icnn_lbfgs", "icnn_dgn_lbfgs")
# Also measurable (--methods): the Fourier prior, which bdpy does not have.
EXTRA_METHODS = ("icnn_fourier", "icnn_fourier_lbfgs")
DEMO_LABEL = "astronaut"


def floor(setup: Setup, targets, iters: int) -> float:
    return floor_seconds(setup.encoder, targets, iters, setup.generator)


def icnn_pl(setup: Setup, targets, iters: int) -> float:
    sync()
    t0 = time.perf_counter()
    result = reconstruct(setup, targets)
    sync()
    return (time.perf_counter() - t0) / result.n_evals


def pipeline(setup: Setup, targets, iters: int, timings: dict) -> float:
    """``train_recon.py`` on one demo image in a fresh run directory, logger on."""
    with tempfile.TemporaryDirectory() as tmp:
        wall = run_train_recon([
            f"method={setup.method}", f"method.n_iter={iters}", *setup.overrides,
            f"data.labels=[{DEMO_LABEL}]", "progress=false", "logger=wandb",
            f"hydra.run.dir={tmp}/run"])
        row = read_csv(Path(tmp) / "run" / "results.csv")[0]
    seconds, evals = float(row["seconds"]), int(row["function_evals"])
    timings.setdefault(setup.method, []).append(wall - seconds)
    return seconds / evals


def bdpy_peer(setup: Setup, targets, iters: int, snapshots: bool = False) -> float:
    """bdpy's ``reconstruct`` with the method's default options, as bdpy's users run it
    (RGB HWC images outside, Caffe space inside)."""
    from bdpy.recon.torch.icnn import reconstruct as bdpy_reconstruct

    encoder, m = setup.encoder, setup.cfg.method
    mapping = {n: encoder.layer_mapping[n].replace("features.", "features[").replace(
        "classifier.", "classifier[") + "]" for n in targets}
    feats = {n: t.cpu().numpy() for n, t in targets.items()}
    mean = np.asarray(encoder.mean_bgr, dtype=np.float32).reshape(3, 1, 1)
    sched = setup.cfg.optimizer.schedule
    size = (*encoder.input_size, 3)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        kwargs = dict(
            encoder=encoder.net, layer_mapping=mapping, n_iter=iters,
            lr=tuple(sched.lr), momentum=tuple(sched.momentum),
            decay=tuple(m.steps.decay), device=str(encoder.device),
            save_snapshot=snapshots, output_dir=tmp, snapshot_dir=f"{tmp}/snap",
            disp_interval=1 if snapshots else 10**9, return_loss=True,
            postproc=lambda x: (x + mean)[::-1].transpose(1, 2, 0).copy())
        sync()
        t0 = time.perf_counter()
        if setup.generator is None:
            rgb = np.random.default_rng(1).integers(0, 256, size).astype(np.float32)
            bdpy_reconstruct(feats, blurring=True, sigma=tuple(m.steps.blur_sigma),
                             initial_image=rgb,
                             preproc=lambda x: x.transpose(2, 0, 1)[::-1].copy() - mean,
                             **kwargs)
        else:
            g = setup.cfg.generator
            bdpy_reconstruct(feats, generator=setup.generator, feature_lower_bound=g.lower,
                             feature_upper_bound=g.upper, image_size=size, **kwargs)
        sync()
    return (time.perf_counter() - t0) / iters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=METHODS + EXTRA_METHODS)
    parser.add_argument("--no-bdpy", action="store_true")
    parser.add_argument("--no-pipeline", action="store_true")
    add_common_args(parser)
    args = parser.parse_args(argv)
    overrides = setup_run(args)
    encoder = None
    overheads: dict[str, list[float]] = {}
    rows = []
    for method in args.methods:
        setup = method_setup(method, args.iters, args.device, overrides, encoder)
        encoder = setup.encoder
        targets = true_targets(encoder, setup.layers)
        candidates = {"floor": floor, "icnn-pl": icnn_pl}
        if not args.no_pipeline:
            candidates["pipeline"] = functools.partial(pipeline, timings=overheads)
        if not args.no_bdpy and method in METHODS and "lbfgs" not in method:
            candidates["bdpy"] = bdpy_peer
            candidates["bdpy_defaults"] = functools.partial(bdpy_peer, snapshots=True)
        med, peaks = interleave(
            {k: functools.partial(fn, setup, targets, args.iters) for k, fn in candidates.items()},
            args.repeats, args.device)
        row = {"method": method, **{f"{k}_s": round(v, 4) for k, v in med.items()}}
        for k in ("icnn-pl", "pipeline"):
            if k in med:
                row[f"{k}_over_floor"] = round(med[k] / med["floor"], 3)
        if "bdpy" in med:
            row["bdpy_over_icnn-pl"] = round(med["bdpy"] / med["icnn-pl"], 3)
            row["bdpy_defaults_over_icnn-pl"] = round(med["bdpy_defaults"] / med["icnn-pl"], 3)
        if method in overheads:
            row["job_overhead_s"] = round(statistics.median(overheads[method]), 2)
        row |= {f"{k}_peak_mb": round(v) for k, v in peaks.items()}
        rows.append(row)
        print(row, flush=True)
    report(rows, f"{args.iters} iterations x {args.repeats} interleaved repeats (median);"
           " seconds per iteration (L-BFGS: per function evaluation)", args.out)


if __name__ == "__main__":
    sys.exit(main())
