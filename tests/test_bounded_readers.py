"""Readers take memory in proportion to the data a file really holds, never to what its
size fields declare (#21 items 7-9). The fuzz test (``test_fuzz_readers.py``) runs these
lies and many more under a memory limit; here each case of the issue, with its error."""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest
import scipy.io
from test_fuzz_readers import _caffe_mutants, _inflating_zeros, _matrix_header

from icnn_pl.data.matio import load_mat, mat_shape
from icnn_pl.errors import DataError, WeightsError
from icnn_pl.nets.caffemodel import read_caffemodel
from icnn_pl.nets.weights import read_state_dict


def _v5_header() -> bytes:
    return b"MATLAB 5.0 MAT-file, written by a test".ljust(116) + bytes(8) + b"\x00\x01IM"


def _peak_mb(fn) -> tuple[object, float]:
    tracemalloc.start()
    try:
        try:
            out = fn()
        except DataError as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_a_compressed_element_that_lies_about_its_size_is_refused_unread(tmp_path):
    """Item 7: ~0.5 MB inflating to 512 MB with dims of one element; before, mat_shape
    (the cheap header check) took the whole 512 MB."""
    path = tmp_path / "bomb.mat"
    path.write_bytes(_v5_header() + _inflating_zeros(_matrix_header((1, 1)), 512 << 20,
                                                     512 << 20))
    for reader in (mat_shape, load_mat):
        err, peak = _peak_mb(lambda r=reader: r(path))
        assert isinstance(err, DataError) and "its dimensions hold at most" in err.problem
        assert peak < 8, peak


def test_the_header_check_does_not_inflate_an_honest_big_variable(tmp_path):
    """A variable that really is 128 MB of zeros (a few hundred KB compressed): mat_shape
    reads its shape from the header alone; the job then refuses the shape."""
    path = tmp_path / "big.mat"
    head = _matrix_header((1, 16 << 20))
    path.write_bytes(_v5_header() + _inflating_zeros(head + b"\x09\0\0\0\0\0\0\x08",
                                                     len(head) + 8 + (128 << 20), 128 << 20))
    shape, peak = _peak_mb(lambda: mat_shape(path))
    assert shape == (1, 16 << 20) and peak < 8, (shape, peak)


def test_nested_compression_is_refused(tmp_path):
    import struct
    import zlib

    path = tmp_path / "nested.mat"
    scipy.io.savemat(path, {"feat": np.ones((1, 4))}, do_compression=True)
    data = path.read_bytes()
    inner = zlib.compress(zlib.decompress(data[136:]))
    twice = zlib.compress(struct.pack("<II", 15, len(inner)) + inner)
    path.write_bytes(data[:128] + struct.pack("<II", 15, len(twice)) + twice)
    with pytest.raises(DataError, match="not a matrix"):
        load_mat(path)


@pytest.mark.parametrize("dims", [(100_000, 100_000), (3, 4)])
def test_matlab_empty_with_dims_that_hold_elements_is_refused(tmp_path, dims):
    """Item 8: a 2 KB file whose 'empty' marker came with dims of 80 GB; before,
    load_mat allocated np.zeros(dims) while mat_shape said (0,)."""
    path = tmp_path / "empty.mat"
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("feat", data=np.array(dims, dtype=np.uint64))
        ds.attrs["MATLAB_empty"] = np.uint8(1)
    for reader in (mat_shape, load_mat):
        err, peak = _peak_mb(lambda r=reader: r(path))
        assert isinstance(err, DataError) and "marked empty" in err.problem, err
        assert peak < 8


def test_matlab_empty_reads_as_its_empty_shape(tmp_path):
    path = tmp_path / "empty.mat"
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("feat", data=np.array([0, 5], dtype=np.uint64))
        ds.attrs["MATLAB_empty"] = np.uint8(1)
    assert mat_shape(path) == (0, 5) == load_mat(path).shape


def test_hdf5_dataset_declaring_more_than_it_stores_is_refused(tmp_path):
    path = tmp_path / "sparse.mat"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("feat", shape=(20_000, 20_000), dtype="f8", chunks=(64, 64))
    with pytest.raises(DataError, match="stores 0 bytes"):
        load_mat(path)


def test_caffemodel_shape_product_overflow_is_one_line_error(tmp_path):
    """Item 9: shape (2**62 + 1, 4) times out to 4 in int64, the number of values held;
    before, read_state_dict ended in a bare RuntimeError from torch."""
    path = tmp_path / "overflow.caffemodel"
    path.write_bytes(_caffe_mutants()[0])
    for reader in (read_caffemodel, read_state_dict):
        with pytest.raises(WeightsError) as err:
            reader(path)
        assert "\n" not in err.value.problem and "holds 4 values" in err.value.problem
