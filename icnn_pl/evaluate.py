"""``python -m icnn_pl.evaluate PATH [PATH ...] [--out DIR] [--on display|raw] [--labels a,b]``

Re-scores every finished run below the given folders and writes ``comparison.csv``,
``comparison.md`` and ``comparison_gallery.png`` into ``--out`` (default: the first PATH),
then prints the Markdown table. The library behind it is :mod:`icnn_pl.review`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from icnn_pl.atomic import write_text_atomic
from icnn_pl.errors import ConfigError, DataError, IcnnError
from icnn_pl.pipeline.outputs import write_table
from icnn_pl.review.compare import (
    SCORED_ON_NOTE,
    compare,
    comparison_gallery,
    comparison_markdown,
)
from icnn_pl.review.gallery import save_png
from icnn_pl.review.metrics import SCORING_MODES
from icnn_pl.review.runs import find_runs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m icnn_pl.evaluate",
        description="Compare finished reconstruction runs: writes comparison.csv, "
                    "comparison.md and comparison_gallery.png.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="run directories or Hydra multirun directories (searched recursively)")
    p.add_argument("--out", default=None, help="output directory (default: the first PATH)")
    p.add_argument("--on", choices=SCORING_MODES, default="display",
                   help="score the display image (default, as the lab) or the raw image")
    p.add_argument("--labels", default=None,
                   help="comma-separated image labels for the gallery (default: common ones)")
    p.add_argument("--cell", type=int, default=96, help="gallery cell size in pixels")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a data or config error)."""
    args = _parser().parse_args(argv)
    try:
        runs = find_runs(args.paths)
        out = Path(args.out) if args.out else Path(args.paths[0])
        if out.is_file():
            out = out.parent
        labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
        rows = compare(runs, on=args.on)
        table = comparison_markdown(rows)
        gallery = comparison_gallery(runs, labels=labels, cell=args.cell, on=args.on)
        write_table(out / "comparison.csv", rows)
        write_text_atomic(out / "comparison.md",
                          f"{table}\n{SCORED_ON_NOTE[args.on]}.\n")
        save_png(gallery, out / "comparison_gallery.png")
    except (DataError, ConfigError) as exc:
        fix = f" (fix: {exc.fix})" if exc.fix else ""
        print(f"error: {exc.problem}{fix}".replace("\n", " "), file=sys.stderr)
        return 2
    except IcnnError as exc:  # e.g. WeightsError: still a one-line message
        print(f"error: {str(exc)}".replace("\n", " "), file=sys.stderr)
        return 1
    print(table)
    print(f"{SCORED_ON_NOTE[args.on]}.")
    print(f"{len(rows)} run(s); wrote comparison.csv, comparison.md, comparison_gallery.png "
          f"to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
