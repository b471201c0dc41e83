"""MATLAB file writers shared by the reader tests: v5 (scipy) and v7.3 (hdf5storage, the
HDF5 layout MATLAB itself writes: user block, column-major arrays, MATLAB_class)."""

from __future__ import annotations

from pathlib import Path

import hdf5storage
import scipy.io


def write_v5(path: Path, **variables: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), variables)
    return path


def write_v73(path: Path, **variables: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    hdf5storage.savemat(str(path), variables, format="7.3")
    return path
