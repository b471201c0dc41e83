"""Feature decoding: our batched decoder vs the lab's fastl2lir 0.11, side by side.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_decoding --threads 1 \
        --out benchmarks/results/decoding_cpu.csv

Same simulated data for both (6,000 training samples = 1,200 images x 5 repeats, 50 test
images, 5,000 to 15,000 voxels, k = 500, alpha 100, float32), the same thread count for
both (BLAS and torch), each side in its own process so its peak resident memory is its own.
Per side: the fixed cost (normalisation, Gram matrix, correlations' set-up) and the cost
per unit, from two runs of different unit counts (``t(u) = fixed + u * per_unit``);
reported as seconds per 10,000 units. fastl2lir runs in its NumPy<2 venv
(``icnn_pl/decoding/fastl2lir_env.py``).

``device_section(check)`` is the decoding section of ``benchmarks/device_check.py``: one
whole VGG19 layer (conv1_1 at 224x224: 3.2 M units) of a simulated subject on the GPU,
stopped at a time budget and extrapolated; on the CPU smoke run a tiny layer.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icnn_pl.decoding.decoder import TopKRidge, zscore_stats
from icnn_pl.decoding.fastl2lir_env import run_fastl2lir

REPO = Path(__file__).resolve().parents[1]
VGG19_UNITS = 14_900_000   # all 19 layers at 224x224 (reference section 10)
CONV1_1_UNITS = 64 * 224 * 224


def simulate(n_images: int, repeats: int, n_test: int, voxels: int, units: int,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trials x voxels, trials x units, test x voxels: voxels are noisy mixtures of
    30 latent image factors that the units also carry."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n_images + n_test, 30)).astype(np.float32)
    Y_img = Z @ rng.standard_normal((30, units)).astype(np.float32)
    Y_img += rng.standard_normal(Y_img.shape, dtype=np.float32)
    mix = rng.standard_normal((30, voxels)).astype(np.float32)
    trials = np.tile(np.arange(n_images), repeats)
    X = Z[trials] @ mix + 3 * rng.standard_normal((len(trials), voxels), dtype=np.float32)
    Xt = Z[n_images:] @ mix + 3 / np.sqrt(repeats) * rng.standard_normal((n_test, voxels),
                                                                         dtype=np.float32)
    return X, Y_img[trials], Xt


def ours(X: np.ndarray, Y: np.ndarray, Xt: np.ndarray, k: int, alpha: float, chunk: int,
         device: str = "cpu") -> tuple[np.ndarray, dict[str, float]]:
    """Our decoder: set-up (Gram) time, then every unit in chunks; predictions."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    dec = TopKRidge(X, Xt, alpha, k, device, "float32")
    sync()
    setup = time.perf_counter() - t0
    ym, yn = zscore_stats(Y)
    t0 = time.perf_counter()
    preds = [dec.fit_predict(Y[:, s:s + chunk], ym[s:s + chunk], yn[s:s + chunk]).pred.cpu()
             for s in range(0, Y.shape[1], chunk)]
    sync()
    return torch.cat(preds, 1).numpy(), {"setup_s": setup, "units_s": time.perf_counter() - t0}


def _worker(args: argparse.Namespace) -> None:
    """One side in its own process (``--worker``): prints timing and peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    d = Path(args.data)
    X, Y, Xt = (np.load(d / f"{n}.npy") for n in ("X", "Y", "Xt"))
    Y = Y[:, :args.n_units]
    pred, info = ours(X, Y, Xt, args.k, args.alpha, args.chunk)
    np.save(d / "ours.npy", pred)
    info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(info))


def _ours_subprocess(d: Path, units: int, k: int, alpha: float, chunk: int, threads: int
                     ) -> dict[str, float]:
    env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_decoding", "--worker",
                          "--data", str(d), "--n-units", str(units), "--k", str(k),
                          "--alpha", str(alpha), "--chunk", str(chunk),
                          "--threads", str(threads)],
                         cwd=REPO, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(voxels: int, units: tuple[int, int], ref_units: tuple[int, int], k: int,
            threads: int, chunk: int, n_images: int = 1200, repeats: int = 5,
            n_test: int = 50, alpha: float = 100.0) -> dict[str, Any]:
    """Both sides at one shape: fixed and per-unit costs, peak memory, max |difference|."""
    X, Y, Xt = simulate(n_images, repeats, n_test, voxels, max(units + ref_units))
    with tempfile.TemporaryDirectory(prefix="bench-decoding-") as tmp:
        d = Path(tmp)
        for name, a in (("X", X), ("Y", Y), ("Xt", Xt)):
            np.save(d / f"{name}.npy", a)
        runs = [_ours_subprocess(d, u, k, alpha, chunk, threads) for u in units]
        ours_pred = np.load(d / "ours.npy")
    per_unit = (runs[1]["units_s"] - runs[0]["units_s"]) / (units[1] - units[0])
    fixed = runs[0]["setup_s"] + runs[0]["units_s"] - units[0] * per_unit
    refs = [run_fastl2lir(X, Y[:, :u], Xt, alpha, k, dtype="float32", threads=threads)
            for u in ref_units]
    r_per = (refs[1][1]["fit_s"] - refs[0][1]["fit_s"]) / (ref_units[1] - ref_units[0])
    r_fixed = refs[0][1]["fit_s"] - ref_units[0] * r_per
    n = min(units[1], ref_units[1])
    diff = float(np.abs(ours_pred[:, :n] - refs[1][0][:, :n]).max())
    return {"samples": X.shape[0], "voxels": voxels, "k": k, "threads": threads,
            "ours_fixed_s": round(fixed, 2), "ours_s_per_10k_units": round(per_unit * 1e4, 1),
            "ours_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
            "fastl2lir_fixed_s": round(r_fixed, 2),
            "fastl2lir_s_per_10k_units": round(r_per * 1e4, 1),
            "fastl2lir_peak_rss_mb": round(max(r[1]["peak_rss_mb"] for r in refs)),
            "speedup_per_unit": round(r_per / per_unit, 2),
            "max_abs_diff": f"{diff:.2g}", "max_abs_pred": f"{np.abs(refs[1][0]).max():.3g}"}


# -- device check -------------------------------------------------------------------------
def device_section(check: Any) -> None:
    """One VGG19 layer (conv1_1, 3.2 M units) of a simulated subject: 6,000 trials, 5,000
    voxels, k = 500, on ``check.device``; units are simulated chunk by chunk on the device
    (a whole layer is 77 GB), stopped after ``budget_s`` and extrapolated to the layer
    and to all 19 layers. On the CPU (smoke run) a tiny layer checks the code path."""
    gpu = torch.device(check.device).type == "cuda"
    n, v, k, m, units, chunk, budget_s = ((6000, 5000, 500, 50, CONV1_1_UNITS, 2048, 150.0)
                                          if gpu else (600, 300, 50, 10, 4096, 512, 20.0))
    g = torch.Generator(device=check.device).manual_seed(0)
    X = torch.randn(n, v, generator=g, device=check.device)
    Xt = torch.randn(m, v, generator=g, device=check.device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    t0 = time.perf_counter()
    dec = TopKRidge(X.cpu().numpy(), Xt.cpu().numpy(), 100.0, k, check.device, "float32")
    sync()
    setup = time.perf_counter() - t0
    done, t0 = 0, time.perf_counter()
    while done < units and time.perf_counter() - t0 < budget_s:
        c = min(chunk, units - done)
        Y = torch.randn(n, c, generator=g, device=check.device)
        ym, yn = Y.mean(0), Y.std(0)
        dec.fit_predict(Y, ym, yn)
        done += c
    sync()
    wall = time.perf_counter() - t0
    per_unit = wall / done
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    check.table("decoding", [{
        "device": check.device, "samples": n, "voxels": v, "k": k, "chunk": chunk,
        "units_done": done, "setup_s": round(setup, 2),
        "s_per_10k_units": round(per_unit * 1e4, 3),
        "conv1_1_s": round(setup + per_unit * units, 1),
        "all_19_layers_min": round((setup + per_unit * VGG19_UNITS) / 60, 1),
        "peak_gb": round(peak, 2)}])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="threads for BOTH sides")
    p.add_argument("--voxels", type=int, nargs="+", default=[5000, 15000])
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--alpha", type=float, default=100.0)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--units", type=int, nargs=2, default=[512, 1536],
                   help="our two unit counts (slope = per unit)")
    p.add_argument("--ref-units", type=int, nargs=2, default=[100, 400],
                   help="fastl2lir's two unit counts")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n-units", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    rows = []
    for v in args.voxels:
        row = compare(v, tuple(args.units), tuple(args.ref_units), args.k, args.threads,
                      args.chunk)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        import csv

        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
