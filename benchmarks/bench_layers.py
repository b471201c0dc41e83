"""Early stop: seconds per iteration of ``icnn_gd`` for each layer set, one process.

    python -m benchmarks.bench_layers --iters 10 --repeats 3 --out benchmarks/layers_cpu.csv

For each layer set of ``conf/layers`` (paper Fig 4), interleaved, median of the repeats
after one uncounted warm-up round:
- ``full_net``: the bare forward through all of VGG19 and backward (no early stop), the
  cost every layer set would pay if the encoder ran the whole network;
- ``floor``: the bare forward to the deepest target layer and backward;
- ``icnn-pl``: the reconstruction (``icnn_gd`` defaults) with that layer set.
``icnn-pl_over_full_net`` is the fraction of the full cost a layer set pays; it should
follow ``floor_over_full_net`` (proportionally faster), and ``icnn-pl_over_floor`` stay ~1.
"""

from __future__ import annotations

import argparse
import functools
import sys

from benchmarks.bench_iteration import icnn_pl
from benchmarks.harness import (
    REPO,
    add_common_args,
    floor_seconds,
    interleave,
    method_setup,
    report,
    setup_run,
    true_targets,
)

LAYER_SETS = ("all", "conv1-5_fc6_fc7", "conv", "conv1-5", "conv1-3", "conv1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer-sets", nargs="+", default=list(LAYER_SETS))
    add_common_args(parser)
    args = parser.parse_args(argv)
    unknown = [s for s in args.layer_sets if not (REPO / "conf" / "layers" / f"{s}.yaml").exists()]
    if unknown:
        parser.error(f"unknown layer sets {unknown}: see conf/layers/")
    overrides = setup_run(args)
    encoder = None
    cases = {}
    for name in args.layer_sets:
        setup = method_setup("icnn_gd", args.iters, args.device,
                             [f"layers={name}", *overrides], encoder)
        encoder = setup.encoder
        cases[name] = (setup, true_targets(encoder, setup.layers))
    candidates = {
        "full_net": lambda s, t, n: floor_seconds(s.encoder, t, n, early_stop=False),
        "floor": lambda s, t, n: floor_seconds(s.encoder, t, n),
        "icnn-pl": icnn_pl,
    }
    times, _ = interleave({(c, k): functools.partial(fn, setup, targets, args.iters)
                           for c, (setup, targets) in cases.items()
                           for k, fn in candidates.items()}, args.repeats, args.device)
    rows = []
    for case, (setup, _) in cases.items():
        med = {k: times[case, k] for k in candidates}
        rows.append({
            "layers": case, "n_layers": len(setup.layers), "deepest": setup.layers[-1],
            **{f"{k}_s": round(v, 4) for k, v in med.items()},
            "floor_over_full_net": round(med["floor"] / med["full_net"], 3),
            "icnn-pl_over_full_net": round(med["icnn-pl"] / med["full_net"], 3),
            "icnn-pl_over_floor": round(med["icnn-pl"] / med["floor"], 3),
        })
        print(rows[-1], flush=True)
    report(rows, f"icnn_gd, {args.iters} iterations x {args.repeats} interleaved repeats"
           " (median), seconds per iteration", args.out)


if __name__ == "__main__":
    sys.exit(main())
