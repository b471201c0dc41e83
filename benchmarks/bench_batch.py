"""Seconds per image-iteration and images per second against batch size (GD methods).

    python -m benchmarks.bench_batch --batches 1 2 4 --iters 5 --out benchmarks/batch_cpu.csv

Reconstructs B images at once (``data.batch_size=B`` in the pipeline) with the default
icnn_gd / icnn_dgn_gd configs, VGG19 at 224x224 and all 19 layers. Batch sizes are
interleaved and the median of the repeats (after an uncounted warm-up round) is reported,
with the throughput that means at the paper's 200 iterations. On a GPU, batching is where
throughput comes from; on a CPU it must not cost more per image.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

from benchmarks.harness import (
    Setup,
    add_common_args,
    interleave,
    method_setup,
    reconstruct,
    report,
    setup_run,
    sync,
    true_targets,
)


def per_image_iteration(setup: Setup, targets, batch: int, iters: int) -> float:
    """Seconds per image and iteration for ``batch`` copies of the targets."""
    stacked = {n: t.expand(batch, *t.shape[1:]).clone() for n, t in targets.items()}
    sync()
    t0 = time.perf_counter()
    reconstruct(setup, stacked)
    sync()
    return (time.perf_counter() - t0) / (iters * batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["icnn_gd", "icnn_dgn_gd"],
                        choices=["icnn_gd", "icnn_dgn_gd"])
    add_common_args(parser)
    args = parser.parse_args(argv)
    overrides = setup_run(args)
    encoder, rows = None, []
    for method in args.methods:
        setup = method_setup(method, args.iters, args.device, overrides, encoder)
        encoder = setup.encoder
        targets = true_targets(encoder, setup.layers)
        times, peaks = interleave(
            {b: functools.partial(per_image_iteration, setup, targets, b, args.iters)
             for b in args.batches}, args.repeats, args.device)
        for b in args.batches:
            rows.append({"method": method, "batch": b, "s_per_image_iter": round(times[b], 4),
                         "images_per_s_at_200_iter": round(1.0 / (times[b] * 200), 4),
                         "peak_mb": round(peaks[b])})
            print(rows[-1], flush=True)
    report(rows, f"{args.iters} iterations x {args.repeats} interleaved repeats (median)",
           args.out)


if __name__ == "__main__":
    sys.exit(main())
