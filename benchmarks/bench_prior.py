"""Image priors side by side: pixels, the (random) DGN and the weight-free Fourier prior.

    python -m benchmarks.bench_prior --size 64 --iters 100 --images astronaut chelsea \
        --threads 1 --out benchmarks/results/prior_cpu.csv --figure docs/prior_methods.png

(the committed table and picture: about 22 minutes on the shared 2-core CPU.)

The demo's random VGG19 (``conf/``: data=demo), its stimuli, and for every combination of
- targets from ``conv3_1`` up (``layers=conv`` minus conv1_x and conv2_x) or all 19 layers,
- true features of the stimuli or subject 1's (simulated) decoded features,
each method with its default config and ``--iters`` iterations (L-BFGS: ``maxiter``), one
image at a time, through the pipeline's own data module and recipes. Two read-outs per run:
- ``iters``: the result after the iteration budget (equal iterations);
- ``time``: equal wall time: the lowest-loss image evaluated before ``icnn_gd``'s mean wall
  time for the budget (``budget_s``); a method that ends sooner is read at its end.
Scores (mean over the images): pixel correlation, pairwise identification by correlation
(among the images of the run, chance 0.5) and SSIM of the display images as the lab scores
them, and the final loss (the same objective in every method).

``--figure PATH``: a picture of every method's final images in the ``--figure-cell`` case
(default all layers, decoded features), true images first (``docs/prior_methods.png``).
``--sweep-lr LR ...``: icnn_fourier at each Adam learning rate instead (how its default was
chosen); ``--transforms``: icnn_fourier with and without random transforms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import (
    Setup,
    add_common_args,
    compose_cfg,
    method_setup,
    report,
    setup_run,
)
from benchmarks.harness import reconstruct as run_recipe
from icnn_pl.data.datamodule import TargetBatch
from icnn_pl.image import display_image, from_caffe
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.pipeline.factory import build_datamodule, build_encoder_from_cfg
from icnn_pl.review.gallery import make_gallery, save_png
from icnn_pl.review.metrics import pixel_correlation, score_images

# name -> (the layers option of conf/layers, its first layers left out)
LAYER_SETS = {"conv3+": ("conv", ("conv1_1", "conv1_2", "conv2_1", "conv2_2")), "all": ("all", ())}
SOURCES = {"true": "true_features", "decoded": "decoded"}
METHODS = ("icnn_gd", "icnn_lbfgs", "icnn_dgn_gd", "icnn_dgn_lbfgs", "icnn_fourier",
           "icnn_fourier_lbfgs", "dgn_direct")
FC7_METHODS = ("dgn_direct",)  # need fc7 among the targets: skipped for conv3+
STIMULI = ("astronaut", "chelsea")
# lucid's jitter is 8 pixels at 224: the same share of the image at --size
TRANSFORMS = "method.transforms={{jitter:{jitter},scale:[0.95,1.05],rotate:5}}"


@dataclass
class Run:
    """One reconstruction: its final image and loss, and what it had at the time budget."""

    image: np.ndarray
    loss: float
    evals: int
    wall_s: float
    stamps: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # the best image so far, per eval

    def at(self, seconds: float) -> tuple[np.ndarray, float]:
        """The lowest-loss image evaluated by ``seconds`` (the end, for a shorter run)."""
        k = int(np.searchsorted(self.stamps, seconds, side="right")) - 1
        if k < 0 or k >= len(self.stamps) - 1:
            return self.image, self.loss
        return self.images[k], min(self.losses[: k + 1])


def batches(size: int, layers: Sequence[str], source: str, labels: Sequence[str], root: str,
            encoder: FeatureEncoder, network_id: str) -> list[TargetBatch]:
    """The pipeline's own targets (and layer weights, true images): one batch per image."""
    cfg = compose_cfg([f"network.input_size=[{size},{size}]", "data=demo",
                       f"data.source={SOURCES[source]}", "subject=1", f"data.root={root}",
                       f"data.labels=[{','.join(labels)}]", "data.limit=null",
                       f"layers.names=[{','.join(layers)}]"])
    dm, _ = build_datamodule(cfg, encoder, network_id)
    dm.setup("predict")
    return list(dm.predict_dataloader(list(labels)))


def reconstruct(setup: Setup, batch: TargetBatch, encoder: FeatureEncoder) -> Run:
    """One stimulus with a method's ``setup``; every evaluation's time, loss and best image."""
    run = Run(image=np.empty(0), loss=float("nan"), evals=0, wall_s=0.0)
    best = [float("inf"), None]
    t0 = time.perf_counter()

    def on_eval(loss: torch.Tensor, image: torch.Tensor) -> None:
        value = float(loss.detach().sum())
        if value < best[0]:
            best[0], best[1] = value, image.detach().clone()  # pixels change in place
        run.stamps.append(time.perf_counter() - t0)
        run.losses.append(value)
        run.images.append(best[1])

    result = run_recipe(setup, batch.targets, on_eval=on_eval,
                        build={"weights": batch.weights, "labels": batch.labels})
    run.wall_s = time.perf_counter() - t0
    run.image, run.loss, run.evals = result.images[0], float(result.loss_history[0, -1]), \
        result.n_evals
    run.images = [from_caffe(im, encoder.mean_bgr)[0] for im in run.images]
    return run


def scores(images: dict[str, np.ndarray], trues: dict[str, np.ndarray]) -> dict[str, float]:
    rows = score_images(images, trues)
    return {k: round(statistics.mean(r[k] for r in rows), 3)
            for k in ("pixel_corr", "ident_corr", "ssim")}


def table_rows(tag: dict, runs: dict[str, Run], trues: dict[str, np.ndarray],
               budget_s: float) -> list[dict]:
    rows = []
    for readout in ("iters", "time"):
        picked = {lab: (r.image, r.loss) if readout == "iters" else r.at(budget_s)
                  for lab, r in runs.items()}
        rows.append({
            **tag, "readout": readout,
            **scores({lab: im for lab, (im, _) in picked.items()}, trues),
            "final_loss": float(statistics.mean(loss for _, loss in picked.values())),
            # convergence: the best loss by half the evaluations, over the final one
            "half_over_final": round(statistics.mean(
                min(r.losses[: max(1, len(r.losses) // 2)]) / min(r.losses)
                for r in runs.values()), 3),
            "evals": round(statistics.mean(r.evals for r in runs.values()), 1),
            "wall_s": round(statistics.mean(r.wall_s for r in runs.values()), 1),
            "s_per_eval": round(statistics.mean(r.wall_s / r.evals for r in runs.values()), 4),
            "budget_s": round(budget_s, 1),
        })
    return rows


def save_figure(path: Path, runs: dict[str, dict[str, Run]], trues: dict[str, np.ndarray]
                ) -> None:
    """One row per stimulus: the true image, then each method's final image (pixel r)."""
    labels = list(trues)
    rows = [(lab, [trues[lab].astype(np.uint8), *(r[lab].image for r in runs.values())])
            for lab in labels]

    def pixel_r(image: np.ndarray, lab: str) -> float:  # rounded to 3 first, as in the table
        return round(pixel_correlation(display_image(image), trues[lab]), 3)

    captions = [["", *(f"r={pixel_r(r[lab].image, lab):.2f}" for r in runs.values())]
                for lab in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = make_gallery(rows, ["true", *runs], captions, cell=96)
    save_png(picture.quantize(256), path)  # 256 colours: a small file for the docs
    print(f"figure: {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--images", nargs="+", default=list(STIMULI))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--layer-sets", nargs="+", default=list(LAYER_SETS), choices=LAYER_SETS)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--data-root", default="data/demo")
    parser.add_argument("--sweep-lr", nargs="+", default=None,
                        help="icnn_fourier at these Adam learning rates, constant (0.4) or"
                             " linear start:end (0.4:0.04), instead of --methods")
    parser.add_argument("--transforms", action="store_true",
                        help="icnn_fourier with and without random transforms")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the final images")
    parser.add_argument("--figure-cell", nargs=2, default=["all", "decoded"],
                        metavar=("LAYERS", "FEATURES"))
    add_common_args(parser)
    args = parser.parse_args(argv)
    base = setup_run(args)
    size = int(args.size)
    # (label, method, extra overrides) of each candidate; icnn_gd first: it sets budget_s
    candidates = [(m, m, []) for m in args.methods]
    if args.sweep_lr:
        lrs = [(lr.split(":") * 2)[:2] for lr in args.sweep_lr]
        candidates = [(f"icnn_fourier lr {a}" + (f" -> {b}" if b != a else ""), "icnn_fourier",
                       [f"optimizer.schedule.lr=[{a},{b}]"]) for a, b in lrs]
    if args.transforms:
        candidates = [("icnn_fourier", "icnn_fourier", []),
                      ("icnn_fourier + transforms", "icnn_fourier",
                       [TRANSFORMS.format(jitter=max(1, round(8 * size / 224)))])]
    encoder, network_id = build_encoder_from_cfg(compose_cfg(base))
    encoder.to(args.device)
    rows = []
    for layer_set in args.layer_sets:
        option, left_out = LAYER_SETS[layer_set]
        layers = [n for n in compose_cfg([f"layers={option}"]).layers.names if n not in left_out]
        for source in args.sources:
            data = batches(size, layers, source, args.images,
                           args.data_root, encoder, network_id)
            trues = {b.labels[0]: b.true_images[0] for b in data}
            overrides = [*base, f"layers.names=[{','.join(layers)}]"]
            budget_s = None
            shown = {}
            for label, method, extra in candidates:
                if method in FC7_METHODS and "fc7" not in layers:
                    continue
                # one recipe per candidate, as a job builds one for all its images
                setup = method_setup(method, args.iters, args.device, [*overrides, *extra],
                                     encoder)
                runs = {b.labels[0]: reconstruct(setup, b, encoder) for b in data}
                if budget_s is None:
                    budget_s = statistics.mean(r.wall_s for r in runs.values())
                shown[label] = runs
                tag = {"layers": layer_set, "features": source, "method": label}
                for row in table_rows(tag, runs, trues, budget_s):
                    rows.append(row)
                    print(row, flush=True)
            if args.figure is not None and [layer_set, source] == args.figure_cell:
                save_figure(args.figure, shown, trues)
    report(rows, f"demo random VGG19 at {size}x{size}, images {args.images}, subject 1 decoded;"
           f" {args.iters} iterations (L-BFGS maxiter); 'time' = at the first candidate's mean"
           " wall time (budget_s)", args.out)


if __name__ == "__main__":
    sys.exit(main())
