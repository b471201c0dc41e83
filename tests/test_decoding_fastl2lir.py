"""Our batched decoder against the lab's fastl2lir 0.11 (PyPI), run in its own NumPy<2 venv."""

from __future__ import annotations

import numpy as np
import pytest

from icnn_pl.decoding.decoder import TopKRidge
from icnn_pl.decoding.fastl2lir_env import run_fastl2lir


def simulated(seed: int = 0, n: int = 120, v: int = 60, u: int = 23, m: int = 9):
    """Voxels = noisy mixtures of a few units; one constant voxel, one constant unit."""
    rng = np.random.default_rng(seed)
    Y = rng.standard_normal((n + m, u)) * rng.uniform(0.5, 3, u) + rng.uniform(-2, 2, u)
    mix = rng.standard_normal((u, v)) * (rng.random((u, v)) < 0.2)
    X = Y @ mix + rng.standard_normal((n + m, v)) * 2 + 5
    X[:, 7] = 3.0           # zero-variance voxel
    Y[:, 4] = 1.5           # zero-variance unit
    return X[:n], Y[:n], X[n:]


def ours(X, Y, Xt, alpha, k, chunk, dtype):
    dec = TopKRidge(X, Xt, alpha=alpha, k=k, dtype=dtype)
    from icnn_pl.decoding.decoder import zscore_stats
    ym, yn = zscore_stats(Y)
    parts = [dec.fit_predict(Y[:, s:s + chunk], ym[s:s + chunk], yn[s:s + chunk]).pred
             for s in range(0, Y.shape[1], chunk)]
    return np.concatenate([p.double().numpy() for p in parts], 1)


CASES = [  # k, alpha, our chunk, fastl2lir chunk, dtype
    (10, 100.0, 5, 0, "float64"),
    (25, 1.0, 23, 7, "float64"),
    (1, 10.0, 4, 0, "float64"),
    (None, 100.0, 8, 0, "float64"),   # plain ridge on all voxels
    (60, 100.0, 8, 0, "float64"),     # k = voxels: fastl2lir's no-selection branch
    (10, 100.0, 6, 0, "float32"),
    (40, 3.0, 23, 5, "float32"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)))
def test_predictions_equal_fastl2lir(case):
    k, alpha, chunk, ref_chunk, dtype = CASES[case]
    X, Y, Xt = simulated(seed=case)
    got = ours(X, Y, Xt, alpha, k, chunk, dtype)
    ref, _ = run_fastl2lir(X, Y, Xt, alpha, k, chunk=ref_chunk, dtype=dtype)
    scale = np.abs(ref).max()
    tol = 1e-9 if dtype == "float64" else 2e-4
    diff = np.abs(got - ref).max()
    print(f"k={k} alpha={alpha} {dtype}: max abs diff {diff:.3g} (max |pred| {scale:.3g})")
    assert diff <= tol * scale
    assert np.allclose(got[:, 4], 1.5)  # the constant unit is predicted as its mean


@pytest.mark.slow
def test_benchmark_runs_both_sides_on_the_same_data(tmp_path):
    from benchmarks import bench_decoding

    out = tmp_path / "decoding.csv"
    bench_decoding.main(["--voxels", "120", "--k", "20", "--chunk", "64", "--units", "64", "192",
                         "--ref-units", "20", "60", "--out", str(out)])
    text = out.read_text()
    assert "fastl2lir_s_per_10k_units" in text and ",120,20,1," in text
    row = dict(zip(*[line.split(",") for line in text.splitlines()], strict=True))
    assert float(row["max_abs_diff"]) < 1e-3 * float(row["max_abs_pred"])


def test_device_section_on_the_cpu(tmp_path):
    from benchmarks.bench_decoding import device_section

    class Check:
        device = "cpu"
        tables = {}

        def table(self, name, rows):
            self.tables[name] = rows

    check = Check()
    device_section(check)
    (row,) = check.tables["decoding"]
    assert row["units_done"] > 0 and row["s_per_10k_units"] > 0
