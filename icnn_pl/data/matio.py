"""MATLAB file I/O: v5 (scipy.io) and v7.3 (HDF5) reads, atomic v5 writes.

Every expected failure (missing file, corrupt file, missing variable) raises
:class:`~icnn_pl.errors.DataError` naming the file, so a bad input never surfaces
as a bare scipy/h5py traceback.
"""

from __future__ import annotations

import contextlib
import io
import math
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
    if attrs.get("MATLAB_empty", 0):
        return np.zeros(_empty_dims(node), dtype=np.float64)  # no element: nothing taken
    _check_hdf5_size(node)
    data = np.asarray(node[()])
    # MATLAB (and hdf5storage) write column-major arrays, so h5py sees the axes reversed.
    if matlab_order or "MATLAB_class" in attrs:
        data = data.T
    if attrs.get("MATLAB_class") == b"char":
        # chars are uint16 code units, one string per row (as loadmat returns them)
        rows = np.atleast_2d(data)
        return np.array(["".join(map(chr, row)) for row in rows])
    return data


def _empty_dims(node: h5py.Dataset) -> tuple[int, ...]:
    """The dims of a variable MATLAB marked empty (it stores the dimension vector as the
    data): checked to be a short vector with a zero, so nothing big is allocated."""
    if node.size > _MAX_DIMS or node.dtype.kind not in "iu":
        raise ValueError(f"variable {node.name} is marked empty but holds {node.shape}"
                         f" {node.dtype} values, not a dimension vector")
    dims = tuple(int(d) for d in np.ravel(node[()]))
    if not dims or min(dims) < 0 or math.prod(dims) != 0:
        raise ValueError(f"variable {node.name} is marked empty but its dimensions {dims}"
                         " hold elements")
    return dims


# a stored dataset may be compressed (gzip inflates at most ~1032:1); one that declares
# more than this times what it stores holds chunks never written: a file that lies
_MAX_HDF5_RATIO = 1100
_SMALL_BYTES = 1 << 16


def _check_hdf5_size(node: h5py.Dataset) -> None:
    """Refuse a dataset whose declared size its stored bytes cannot hold, before reading."""
    stored = node.id.get_storage_size()
    if node.nbytes > _MAX_HDF5_RATIO * stored + _SMALL_BYTES:
        raise ValueError(f"variable {node.name} declares shape {node.shape}"
                         f" ({node.nbytes} bytes) but the file stores {stored} bytes of it")


def _has_matlab_header(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(6) == b"MATLAB"


# MATLAB v5 data types (miINT8 ... miUTF32); scipy's reader indexes tables with the type
# and crashes the interpreter (SIGSEGV, scipy 1.17) on others, e.g. a zeroed tag.
_MI_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 14, 15, 16, 17, 18})
_MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 5, 6, 14, 15
_MAX_DEPTH = 32  # cells / structs nest matrices; deeper is a damaged file
_MAX_DIMS = 32
_HEADER_BYTES = 4096  # inflated to read a compressed matrix's header (flags, dims, name)
# mxCELL, mxSTRUCT, mxOBJECT, mxFUNCTION, mxOPAQUE: matrices of matrices, whose size their
# dims do not bound; inflated only up to this size (our readers need numeric arrays)
_CONTAINER_CLASSES = frozenset({1, 2, 3, 16, 17})
_MAX_CONTAINER_BYTES = 64 << 20
_SPARSE = 5
_CLASS_NAMES = {1: "cell", 2: "struct", 3: "object", 16: "function", 17: "opaque"}
_CHUNK = 1 << 20  # compressed bytes fed to the inflater per step


Entry = tuple[str, tuple[int, ...], int]  # a v5 variable: name, dims, class (mxCELL ...)


def _check_v5_structure(path: Path, keep: bool = False, only: str | None = None
                        ) -> tuple[bytes | None, list[Entry]] | None:
    """Walk every data element tag of a MATLAB v5 file and raise ValueError at the first
    unknown type, size past its container, or size its matrix's dims cannot hold, before
    scipy reads it: a corrupt tag can crash scipy's reader instead of raising, and a size
    that lies must not be allocated.

    Compressed elements are inflated in a stream, never past the size the matrix declares,
    which its dims bound (numbers: 8 bytes per element and part); without ``keep`` only
    their header is inflated (a cheap check, as ``mat_shape`` needs). With ``keep``: the
    file as an uncompressed v5 stream (header, then each element inflated) for scipy to
    read without inflating it again, holding only variable ``only`` when given (else
    None); and every variable's name, dims and class (as ``scipy.io.whosmat`` lists them,
    but without inflating every variable as it does). None when the file is not v5
    (scipy gives those their error). The file is mapped, not read (read where the file
    system cannot map it)."""
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
            parts: list[bytes] = [buf[:128]]
            entries = _check_v5_variables(buf, endian, size, parts if keep else None, only)
    return (b"".join(parts) if keep else None), entries


def _tag(buf: bytes | mmap.mmap, endian: str, pos: int, end: int
         ) -> tuple[int, int, int, int]:
    """(type, nbytes, data start, next element) of the element at ``pos``."""
    if end - pos < 8:
        raise ValueError(f"truncated data element tag at byte {pos}")
    mtype, nbytes = struct.unpack_from(endian + "II", buf, pos)
    if mtype >> 16:  # small data element: size and type packed in the first word
        mtype, nbytes = mtype & 0xFFFF, mtype >> 16
        if mtype not in _MI_TYPES or mtype in (_MI_MATRIX, _MI_COMPRESSED) or nbytes > 4:
            raise ValueError(f"bad small data element (type {mtype}) at byte {pos}")
        return mtype, nbytes, pos + 4, pos + 8
    if mtype not in _MI_TYPES:
        raise ValueError(f"unknown data type {mtype} at byte {pos}")
    body = pos + 8
    if nbytes > end - body:
        raise ValueError(f"data element at byte {pos} claims {nbytes} bytes, past the end")
    padded = body + nbytes if mtype in (_MI_MATRIX, _MI_COMPRESSED) else \
        body + (nbytes + 7) // 8 * 8
    return mtype, nbytes, body, min(padded, end)  # some writers leave out the last padding


def _matrix_header(buf: bytes | mmap.mmap, endian: str, start: int, end: int
                   ) -> tuple[Entry, int | None]:
    """((name, dims, class), most bytes its contents can take) of the matrix whose contents are
    ``buf[start:end]``: from its array flags, dims and name elements (None for cells,
    structs and objects, whose dims count matrices of any size)."""
    mtype, nbytes, body, pos = _tag(buf, endian, start, end)
    if mtype != _MI_UINT32 or nbytes != 8:
        raise ValueError(f"matrix at byte {start}: bad array flags")
    flags, nzmax = struct.unpack_from(endian + "II", buf, body)
    cls, n_parts = flags & 0xFF, 2 if flags & 0x800 else 1
    mtype, nbytes, body, pos = _tag(buf, endian, pos, end)
    if mtype != _MI_INT32 or nbytes % 4 or not 4 <= nbytes <= 4 * _MAX_DIMS:
        raise ValueError(f"matrix at byte {start}: bad dimensions ({nbytes} bytes)")
    dims = struct.unpack_from(f"{endian}{nbytes // 4}i", buf, body)
    if min(dims) < 0:
        raise ValueError(f"matrix at byte {start}: negative dimensions {dims}")
    mtype, nbytes, body, pos = _tag(buf, endian, pos, end)
    name = bytes(buf[body:body + nbytes]).decode("latin-1")
    header = pos - start
    entry = (name, tuple(dims), cls)
    if cls in _CONTAINER_CLASSES:  # bounded by the bytes present, or when inflated
        return entry, None
    if cls == _SPARSE:  # row indices, column starts, values (and imaginary values)
        n = math.prod(dims[1:]) if len(dims) > 1 else 1
        return entry, header + 16 + 4 * nzmax + 4 * (n + 1) + n_parts * (8 + 8 * nzmax) + 16
    return entry, header + n_parts * (8 + 8 * math.prod(dims) + 8)


def _check_v5_variables(buf: bytes | mmap.mmap, endian: str, end: int,
                        parts: list[bytes] | None, only: str | None) -> list[Entry]:
    """Check the file's variables (top-level elements); append each kept one to
    ``parts`` as scipy reads it (a compressed one inflated); their entries."""
    entries, pos = [], 128
    while pos < end:
        mtype, nbytes, body, nxt = _tag(buf, endian, pos, end)
        entry: Entry | None = None
        if mtype == _MI_COMPRESSED:
            entry, element = _inflated_matrix(buf, endian, pos, body, nbytes,
                                              full=parts is not None, only=only)
        elif mtype == _MI_MATRIX:
            entry = _matrix_header(buf, endian, body, body + nbytes)[0]
            _check_matrix(buf, endian, pos, body, body + nbytes, 0)
            element = buf[pos:nxt]
        else:  # scipy skips other top-level elements (padding, subsystem data)
            element = buf[pos:nxt]
        if entry is not None and entry[0]:
            entries.append(entry)
        if parts is not None and element is not None and \
                (only is None or (entry is not None and entry[0] == only)):
            parts.append(element)
        pos = nxt
    return entries


def _check_matrix(buf: bytes | mmap.mmap, endian: str, pos: int, start: int, end: int,
                  depth: int) -> None:
    """Check one matrix (contents ``buf[start:end]``): its size against what its dims
    can hold, and every element inside, nested matrices included."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"data elements nested more than {_MAX_DEPTH} deep")
    most = _matrix_header(buf, endian, start, end)[1]
    if most is not None and end - start > most:
        raise ValueError(f"matrix at byte {pos} declares {end - start} bytes; its"
                         f" dimensions hold at most {most}")
    at = start
    while at < end:
        mtype, nbytes, body, nxt = _tag(buf, endian, at, end)
        if mtype == _MI_COMPRESSED:
            raise ValueError(f"compressed element inside a matrix at byte {at}"
                             " (nested compression: MATLAB never writes it)")
        if mtype == _MI_MATRIX:
            _check_matrix(buf, endian, at, body, body + nbytes, depth + 1)
        at = nxt


def _inflated_matrix(buf: bytes | mmap.mmap, endian: str, pos: int, body: int, nbytes: int,
                     full: bool, only: str | None) -> tuple[Entry, bytes | None]:
    """A compressed variable: (entry, its matrix element inflated, or None when only its
    header was needed). Inflation is streamed and stops at the size the matrix declares,
    which its header bounds: a file that inflates further, or declares more than its
    dims hold, is refused before the memory is taken."""
    inflater = zlib.decompressobj()
    out = bytearray()
    src = body

    def inflate(upto: int) -> None:
        nonlocal src
        while len(out) < upto:
            chunk = inflater.unconsumed_tail or bytes(buf[src:min(src + _CHUNK, body + nbytes)])
            if not inflater.unconsumed_tail:
                src += len(chunk)
            if not chunk:
                return
            try:
                out.extend(inflater.decompress(chunk, upto - len(out)))
            except zlib.error as exc:
                raise ValueError(f"compressed element at byte {pos}: {exc}") from None
            if inflater.eof:
                return

    inflate(8 + _HEADER_BYTES)
    if len(out) < 8:
        raise ValueError(f"compressed element at byte {pos} holds no matrix")
    mtype, declared = struct.unpack_from(endian + "II", out, 0)
    if mtype != _MI_MATRIX:
        raise ValueError(f"compressed element at byte {pos} holds type {mtype}, not a matrix")
    entry, most = _matrix_header(out, endian, 8, len(out))
    name, most = entry[0], _MAX_CONTAINER_BYTES if most is None else most
    if declared > most:
        raise ValueError(f"compressed matrix {name!r} at byte {pos} declares {declared}"
                         f" bytes; its dimensions hold at most {most}")
    if not full or (only is not None and name != only):
        return entry, None
    inflate(8 + declared + 1)  # one byte more: a stream that goes on is refused
    if len(out) != 8 + declared:
        raise ValueError(f"compressed matrix {name!r} at byte {pos} inflates to"
                         f" {len(out) - 8} bytes, not the {declared} it declares")
    _check_matrix(out, endian, pos, 8, 8 + declared, 0)
    return entry, bytes(out)


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
        checked = _check_v5_structure(path, keep=True, only=key)
        if checked is None:  # not v5: scipy reads (or refuses) it
            raw = scipy.io.loadmat(os.fspath(path), **({} if key is None else
                                                       {"variable_names": [key]}))
            out = {k: v for k, v in raw.items() if not k.startswith("__")}
            names = sorted(out) if key is None else \
                sorted(name for name, _, _ in scipy.io.whosmat(os.fspath(path)))
            return out, names
        # the checked stream (each element inflated once, here; with a key, only its own)
        inflated, entries = checked
        raw = scipy.io.loadmat(io.BytesIO(inflated))
        return ({k: v for k, v in raw.items() if not k.startswith("__")},
                sorted(name for name, _, _ in entries))
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
                        return _empty_dims(node)  # as load_mat gives it
                    _check_hdf5_size(node)
                    return shape[::-1] if matlab_order or "MATLAB_class" in node.attrs else shape
        else:
            # headers only: compressed bodies are not inflated (scipy.io.whosmat would)
            checked = _check_v5_structure(path)
            entries = [(n, d, _CLASS_NAMES.get(c, "")) for n, d, c in checked[1]] \
                if checked is not None else scipy.io.whosmat(os.fspath(path))  # v4
            names = sorted(name for name, _, _ in entries)
            for name, shape, cls in entries:
                if name == key and cls not in ("struct", "cell", "object"):
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
