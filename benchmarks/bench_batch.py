"""Seconds per image-iteration against batch size (GD methods), one process.

    python benchmarks/bench_batch.py --batches 1 2 4 --iters 5

Reconstructs B images at once (``data.batch_size=B`` in the pipeline) with the default
icnn_gd / icnn_dgn_gd settings, VGG19 at 224x224 and all 19 layers, and prints the time
per image and iteration. Batch sizes are interleaved and the median of the repeats is
reported. On a GPU, batching is where throughput comes from; on a CPU it must not cost
more per image.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from benchmarks.bench_iteration import targets_for
from icnn_pl.build import build_reconstruction
from icnn_pl.nets import build_encoder, build_generator
from icnn_pl.nets.vgg import VGG19_LAYERS
from icnn_pl.objective import layer_weights
from icnn_pl.optim import GDSteps, Linear
from icnn_pl.runner import device_trainer_args, fit


def per_image_iteration(encoder, feats, batch, iters, generator=None) -> float:
    targets = {n: torch.from_numpy(f)[None].expand(batch, *f.shape).clone()
               for n, f in feats.items()}
    labels = [f"im{i}" for i in range(batch)]
    recipe = {"optimizer": partial(torch.optim.SGD, lr=2.0, momentum=0.9), "n_iter": iters,
              "schedules": {"lr": Linear(2.0, 1e-10), "momentum": Linear(0.9, 0.9)}}
    if generator is None:
        recipe |= {"init": "uniform", "steps": GDSteps(
            decay=Linear(0.2, 1e-10), blur_sigma=Linear(2.0, 0.5))}
    else:
        recipe |= {"init": "normal", "generator": generator, "code_bounds": (0.0, 100.0),
                   "steps": GDSteps(decay=Linear(0.01, 0.01)), "return_last_forward": True}
    module = build_reconstruction(targets, encoder, weights=layer_weights(targets),
                                  labels=labels, **recipe)
    t0 = time.perf_counter()
    fit(module, **device_trainer_args(encoder.device))
    return (time.perf_counter() - t0) / (iters * batch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    encoder = build_encoder("vgg19").to(args.device)
    generator = build_generator("relu7").to(args.device)
    feats = targets_for(encoder, list(VGG19_LAYERS))
    for method, gen in (("icnn_gd", None), ("icnn_dgn_gd", generator)):
        times = {b: [] for b in args.batches}
        for _ in range(args.repeats):
            for b in args.batches:
                times[b].append(per_image_iteration(encoder, feats, b, args.iters, gen))
        for b in args.batches:
            med = statistics.median(times[b])
            print(f"{method} batch {b}: {med:.4f} s per image-iteration, "
                  f"{1.0 / (med * 200):.3f} images/s at 200 iterations", flush=True)


if __name__ == "__main__":
    main()
