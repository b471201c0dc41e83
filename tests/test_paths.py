"""Paths with spaces and non-ASCII characters work end to end (they must not fail)."""

import subprocess
import sys
from pathlib import Path

import pytest
import scipy.io

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_dir_and_data_root_with_spaces_and_unicode(tmp_path):
    base = tmp_path / "my data – Gödel ç 実験"
    run_dir, data_root = base / "run dir", base / "démo data"
    res = subprocess.run(
        [sys.executable, "train_recon.py", "method=icnn_gd", "method.n_iter=2",
         "network.input_size=[64,64]", "data.limit=1", "logger=csv", "progress=false",
         # Hydra's override grammar needs quotes around such values (README: Running)
         f'data.root="{data_root}"', f'hydra.run.dir="{run_dir}"'],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    mat = run_dir / "sub-01" / "VC" / "recon_image-astronaut.mat"
    assert scipy.io.loadmat(mat)["recon_image"].shape == (64, 64, 3)
    assert (run_dir / "results.csv").is_file() and any(data_root.rglob("*.mat"))
