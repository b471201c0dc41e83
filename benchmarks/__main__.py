"""Every benchmark with the settings of the README's tables, one after another.

    python -m benchmarks [--device cuda] [--only iteration layers ...]

Writes ``benchmarks/results/<name>_<cpu|gpu>.csv`` and prints each table. About 35
minutes on a 2-core CPU (time to quality alone runs eight 200-iteration reconstructions).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks import bench_batch, bench_iteration, bench_layers, bench_memory, bench_quality
from benchmarks.harness import REPO

# name -> (script, its arguments for the README's tables)
SUITE = {
    "iteration": (bench_iteration, ["--iters", "10", "--repeats", "3"]),
    "layers": (bench_layers, ["--iters", "10", "--repeats", "3"]),
    "batch": (bench_batch, ["--iters", "5", "--repeats", "2"]),
    "memory": (bench_memory, ["--images", "20", "--iters", "5"]),
    "quality": (bench_quality, ["--iters", "200", "--budget", "200"]),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda[:i]: never chosen by itself")
    parser.add_argument("--only", nargs="+", choices=list(SUITE), default=list(SUITE))
    args = parser.parse_args(argv)
    kind = "gpu" if torch.device(args.device).type == "cuda" else "cpu"
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    for name in args.only:
        script, script_args = SUITE[name]
        out = out_dir / f"{name}_{kind}.csv"
        print(f"\n== {name}: python -m {script.__name__} {' '.join(script_args)} --out {out}",
              flush=True)
        t0 = time.perf_counter()
        script.main([*script_args, "--device", args.device, "--out", str(out)])
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
