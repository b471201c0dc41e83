"""Memory across images: a 20-image job through ``train_recon.py``, logger on.

    python -m benchmarks.bench_memory --images 20 --iters 5 --out benchmarks/memory_cpu.csv

Writes 20 natural images (scikit-image's demo stimuli, flipped for more) to a folder and
reconstructs them from their true features (``data=true_features``, ``icnn_gd`` defaults
but ``--iters`` iterations, VGG19 224x224, all 19 layers, W&B offline). A watcher thread
notes the process's resident memory (on a GPU also the allocator's live bytes) the moment
each image's ``.mat`` appears. Forward hooks, graphs and modules freed after each image
mean the memory stays flat: ``growth_mb_per_image`` is the least-squares slope over the
second half of the images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import (
    PeakMemory,
    add_common_args,
    report,
    rss_mb,
    run_train_recon,
    setup_run,
)
from icnn_pl.data.demo import STIMULI, load_stimulus


def write_images(folder: Path, n: int) -> None:
    """``n`` distinct images: the demo stimuli, then their mirror images, then flipped."""
    variants = (lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1])
    for i in range(n):
        name, k = STIMULI[i % len(STIMULI)], i // len(STIMULI)
        img = Image.fromarray(np.ascontiguousarray(variants[k % 3](load_stimulus(name))))
        img.convert("RGB").save(folder / f"{name}-{k}.png")


class ImageWatcher(threading.Thread):
    """Memory when each reconstruction file appears under ``run_dir``."""

    def __init__(self, run_dir: Path, cuda: bool) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.cuda = run_dir, cuda
        self.rows: list[dict[str, float]] = []
        self.stop = threading.Event()
        self._seen: set[Path] = set()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for path in sorted(self.run_dir.rglob("recon_image-*.mat")):
                if path not in self._seen:
                    self._seen.add(path)
                    row = {"image": len(self._seen), "label": path.stem.split("-", 1)[1],
                           "t_s": round(time.perf_counter() - self._t0, 1),
                           "rss_mb": round(rss_mb(), 1)}
                    if self.cuda:
                        row["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
                    self.rows.append(row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--method", default="icnn_gd")
    add_common_args(parser)
    args = parser.parse_args(argv)
    overrides = setup_run(args)
    cuda = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        images, run_dir = Path(tmp) / "images", Path(tmp) / "run"
        images.mkdir()
        write_images(images, args.images)
        watcher = ImageWatcher(run_dir, cuda)
        watcher.start()
        with PeakMemory(args.device) as peak:
            wall = run_train_recon([
                f"method={args.method}", f"method.n_iter={args.iters}", "data=true_features",
                f"data.root={images}", "progress=false", "logger=wandb",
                f"hydra.run.dir={run_dir}", *overrides])
        time.sleep(0.2)
        watcher.stop.set()
        watcher.join()
    rows = watcher.rows
    key = "cuda_allocated_mb" if cuda else "rss_mb"
    half = rows[len(rows) // 2:]
    slope = np.polyfit([r["image"] for r in half], [r[key] for r in half], 1)[0]
    report(rows, f"{args.method}, {args.images} images x {args.iters} iterations, job wall"
           f" {wall:.0f} s; peak {'CUDA allocated' if cuda else 'RSS'} {peak.peak_mb:.0f} MB;"
           f" {key} after image 1: {rows[0][key]:.0f} MB, after image {rows[-1]['image']}:"
           f" {rows[-1][key]:.0f} MB; growth over the second half: {slope:+.2f} MB per image",
           args.out)


if __name__ == "__main__":
    sys.exit(main())
