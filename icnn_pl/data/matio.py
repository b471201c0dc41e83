"""MATLAB file I/O: v5 (scipy.io) and v7.3 (HDF5) reads, atomic v5 writes.

Every expected failure (missing file, corrupt file, missing variable) raises
:class:`~icnn_pl.errors.DataError` naming the file, so a bad input never surfaces
as a bare scipy/h5py traceback.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from icnn_pl.atomic import atomic_path
from icnn_pl.errors import DataError, one_line

_REEXPORT = "re-export the file as a MATLAB .mat file (v5 via scipy.io.savemat or v7.3/HDF5)"


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(
            f"MATLAB file not found: {path}",
            fix="check the path (and the data root option) or create the file",
        )


def _is_hdf5(path: Path) -> bool:
    # v7.3 files are HDF5 with a 512-byte "MATLAB 7.3" user block; h5py finds the
    # signature at any power-of-two offset, so it covers both MATLAB and plain HDF5.
    try:
        return bool(h5py.is_hdf5(os.fspath(path)))
    except Exception:  # unreadable file: let the v5 reader produce the error
        return False


def _read_failed(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"cannot read {path} as a MATLAB file ({one_line(exc)})",
        fix=f"the file is corrupt, truncated or not a .mat file: {_REEXPORT}",
    )


def _hdf5_names(fh: h5py.File) -> list[str]:
    # MATLAB keeps cell/struct payloads under "#refs#" / "#subsystem#": not variables.
    return sorted(k for k in fh if not k.startswith("#"))


def _read_hdf5_var(fh: h5py.File, name: str, matlab_order: bool) -> np.ndarray | None:
    """Read one HDF5 dataset in scipy.io.loadmat's axis order; None if not an array."""
    node = fh[name]
    if not isinstance(node, h5py.Dataset) or node.dtype.kind == "O":
        return None  # struct (group) or cell (object references): not supported
    attrs = node.attrs
    data = node[()]
    if attrs.get("MATLAB_empty", 0):
        # MATLAB stores an empty array as its dimension vector.
        return np.zeros(tuple(int(d) for d in np.ravel(data)), dtype=np.float64)
    data = np.asarray(data)
    # MATLAB (and hdf5storage) write column-major arrays, so h5py sees the axes reversed.
    if matlab_order or "MATLAB_class" in attrs:
        data = data.T
    if attrs.get("MATLAB_class") == b"char":
        # chars are uint16 code units, one string per row (as loadmat returns them)
        rows = np.atleast_2d(data)
        return np.array(["".join(map(chr, row)) for row in rows])
    return data


def _has_matlab_header(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(6) == b"MATLAB"


# MATLAB v5 data types (miINT8 ... miUTF32); scipy's reader indexes tables with the type
# and crashes the interpreter (SIGSEGV, scipy 1.17) on others, e.g. a zeroed tag.
_MI_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 14, 15, 16, 17, 18})
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MAX_DEPTH = 32  # cells / structs nest matrices; deeper is a damaged file


def _check_v5_structure(path: Path, keep: bool = False) -> bytes | None:
    """Walk every data element tag of a MATLAB v5 file (compressed ones decompressed)
    and raise ValueError at the first unknown type or size past its container, before
    scipy reads it: a corrupt tag can crash scipy's reader instead of raising.

    The file is mapped, not read (read where the file system cannot map it). With
    ``keep``: the file as an uncompressed v5 stream (header, then each element inflated),
    for scipy to read without inflating it again; None when the file is not v5 (scipy
    gives those their error)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 128:
            return None  # not a v5 file (an empty one cannot be mapped): scipy raises
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system that cannot map files: read it
            mapped = contextlib.nullcontext(fh.read())
        with mapped as buf:
            if 0 in buf[:4]:
                return None  # not a v5 file (v4, or not MATLAB at all): scipy raises for those
            endian = {b"IM": "<", b"MI": ">"}.get(buf[126:128])
            if endian is None:
                return None  # scipy refuses an unknown byte-order mark itself
            parts = [buf[:128]] if keep else None
            _check_v5_elements(buf, endian, 128, size, 0, parts)
    return None if parts is None else b"".join(parts)


def _check_v5_elements(buf: bytes | mmap.mmap, endian: str, start: int, end: int, depth: int,
                       parts: list[bytes] | None = None) -> None:
    """Check the elements in ``buf[start:end]``; append each to ``parts`` (if given)
    as scipy reads it (a compressed element inflated)."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"data elements nested more than {_MAX_DEPTH} deep")
    pos = start
    while pos < end:
        if end - pos < 8:
            raise ValueError(f"truncated data element tag at byte {pos}")
        mtype, nbytes = struct.unpack_from(endian + "II", buf, pos)
        if mtype >> 16:  # small data element: size and type packed in the first word
            mtype, nbytes = mtype & 0xFFFF, mtype >> 16
            if mtype not in _MI_TYPES or mtype in (_MI_MATRIX, _MI_COMPRESSED) or nbytes > 4:
                raise ValueError(f"bad small data element (type {mtype}) at byte {pos}")
            if parts is not None:
                parts.append(buf[pos:pos + 8])
            pos += 8
            continue
        if mtype not in _MI_TYPES:
            raise ValueError(f"unknown data type {mtype} at byte {pos}")
        body = pos + 8
        if nbytes > end - body:
            raise ValueError(f"data element at byte {pos} claims {nbytes} bytes, past the end")
        inner = None
        if mtype == _MI_MATRIX:
            _check_v5_elements(buf, endian, body, body + nbytes, depth + 1)
        elif mtype == _MI_COMPRESSED:
            try:
                inner = zlib.decompress(buf[body:body + nbytes])
            except zlib.error as exc:
                raise ValueError(f"compressed element at byte {pos}: {exc}") from None
            _check_v5_elements(inner, endian, 0, len(inner), depth + 1)
        padded = body + nbytes if mtype in (_MI_MATRIX, _MI_COMPRESSED) else \
            body + (nbytes + 7) // 8 * 8
        if parts is not None:
            parts.append(buf[pos:min(padded, end)] if inner is None else inner)
        pos = min(padded, end)  # some writers leave out the last element's padding


def _read_all(path: Path, key: str | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read ``key`` (or every variable if None); also return all variable names."""
    try:
        if _is_hdf5(path):
            matlab_order = _has_matlab_header(path)
            with h5py.File(path, "r") as fh:
                names = _hdf5_names(fh)
                wanted = names if key is None else [n for n in names if n == key]
                out = {}
                for n in wanted:
                    arr = _read_hdf5_var(fh, n, matlab_order)
                    if arr is not None:
                        out[n] = arr
                return out, names
        inflated = _check_v5_structure(path, keep=True)
        # the checked stream when the file is v5 (each element inflated once, here)
        source = os.fspath(path) if inflated is None else io.BytesIO(inflated)
        if key is None:
            raw = scipy.io.loadmat(source)
            out = {k: v for k, v in raw.items() if not k.startswith("__")}
            return out, sorted(out)
        raw = scipy.io.loadmat(source, variable_names=[key])
        if key in raw:
            return {key: raw[key]}, [key]
        if inflated is not None:
            source.seek(0)
        return {}, sorted(name for name, _, _ in scipy.io.whosmat(source))
    except Exception as exc:  # any reader failure means a bad file, whatever the class
        raise _read_failed(path, exc) from exc


def load_mat(path: str | os.PathLike, key: str = "feat") -> np.ndarray:
    """Return variable ``key`` of a v5 or v7.3 MATLAB file as a C-contiguous float32 copy.

    Axes match ``scipy.io.loadmat`` for the same MATLAB array (v7.3 data is transposed back).
    """
    path = Path(path)
    _check_exists(path)
    found, names = _read_all(path, key)
    if key not in found:
        raise _missing_var(path, key, names)
    arr = np.asarray(found[key])
    if arr.dtype.kind not in "biuf":
        raise DataError(
            f"variable '{key}' in {path} is not a real numeric array (dtype {arr.dtype})",
            fix=f"save '{key}' as a real float array",
        )
    return np.array(arr, dtype=np.float32, order="C", copy=True)


def _missing_var(path: Path, key: str, names: list[str]) -> DataError:
    if key in names:
        return DataError(
            f"variable '{key}' in {path} is a struct or cell, not a numeric array",
            fix=f"save '{key}' as a plain numeric array",
        )
    present = ", ".join(names) if names else "none"
    return DataError(
        f"variable '{key}' not found in {path} (variables present: {present})",
        fix=f"save the array under the MATLAB variable name '{key}'",
    )


def mat_shape(path: str | os.PathLike, key: str = "feat") -> tuple[int, ...]:
    """Shape of variable ``key`` (as ``load_mat`` would return it), from the file's headers.

    Cheap (no array data is read, except the variable's compressed block in v5 files
    saved with compression): lets a job check every image's files before any long work.
    """
    path = Path(path)
    _check_exists(path)
    try:
        if _is_hdf5(path):
            matlab_order = _has_matlab_header(path)
            with h5py.File(path, "r") as fh:
                names = _hdf5_names(fh)
                node = fh[key] if key in names else None
                if isinstance(node, h5py.Dataset) and node.dtype.kind != "O":
                    shape = tuple(int(d) for d in node.shape)
                    if node.attrs.get("MATLAB_empty", 0):
                        return (0,)
                    return shape[::-1] if matlab_order or "MATLAB_class" in node.attrs else shape
        else:
            _check_v5_structure(path)
            entries = scipy.io.whosmat(os.fspath(path))
            names = sorted(name for name, _, _ in entries)
            for name, shape, cls in entries:
                if name == key and cls not in ("struct", "cell"):
                    return tuple(int(d) for d in shape)
    except Exception as exc:  # any reader failure means a bad file, whatever the class
        raise _read_failed(path, exc) from exc
    raise _missing_var(path, key, names)


def load_mat_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return every array variable of a v5 or v7.3 MATLAB file, in loadmat's axis order.

    Header entries (``__header__`` ...) are dropped; in v7.3 files structs and cells are
    skipped. Dtypes are kept as stored.
    """
    path = Path(path)
    _check_exists(path)
    found, _ = _read_all(path, None)
    return found


def save_mat(path: str | os.PathLike, variables: dict[str, np.ndarray | float | str]) -> None:
    """Write ``variables`` to a MATLAB v5 file atomically (no half-written file on failure)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # a file object, not a str: savemat would append ".mat" to the temp name
        scipy.io.savemat(fh, dict(variables))
