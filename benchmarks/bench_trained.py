"""Every pixel-space method on the trained EfficientNet-Lite0, by target depth and features.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_trained --threads 1 \
        --out benchmarks/results/trained_cpu.csv

For each target depth (``layers=shallow|mid|deep|all`` of ``conf/network/efficientnet_lite0``)
and each kind of targets (true features of the demo stimuli, or subject 1's simulated decoded
features), every method with its default config (``icnn_gd`` and ``icnn_fourier`` also with
random transforms), one stimulus at a time through the pipeline's own data module and
recipes. ``icnn_gd`` runs ``--gd-iters`` iterations (the reference's 200); the others
``--iters`` (L-BFGS: maxiter). Scores of the final image, mean over the images: pixel r,
pairwise identification by pixel correlation (among the run's images, chance 0.5), SSIM,
feature r (the final image's features against the targets, mean over the target layers),
final loss, wall time. Along the way every evaluation's best-so-far image is scored, so one
run gives the pixel r after 25 / 50 / 100 / 200 evaluations (``r_at_N``) and the evaluations
and seconds each method needs to reach ``icnn_gd``'s final pixel r (``to_gd_evals``,
``to_gd_s``; empty when it does not within its budget).

``--sweep fourier_lr LR ...`` / ``--sweep transforms``: icnn_fourier's Adam learning rate, or
the transforms on and off for both Fourier methods, at one depth (``--layer-sets``).
Rows are appended to ``--out`` as they finish (a long grid keeps what it has done).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.bench_prior import SOURCES, TRANSFORMS, Run, reconstruct, scores
from benchmarks.harness import add_common_args, compose_cfg, method_setup, setup_run, write_csv
from icnn_pl.data.datamodule import TargetBatch
from icnn_pl.image import display_image
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.pipeline.factory import build_datamodule, build_encoder_from_cfg
from icnn_pl.review.feature_fit import image_feature_fit, summarize_fit
from icnn_pl.review.metrics import pixel_correlation

NETWORK = "efficientnet_lite0"
DEPTHS = ("deep", "mid", "shallow", "all")  # the informative ones first
STIMULI = ("chelsea", "coffee")  # 2: the grid fits ~40 min of a shared CPU
CHECKPOINTS = (25, 50, 100, 200)


def candidates(jitter: int) -> list[tuple[str, str, list[str]]]:
    """(label, method, extra overrides); icnn_gd first: its final score is the bar."""
    t = ["++" + TRANSFORMS.format(jitter=jitter)]  # ++: icnn_gd's config has no such key
    return [("icnn_gd", "icnn_gd", []), ("icnn_gd + transforms", "icnn_gd", t),
            ("icnn_lbfgs", "icnn_lbfgs", []), ("icnn_fourier", "icnn_fourier", []),
            ("icnn_fourier + transforms", "icnn_fourier", t),
            ("icnn_fourier_lbfgs", "icnn_fourier_lbfgs", [])]


def layers_override(layers: str) -> str:
    """A preset (``deep``) or a list of layer names (``logits`` or ``pool,logits``)."""
    return f"layers={layers}" if layers in DEPTHS else f"layers.names=[{layers}]"


def batches(base: Sequence[str], layers: str, source: str, labels: Sequence[str], root: str,
            encoder: FeatureEncoder, network_id: str) -> list[TargetBatch]:
    """The pipeline's own targets (and layer weights, true images): one batch per image."""
    cfg = compose_cfg([*base, "data=demo", f"data.source={SOURCES[source]}", "subject=1",
                       f"data.root={root}", f"data.labels=[{','.join(labels)}]",
                       "data.limit=null", layers_override(layers)])
    dm, _ = build_datamodule(cfg, encoder, network_id)
    dm.setup("predict")
    return list(dm.predict_dataloader(list(labels)))


def pixel_curve(run: Run, true: np.ndarray) -> np.ndarray:
    """Pixel r of the best-so-far image after each evaluation."""
    return np.array([pixel_correlation(display_image(im), true) for im in run.images])


def feature_r(encoder: FeatureEncoder, runs: dict[str, Run], data: list[TargetBatch]) -> float:
    """The final images' features against the targets (mean over layers and images)."""
    out = []
    for b in data:
        targets = {n: t[0].cpu().numpy() for n, t in b.targets.items()}
        rows, _ = image_feature_fit(encoder, runs[b.labels[0]].image, targets)
        out.append(summarize_fit(rows)["feat_corr_target"])
    return round(statistics.mean(out), 3)


def row(tag: dict, runs: dict[str, Run], data: list[TargetBatch], encoder: FeatureEncoder,
        bar: float | None) -> dict:
    trues = {b.labels[0]: b.true_images[0] for b in data}
    curves = [pixel_curve(runs[lab], trues[lab]) for lab in trues]
    n = min(len(c) for c in curves)
    mean_curve = np.mean([c[:n] for c in curves], axis=0)
    stamps = np.mean([runs[lab].stamps[:n] for lab in trues], axis=0)
    out = {**tag, **scores({lab: r.image for lab, r in runs.items()}, trues),
           "feature_r": feature_r(encoder, runs, data),
           "final_loss": float(statistics.mean(r.loss for r in runs.values())),
           "evals": round(statistics.mean(r.evals for r in runs.values()), 1),
           "wall_s": round(statistics.mean(r.wall_s for r in runs.values()), 1),
           "s_per_eval": round(statistics.mean(r.wall_s / r.evals for r in runs.values()), 4)}
    for k in CHECKPOINTS:
        out[f"r_at_{k}"] = round(float(mean_curve[k - 1]), 3) if k <= n else ""
    reached = np.nonzero(mean_curve >= bar)[0] if bar is not None else []
    out["to_gd_evals"] = int(reached[0]) + 1 if len(reached) else ""
    out["to_gd_s"] = round(float(stamps[reached[0]]), 1) if len(reached) else ""
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--gd-iters", type=int, default=200)
    parser.add_argument("--images", nargs="+", default=list(STIMULI))
    parser.add_argument("--layer-sets", nargs="+", default=list(DEPTHS), choices=DEPTHS)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--data-root", default="data/demo")
    parser.add_argument("--save-images", type=Path, default=None,
                        help="folder for each cell's final images (<layers>-<features>.npz,"
                             " key <method>/<label>) for benchmarks/figure_trained.py")
    parser.add_argument("--sweep", nargs="+", default=None,
                        help="fourier_lr LR ... | transforms | lbfgs: instead of the grid")
    add_common_args(parser)
    args = parser.parse_args(argv)
    base = [*setup_run(args), f"network={NETWORK}"]
    jitter = max(1, round(8 * args.size / 224))
    cands = candidates(jitter)
    if args.sweep and args.sweep[0] == "fourier_lr":
        cands = [(f"icnn_fourier lr {lr}", "icnn_fourier", [f"optimizer.schedule.lr=[{lr},{lr}]"])
                 for lr in args.sweep[1:]]
    elif args.sweep and args.sweep[0] == "transforms":
        cands = [c for c in cands if c[1].startswith("icnn_fourier")]
    encoder, network_id = build_encoder_from_cfg(compose_cfg(base))
    encoder.to(args.device)
    rows: list[dict] = []
    for depth in args.layer_sets:
        for source in args.sources:
            data = batches(base, depth, source, args.images, args.data_root, encoder, network_id)
            bar, shown = None, {}
            for label, method, extra in cands:
                n_iter = args.gd_iters if label == "icnn_gd" else args.iters
                setup = method_setup(method, n_iter, args.device,
                                     [*base, layers_override(depth), *extra], encoder)
                runs = {b.labels[0]: reconstruct(setup, b, encoder) for b in data}
                tag = {"layers": depth, "features": source, "method": label, "n_iter": n_iter}
                rows.append(row(tag, runs, data, encoder, bar))
                if label == "icnn_gd":
                    bar = rows[-1]["pixel_corr"]
                print(rows[-1], flush=True)
                write_csv(rows, args.out)
                shown.update({f"{label}/{lab}": r.image for lab, r in runs.items()})
            if args.save_images is not None:
                args.save_images.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(args.save_images / f"{depth}-{source}.npz", **shown)


if __name__ == "__main__":
    sys.exit(main())
