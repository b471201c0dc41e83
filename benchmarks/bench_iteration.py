"""Seconds per iteration: icnn-pl against the floor and bdpy, side by side in one process.

    python benchmarks/bench_iteration.py --iters 10 --repeats 2 --out benchmarks/results.csv

For each GD method (icnn_gd, icnn_dgn_gd) on VGG19 at 224x224 with all 19 layers:
- floor: a bare forward to the deepest target layer and backward to the input (through
  the generator for DGN), with the l2 objective; no optimiser, logging or Lightning;
- ours: ``icnn_pl.icnn_gd.reconstruct_image`` / ``icnn_dgn_gd`` (LightningModule + lean
  Trainer, default options), per-iteration time including Trainer set-up;
- bdpy: ``bdpy.recon.torch.icnn.reconstruct`` with the same network, targets and options
  (snapshots off), and with its default snapshot/print settings ("bdpy_defaults").
Measurements are interleaved (floor, ours, bdpy, floor, ...) and the median is reported.
Random weights are used (the cost does not depend on the weight values).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from icnn_pl import icnn_dgn_gd, icnn_gd
from icnn_pl.image import to_caffe
from icnn_pl.nets import build_encoder, build_generator
from icnn_pl.nets.generator import center_crop
from icnn_pl.nets.vgg import VGG19_LAYERS


def targets_for(encoder, layers):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (224, 224, 3)).astype(np.float32)
    encoder.set_layers(layers)
    with torch.no_grad():
        return {k: v[0].numpy() for k, v in encoder(to_caffe(img, encoder.mean_bgr)).items()}


def floor(encoder, feats, iters, generator=None):
    """Bare forward to the deepest target and backward to the input (no optimiser)."""
    net = encoder.net
    names = list(feats)
    targets = {n: torch.from_numpy(f)[None] for n, f in feats.items()}
    captured = {}
    hooks = [net.get_submodule(VGG19_LAYERS[n]).register_forward_hook(
        lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in names]
    if generator is None:
        x = torch.zeros(1, 3, 224, 224, requires_grad=True)
    else:
        x = torch.zeros(1, 4096, requires_grad=True)
    t0 = time.perf_counter()
    for _ in range(iters):
        img = x if generator is None else center_crop(generator(x), (224, 224))
        net(img)  # full forward: fc8 is the deepest of the 19 layers
        loss = sum(((captured[n] - targets[n]) ** 2).sum() for n in names)
        loss.backward()
        x.grad = None
    dt = (time.perf_counter() - t0) / iters
    for h in hooks:
        h.remove()
    return dt


def ours(encoder, feats, iters, generator=None):
    t0 = time.perf_counter()
    if generator is None:
        icnn_gd.reconstruct_image(feats, encoder, iter_n=iters)
    else:
        icnn_dgn_gd.reconstruct_image(feats, encoder, generator, iter_n=iters)
    return (time.perf_counter() - t0) / iters


def bdpy_peer(encoder, feats, iters, generator=None, snapshots: bool = False):
    """bdpy with snapshots off (the same work as ours), or with its defaults (a TIFF
    snapshot and a printed line every iteration)."""
    from bdpy.recon.torch.icnn import reconstruct

    mapping = {n: VGG19_LAYERS[n].replace("features.", "features[").replace(
        "classifier.", "classifier[") + "]" for n in feats}
    feats = {n: f[None] for n, f in feats.items()}  # bdpy wants the batch axis
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        kwargs = dict(encoder=encoder.net, layer_mapping=mapping, n_iter=iters,
                      save_snapshot=snapshots, output_dir=tmp, snapshot_dir=f"{tmp}/snap",
                      disp_interval=1 if snapshots else 10**9, return_loss=True)
        # As bdpy's users run it: RGB HWC images outside, Caffe space inside.
        mean = np.asarray(encoder.mean_bgr, dtype=np.float32).reshape(3, 1, 1)
        kwargs["postproc"] = lambda x: (x + mean)[::-1].transpose(1, 2, 0).copy()
        t0 = time.perf_counter()
        if generator is None:
            rgb = np.random.default_rng(1).integers(0, 256, (224, 224, 3)).astype(np.float32)
            reconstruct(feats, blurring=True, initial_image=rgb,
                        preproc=lambda x: x.transpose(2, 0, 1)[::-1].copy() - mean, **kwargs)
        else:
            reconstruct(feats, generator=generator, decay=(0.01, 0.01),
                        feature_lower_bound=0.0, feature_upper_bound=100.0,
                        image_size=(224, 224, 3), **kwargs)
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bdpy", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    encoder = build_encoder("vgg19")
    generator = build_generator("relu7")
    layers = list(VGG19_LAYERS)
    feats = targets_for(encoder, layers)
    candidates = {"floor": floor, "icnn-pl": ours}
    if not args.no_bdpy:
        candidates["bdpy"] = bdpy_peer
        candidates["bdpy_defaults"] = functools.partial(bdpy_peer, snapshots=True)
    rows = []
    for method, gen in (("icnn_gd", None), ("icnn_dgn_gd", generator)):
        times = {k: [] for k in candidates}
        for _ in range(args.repeats):
            for name, fn in candidates.items():
                times[name].append(fn(encoder, feats, args.iters, gen))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"method": method, **{f"{k}_s_per_iter": round(v, 4) for k, v in med.items()},
               "ours_over_floor": round(med["icnn-pl"] / med["floor"], 3)}
        if "bdpy" in med:
            row["bdpy_over_ours"] = round(med["bdpy"] / med["icnn-pl"], 3)
            row["bdpy_defaults_over_ours"] = round(med["bdpy_defaults"] / med["icnn-pl"], 3)
        rows.append(row)
        print(row, flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.iters} iterations x {args.repeats} interleaved repeats (median)")
    if args.out:
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
