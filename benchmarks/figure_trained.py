"""Figures of reconstructions through the trained EfficientNet-Lite0 (matplotlib).

    OMP_NUM_THREADS=1 python -m benchmarks.figure_trained --threads 1 --images-dir /tmp/img

- ``docs/trained_layers.png`` (as the paper's layer figure): rows the stimuli, columns the
  deepest target layer, from shallow to the logits (``layers=shallow``, ``mid``, ``deep``
  and the logits alone), reconstructed by ``--method`` (the best weight-free method of
  ``bench_trained``), pixel r under each image; for true features and for subject 1's
  simulated decoded features.
- ``docs/prior_methods.png``: every method of ``bench_trained`` at the deep targets, where
  the methods differ, for each kind of features whose images bench_trained saved.

Images come from ``bench_trained --save-images`` (``<layers>-<features>.npz``) where that
ran; a missing column is reconstructed here with the method's defaults and ``--iters``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks import bench_trained as bt
from benchmarks.bench_prior import SOURCES, reconstruct
from benchmarks.harness import add_common_args, compose_cfg, method_setup, setup_run
from icnn_pl.image import display_image
from icnn_pl.pipeline.factory import build_encoder_from_cfg
from icnn_pl.review.metrics import pixel_correlation

COLUMNS = ("shallow", "mid", "deep", "logits")
SOURCE_TITLES = {"true": "true features", "decoded": "decoded features (simulated, subject 1)"}


def cell_images(args: argparse.Namespace, base: list[str], encoder, network_id: str,
                layers: str, source: str, methods: list[str]) -> dict[str, np.ndarray]:
    """``<method>/<label>`` -> final image; saved by bench_trained, or made here."""
    path = args.images_dir / f"{layers}-{source}.npz"
    have = dict(np.load(path)) if path.exists() else {}
    data = bt.batches(base, layers, source, args.images, args.data_root, encoder, network_id)
    for method in methods:
        todo = [b for b in data if f"{method}/{b.labels[0]}" not in have]
        if not todo:
            continue
        setup = method_setup(method, args.iters, args.device,
                             [*base, bt.layers_override(layers)], encoder)
        for b in todo:
            have[f"{method}/{b.labels[0]}"] = reconstruct(setup, b, encoder).image
        args.images_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **have)
    have.update({f"true/{b.labels[0]}": b.true_images[0] for b in data})
    return have


Column = tuple[str, str, dict[str, np.ndarray]]  # header, method, its images by key


def grid_figure(path: Path, blocks: list[tuple[str, list[Column]]], labels: list[str]) -> None:
    """Blocks (title, columns) stacked; one row per stimulus, the true image first."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_cols = len(blocks[0][1]) + 1
    fig = Figure(figsize=(1.4 * n_cols, (1.55 * len(labels) + 0.5) * len(blocks)), dpi=110,
                 layout="constrained")
    FigureCanvasAgg(fig)
    for sub, (title, columns) in zip(fig.subfigures(len(blocks), 1, squeeze=False)[:, 0],
                                     blocks, strict=True):
        sub.suptitle(title, fontsize=9, weight="bold", x=0.02, ha="left")
        axes = sub.subplots(len(labels), n_cols, squeeze=False)
        for i, lab in enumerate(labels):
            true = columns[0][2][f"true/{lab}"].astype(np.uint8)
            cells = [("true", true, "")]
            for header, method, images in columns:
                image = images.get(f"{method}/{lab}")
                shown = None if image is None else display_image(image)
                score = "" if shown is None else f"r = {pixel_correlation(shown, true):.2f}"
                cells.append((header, shown, score))
            for j, (header, image, score) in enumerate(cells):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if image is not None:
                    ax.imshow(image)
                ax.set_xlabel(score, fontsize=8)
                if i == 0:
                    ax.set_title(header, fontsize=7)
                if j == 0:
                    ax.set_ylabel(lab, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"figure: {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="icnn_fourier_lbfgs")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--images", nargs="+", default=list(bt.STIMULI))
    parser.add_argument("--images-dir", type=Path, required=True)
    parser.add_argument("--data-root", default="data/demo")
    parser.add_argument("--layers-out", type=Path, default=Path("docs/trained_layers.png"))
    parser.add_argument("--methods-out", type=Path, default=Path("docs/prior_methods.png"))
    add_common_args(parser)
    args = parser.parse_args(argv)
    base = [*setup_run(args), f"network={bt.NETWORK}"]
    encoder, network_id = build_encoder_from_cfg(compose_cfg(base))
    methods = [c[0] for c in bt.candidates(8)]
    layer_blocks, method_blocks = [], []
    for source in SOURCES:
        layer_blocks.append((f"{SOURCE_TITLES[source]}: {args.method}, by deepest target", [
            (column, args.method, cell_images(args, base, encoder, network_id, column, source,
                                              [args.method])) for column in COLUMNS]))
        deep = cell_images(args, base, encoder, network_id, "deep", source, [])
        if all(f"{m}/{lab}" in deep for m in methods for lab in args.images):
            method_blocks.append((f"{SOURCE_TITLES[source]}: layers=deep",
                                  [(m.replace(" + ", "\n+ "), m, deep) for m in methods]))
    if not method_blocks:
        raise SystemExit(f"no layers=deep images of every method in {args.images_dir}: run"
                         " bench_trained --save-images first")
    grid_figure(args.layers_out, layer_blocks, list(args.images))
    grid_figure(args.methods_out, method_blocks, list(args.images))

if __name__ == "__main__":
    sys.exit(main())
