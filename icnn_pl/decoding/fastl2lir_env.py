"""The lab's ``fastl2lir`` 0.11 as a reference, in a virtual environment of its own.

fastl2lir 0.11 cannot run under NumPy 2 (its voxel selection assigns a one-element array
to a scalar slot, which NumPy 2 refuses), so it gets a venv with NumPy 1.26 outside the
checkout (``~/.cache/icnn-pl/fastl2lir-venv``, or ``$ICNN_FASTL2LIR_VENV``), made on first
use (CI makes it up front: ``python -m icnn_pl.decoding.fastl2lir_env``). It is run as a
subprocess on arrays exchanged as ``.npy`` files.

    python -m icnn_pl.decoding.fastl2lir_env          # create the venv, print its python
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import numpy as np

PACKAGES = ("numpy==1.26.4", "fastl2lir==0.11", "tqdm==4.67.1", "threadpoolctl==3.5.0")

# Runs inside the venv: fit fastl2lir on the z-scored data as the lab's scripts do and
# predict; prints the fit's wall time and peak RSS as JSON.
_RUNNER = r"""
import json, resource, sys, time
import numpy as np
from fastl2lir import FastL2LiR
d = sys.argv[1]
a = json.loads(sys.argv[2])
dtype = getattr(np, a["dtype"])
X, Y, Xt = (np.load(f"{d}/{n}.npy") for n in ("X", "Y", "Xt"))
def stats(m):
    mean, norm = m.mean(0), m.std(0, ddof=1)
    return mean, np.where(norm > 0, norm, 1.0)
xm, xn = stats(X); ym, yn = stats(Y)
t0 = time.perf_counter()
model = FastL2LiR().fit((X - xm) / xn, (Y - ym) / yn, alpha=a["alpha"], n_feat=a["k"],
                        chunk_size=a["chunk"], dtype=dtype)
fit_s = time.perf_counter() - t0
pred = model.predict(((Xt - xm) / xn).astype(dtype), dtype=dtype) * yn + ym
np.save(f"{d}/pred.npy", pred)
print(json.dumps({"fit_s": fit_s,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def venv_dir() -> Path:
    """Where the venv lives (``$ICNN_FASTL2LIR_VENV`` or the user's cache)."""
    env = os.environ.get("ICNN_FASTL2LIR_VENV")
    return Path(env) if env else Path.home() / ".cache" / "icnn-pl" / "fastl2lir-venv"


def ensure_venv() -> Path:
    """The venv's python, creating the venv (NumPy 1.26 + fastl2lir 0.11) if missing."""
    root = venv_dir()
    python = root / "bin" / "python"
    marker = root / ".icnn-complete"
    wanted = " ".join(PACKAGES)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (pytest workers, parallel benchmarks) must not build it at once: the
    # second waits for the first, then finds the marker.
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == wanted:
            return python
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
        marker.write_text(wanted)
    return python


def run_fastl2lir(X: np.ndarray, Y: np.ndarray, X_test: np.ndarray, alpha: float,
                  k: int | None, chunk: int = 0, dtype: str = "float32",
                  threads: int = 1) -> tuple[np.ndarray, dict]:
    """fastl2lir's de-normalised test predictions and ``{fit_s, peak_rss_mb}``."""
    python = ensure_venv()
    with tempfile.TemporaryDirectory(prefix="fastl2lir-") as d:
        for name, a in (("X", X), ("Y", Y), ("Xt", X_test)):
            np.save(f"{d}/{name}.npy", np.asarray(a, dtype=np.float64))
        args = json.dumps({"alpha": alpha, "k": 0 if k is None else k, "chunk": chunk,
                           "dtype": dtype})
        env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)
        out = subprocess.run([str(python), "-c", _RUNNER, d, args], check=True,
                             capture_output=True, text=True, env=env)
        info = json.loads(out.stdout.strip().splitlines()[-1])
        return np.load(f"{d}/pred.npy"), info


if __name__ == "__main__":
    print(ensure_venv())
    sys.exit(0)
