"""Load time and peak memory of a full-size VGG19 ``.caffemodel`` (V1, as the lab's file).

    python -m benchmarks.bench_caffemodel --tmp /tmp --out benchmarks/results/caffemodel_cpu.csv

Writes a VGG19-shaped V1 caffemodel of seeded random weights (574 MB, the size of
``VGG_ILSVRC_19_layers.caffemodel``) with the tests' independent writer, and the same
arrays as a ``.safetensors`` file; then, each in a fresh interpreter, builds the encoder
from each file and reports the seconds of ``build_encoder`` and the process's peak RSS
(``ru_maxrss``) next to its RSS before loading, and the largest difference between the two
encoders' features (19 layers, 64x64 input). Both files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO, write_csv

_WRITE = r"""
import sys
sys.path.insert(0, "tests")
from caffe_writer import net, vgg_layers, write
from safetensors.torch import save_file
from icnn_pl.nets import build_network
from icnn_pl.nets.vgg import VGG19_LAYERS
state = build_network("vgg19", seed=7).state_dict()
write(sys.argv[1], net(vgg_layers({k: v.numpy() for k, v in state.items()}, VGG19_LAYERS), v1=True))
save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[2])
"""

_LOAD = r"""
import json, resource, sys, time
import numpy as np, torch
from icnn_pl.nets import build_encoder
from icnn_pl.nets.vgg import VGG19_LAYERS
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
before = rss_mb()
t0 = time.perf_counter()
enc = build_encoder("vgg19", weights=sys.argv[1], input_size=(64, 64))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
weights_mb = sum(p.numel() * p.element_size() for p in enc.parameters()) / 2**20
enc.set_layers(list(VGG19_LAYERS))
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 50
with torch.no_grad():
    np.savez(sys.argv[2], **{k: v.numpy() for k, v in enc(x).items()})
print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak,
                  "weights_mb": weights_mb}))
"""


def _python(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=2, help="fresh loads per file")
    parser.add_argument("--out", type=Path, default=None, help="CSV file for the table")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_caffemodel_", dir=args.tmp))
    files = {"caffemodel": work / "VGG_ILSVRC_19_layers.caffemodel",
             "safetensors": work / "vgg19.safetensors"}
    rows = []
    try:
        _python(_WRITE, str(files["caffemodel"]), str(files["safetensors"]))
        feats = {}
        for kind, path in files.items():
            for r in range(args.repeats):
                out = work / f"{kind}{r}.npz"
                res = json.loads(_python(_LOAD, str(path), str(out)).strip().splitlines()[-1])
                res.update(file=kind, file_mb=round(path.stat().st_size / 2**20, 1), repeat=r)
                rows.append(res)
                feats[kind] = out
        a, b = np.load(feats["caffemodel"]), np.load(feats["safetensors"])
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
        for row in rows:
            row["max_abs_feature_diff"] = diff
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    cols = ["file", "repeat", "file_mb", "weights_mb", "seconds", "rss_before_mb",
            "peak_rss_mb", "max_abs_feature_diff"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c])
                         for c in cols))
    write_csv([{c: row[c] for c in cols} for row in rows], args.out)


if __name__ == "__main__":
    main()
