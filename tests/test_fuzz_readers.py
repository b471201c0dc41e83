"""Fuzzed inputs (#14, #21): every public reader of user files, on mutated copies of
valid files.

Valid files are written here (MATLAB v5 plain and compressed, v7.3/HDF5, reference-std
files, act_range text, stimulus images as PNG and JPEG, weight files as ``.pt``,
``.safetensors`` and ``.caffemodel`` in both net formats, written by the tests' own
protobuf writer), then mutated with a fixed seed: truncated, bytes flipped, chunks
overwritten, zeroed, inserted or deleted; their **size fields** made to lie (``size_mutants``:
element lengths, dims, declared shapes, nested and inflating compression, empty markers,
image headers, blob shapes whose product overflows); and valid files with the wrong
content (dtype, shape, NaN, empty, wrong keys). Each file must either read or be refused
with one of our errors (``IcnnError``, a one-line problem), never another exception.

Every file is read in a child process (``reader_worker``) under a per-file address-space
limit, so a reader that allocates what a lying file declares fails this test instead of
the machine; each read is timed (and stopped by an alarm if it hangs) and its peak memory
recorded.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import caffe_writer
import numpy as np
import pytest
import scipy.io
import torch
from engine_helpers import tiny_net
from mat_writers import write_v5, write_v73
from PIL import Image
from reader_worker import ReaderWorker
from safetensors.torch import save_file
from torch import nn

from icnn_pl.data.images import ImageFolder
from icnn_pl.data.matio import load_mat, load_mat_dict, mat_shape
from icnn_pl.data.readers import TrueFeatures, load_act_range, load_reference_std
from icnn_pl.nets.caffemodel import read_caffemodel
from icnn_pl.nets.weights import load_weights, read_state_dict

SEED = 14
MUTANTS_PER_FILE = 50
PER_FILE_LIMIT_S = 5.0  # a hang fails the test; the worst seen is reported
PER_FILE_MEMORY = 256 << 20  # address space a read may add (the files are a few KB)
LAYERS = ("conv1", "fc")


def _feat(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((1, 4, 3, 3)).astype(np.float32)


# kind -> (reader, writer of the valid file); a reader takes the file's path
def _read_features(path: Path) -> object:
    """Every way a feature file is read: header shape, one variable, all, via the layout."""
    mat_shape(path)
    load_mat_dict(path)
    root = path.parent / "true"
    (root / "conv1").mkdir(parents=True, exist_ok=True)
    target = root / "conv1" / "img.mat"
    target.write_bytes(path.read_bytes())
    TrueFeatures(root, ["conv1"]).read("img")
    return load_mat(path)


def _read_weights(path: Path) -> object:
    """Every public weight reader: the file's own tensors, then loaded into the net."""
    if path.name.endswith(".caffemodel"):
        read_caffemodel(path)
    read_state_dict(path)
    return load_weights(tiny_net(), path, "tiny")


def _read_image(path: Path) -> object:
    """The stimulus loader: a folder holding the one image, read at the encoder's size."""
    folder = path.parent / f"{path.name}.d"
    folder.mkdir(exist_ok=True)
    (folder / f"img{path.suffix}").write_bytes(path.read_bytes())
    return ImageFolder(folder, (32, 32)).image("img")


READERS: dict[str, Callable[[Path], object]] = {
    "v5.mat": _read_features,
    "v5z.mat": _read_features,
    "v73.mat": _read_features,
    "std.mat": lambda p: load_reference_std(p, LAYERS),
    "std73.mat": lambda p: load_reference_std(p, LAYERS),
    "act_range.txt": lambda p: load_act_range(p, expected_len=16),
    "weights.pt": _read_weights,
    "weights.safetensors": _read_weights,
    "weights-v1.caffemodel": _read_weights,
    "weights-v2.caffemodel": _read_weights,
    "image.png": _read_image,
    "image.jpg": _read_image,
}


def _write_caffemodel(path: Path, state: dict[str, torch.Tensor], v1: bool) -> None:
    """The tiny net as a Caffe file: layers named by module path (``0``, ``3``)."""
    arrays = {k: v.numpy() for k, v in state.items()}
    names = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in arrays))
    layers = [(n, "Convolution" if arrays.get(f"{n}.weight", np.ones(1)).ndim == 4
               else "InnerProduct", [arrays[k] for k in arrays if k.rsplit(".", 1)[0] == n])
              for n in names]
    caffe_writer.write(path, caffe_writer.net(layers, v1=v1))


def _valid_files(folder: Path, rng: np.random.Generator) -> dict[str, Path]:
    state = {k: v.contiguous() for k, v in tiny_net().state_dict().items()}
    stds = {n: np.float64(1.0 + i) for i, n in enumerate(LAYERS)}
    files = {}
    for kind in READERS:
        path = files[kind] = folder / f"valid-{kind}"
        if kind == "v5.mat":
            write_v5(path, feat=_feat(rng))
        elif kind == "v5z.mat":
            scipy.io.savemat(path, {"feat": _feat(rng)}, do_compression=True)
        elif kind == "v73.mat":
            write_v73(path, feat=_feat(rng))
        elif kind == "std.mat":
            write_v5(path, **stds)
        elif kind == "std73.mat":
            write_v73(path, **{n: np.array([[v]]) for n, v in stds.items()})
        elif kind.startswith("image."):
            pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, format="PNG" if kind.endswith("png") else "JPEG")
        elif kind == "act_range.txt":
            path.write_text("\n".join(f"{v:.4f}" for v in rng.uniform(0, 30, 16)))
        elif kind == "weights.pt":
            torch.save(state, path)
        elif kind.endswith(".caffemodel"):
            _write_caffemodel(path, state, v1="v1" in kind)
        else:
            save_file(state, str(path))
    return files


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random byte-level mutation of ``data``."""
    buf = bytearray(data)
    n = len(buf)
    op = rng.integers(6)
    if op == 0:  # truncate
        return bytes(buf[: rng.integers(0, n)])
    if op == 1:  # flip a few bits
        for i in rng.integers(0, n, rng.integers(1, 9)):
            buf[i] ^= 1 << int(rng.integers(8))
        return bytes(buf)
    start = int(rng.integers(0, n))
    size = int(rng.integers(1, 65))
    if op == 2:  # overwrite a chunk with random bytes
        buf[start:start + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    elif op == 3:  # zero a chunk
        buf[start:start + size] = bytes(len(buf[start:start + size]))
    elif op == 4:  # insert random bytes
        buf[start:start] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    else:  # delete a chunk
        del buf[start:start + size]
    return bytes(buf)


def _wrong_content(folder: Path) -> list[tuple[str, Path]]:
    """Well-formed files with the wrong content: dtypes, shapes, values, keys."""
    cases: list[tuple[str, Path]] = []

    def add(kind: str, name: str, write: Callable[[Path], None]) -> None:
        path = folder / f"content-{name}-{kind}"
        write(path)
        cases.append((kind, path))

    feats = {
        "complex": np.ones((1, 4, 3, 3), np.complex64), "text": np.array(["abc"]),
        "int": np.ones((1, 4, 3, 3), np.int16), "bool": np.ones((1, 4, 3, 3), bool),
        "empty": np.zeros((0, 4), np.float32), "scalar": np.float32(3.0),
        "nan": np.full((1, 4, 3, 3), np.nan, np.float32), "batch2": np.ones((2, 4, 3, 3)),
        "cell": np.array([np.ones(3), np.ones(2)], dtype=object),
        "struct": {"a": np.ones(3)}, "huge_dims": np.ones((1, 1, 1, 1, 1, 1, 2)),
    }
    for name, value in feats.items():
        add("v5.mat", name, lambda p, v=value: write_v5(p, feat=v))
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub" and value.ndim:
            add("v73.mat", name, lambda p, v=value: write_v73(p, feat=v))
    add("v5.mat", "other_name", lambda p: write_v5(p, x=np.ones(3)))
    for name, stds in {"negative": {"conv1": -1.0, "fc": 1.0}, "missing": {"conv1": 1.0},
                       "vector": {"conv1": np.ones(3), "fc": 1.0},
                       "text": {"conv1": "abc", "fc": 1.0},
                       "nan": {"conv1": np.nan, "fc": 1.0}}.items():
        add("std.mat", name, lambda p, s=stds: write_v5(p, **s))
    for name, text in {"word": "1 2 x", "short": "1 2 3", "neg": " ".join(["-1"] * 16),
                       "inf": " ".join(["inf"] * 16), "empty": "", "binary": "\x00\xff" * 8,
                       "commas": ",".join(["1"] * 16)}.items():
        add("act_range.txt", name, lambda p, t=text: p.write_bytes(t.encode("latin-1")))
    good = {k: v.contiguous() for k, v in tiny_net().state_dict().items()}
    weights = {
        "wrong_shape": {**good, "0.weight": torch.ones(2, 2)},
        "int_dtype": {k: v.to(torch.int32) for k, v in good.items()},
        "missing_key": {k: v for k, v in good.items() if k != "3.bias"},
        "extra_key": {**good, "extra": torch.ones(1)},
        "empty": {},
    }
    for name, state in weights.items():
        add("weights.pt", name, lambda p, s=state: torch.save(s, p))
        add("weights.safetensors", name, lambda p, s=state: save_file(s, str(p)))
        if name not in ("int_dtype", "empty"):  # Caffe blobs are float; a net has layers
            add("weights-v1.caffemodel", name,
                lambda p, s=state: _write_caffemodel(p, s, v1=True))
    add("weights.pt", "not_a_dict", lambda p: torch.save([torch.ones(1)], p))
    add("weights.pt", "non_tensor", lambda p: torch.save({"0.weight": 3}, p))
    add("weights.pt", "pickle_object", lambda p: torch.save({"x": nn.ReLU()}, p))
    return cases


# -- size fields that lie ---------------------------------------------------------------------
LIES = (0, 1, 7, 0x7FFF_FFFF, 0xFFFF_FFFF, 0x1000_0000)  # uint32 values put in size fields


def _v5_size_fields(data: bytes, start: int, end: int, depth: int = 0) -> list[int]:
    """Byte offsets of the uint32 size fields of a little-endian v5 stream: each element's
    length and each matrix dimension."""
    fields, pos = [], start
    while pos + 8 <= end and depth < 4:
        mtype, n = struct.unpack_from("<II", data, pos)
        if mtype >> 16:  # small element: no length word of its own
            pos += 8
            continue
        fields.append(pos + 4)
        body = pos + 8
        if mtype == 14 and body + 24 <= end:  # matrix: flags, then dims
            n_dims = struct.unpack_from("<I", data, body + 20)[0] // 4
            fields += [body + 24 + 4 * i for i in range(min(n_dims, 8))]
            fields += _v5_size_fields(data, body, min(body + n, end), depth + 1)
        pos = body + (n if mtype in (14, 15) else (n + 7) // 8 * 8)
    return fields


def _with_uint32(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + struct.pack("<I", value) + data[at + 4:]


def _compressed(inner: bytes) -> bytes:
    body = zlib.compress(inner)
    return struct.pack("<II", 15, len(body)) + body


def _inflating_zeros(inner_header: bytes, declared: int, zeros: int) -> bytes:
    """A compressed element whose matrix declares ``declared`` bytes and inflates to
    ``zeros`` more (streamed into the compressor: small to write)."""
    comp = zlib.compressobj()
    parts = [comp.compress(struct.pack("<II", 14, declared) + inner_header)]
    block = bytes(1 << 20)
    for _ in range(zeros >> 20):
        parts.append(comp.compress(block))
    body = b"".join(parts) + comp.flush()
    return struct.pack("<II", 15, len(body)) + body


def _matrix_header(dims: tuple[int, ...], name: bytes = b"feat") -> bytes:
    """Array flags (double), dims and name of a v5 matrix."""
    out = struct.pack("<IIII", 6, 8, 6, 0)
    out += struct.pack("<II", 5, 4 * len(dims)) + struct.pack(f"<{len(dims)}i", *dims)
    out += b"\0" * (-len(out) % 8)
    return out + struct.pack("<I", 1 | len(name) << 16) + name.ljust(4, b"\0")


def _v5_mutants(data: bytes, compressed: bool) -> list[bytes]:
    head = data[:128]
    if not compressed:
        return [_with_uint32(data, at, v) for at in _v5_size_fields(data, 128, len(data))
                for v in LIES]
    inner = zlib.decompress(data[136:])  # the one compressed variable
    out = [head + _compressed(_with_uint32(inner, at, v))
           for at in _v5_size_fields(inner, 0, len(inner)) for v in LIES]
    out.append(head + _compressed(_compressed(inner)))  # compression twice
    nested = inner[:8] + inner[8:] + _compressed(b"\0" * 64)  # compressed inside a matrix
    out.append(head + _compressed(_with_uint32(nested, 4, len(nested) - 8)))
    # inflates to 512 MB with dims of one element (a lie, refused before inflating);
    # to 16 MB with dims of 16 MB (honest, all zeros: read)
    out.append(head + _inflating_zeros(_matrix_header((1, 1)), 512 << 20, 512 << 20))
    honest = _matrix_header((1, 2 << 20))
    out.append(head + _inflating_zeros(honest + struct.pack("<II", 9, 16 << 20),
                                       len(honest) + 8 + (16 << 20), 16 << 20))
    return out


def _hdf5_mutants(folder: Path) -> list[Path]:
    import h5py

    paths = []
    for i, (dims, shape, empty) in enumerate([
            ((100_000, 100_000), None, True),  # "empty", dims of 80 GB
            ((0, 5), None, True), ((2**40, 0), None, True),
            (None, (20_000, 20_000), False),  # declared 3.2 GB, nothing written
            (None, (2**31, 2**20), False)]):
        path = folder / f"size{i:02d}-v73.mat"
        with h5py.File(path, "w") as fh:
            if empty:
                ds = fh.create_dataset("feat", data=np.array(dims, dtype=np.uint64))
                ds.attrs["MATLAB_empty"] = np.uint8(1)
            else:
                ds = fh.create_dataset("feat", shape=shape, dtype="f8", chunks=(64, 64))
            ds.attrs["MATLAB_class"] = np.bytes_("double")
        paths.append(path)
    return paths


def _caffe_mutants() -> list[bytes]:
    from caffe_writer import key, length_delimited, varint

    def blob(dims, values=4):
        data = length_delimited(5, [np.ones(values, "<f4").tobytes()])
        shape = length_delimited(7, length_delimited(1, [b"".join(varint(d) for d in dims)]))
        return data + shape

    def net(blob_pieces):
        layer = length_delimited(1, [b"0"]) + length_delimited(2, [b"Convolution"]) + \
            length_delimited(7, blob_pieces)
        return b"".join(length_delimited(100, layer))

    out = [net(blob(dims)) for dims in [((1 << 62) + 1, 4), ((1 << 63) + 1, 4), (1 << 40,) * 2,
                                        (5,), (2, 2) * 20, (2**64 - 1,), (4, 1 << 62)]]
    out.append(key(100, 2) + varint(1 << 62) + b"\0" * 16)  # a layer longer than the file
    out.append(net([key(5, 2) + varint(1 << 40) + b"\0" * 16]))  # blob data longer than it
    return out


def _safetensors_mutants() -> list[bytes]:
    import json

    def st(header: dict, payload: bytes = bytes(16), length: int | None = None) -> bytes:
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text) if length is None else length) + text + payload

    t = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    return [st({"0.weight": {**t, "shape": [2**40, 2**40]}}),
            st({"0.weight": {**t, "shape": [2**62 + 1, 4]}}),
            st({"0.weight": {**t, "data_offsets": [0, 2**40]}}),
            st({"0.weight": t}, length=2**60), st({"0.weight": t}, length=2**31)]


def _png_with_size(data: bytes, width: int, height: int) -> bytes:
    ihdr = data.index(b"IHDR")
    fields = struct.pack(">II", width, height) + data[ihdr + 12:ihdr + 17]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + fields))
    return data[:ihdr + 4] + fields + crc + data[ihdr + 21:]


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def size_mutants(files: dict[str, Path], folder: Path) -> list[tuple[str, Path]]:
    """Valid files whose size fields lie (see the module docstring)."""
    blobs: list[tuple[str, bytes]] = []
    for kind in ("v5.mat", "std.mat"):
        blobs += [(kind, m) for m in _v5_mutants(files[kind].read_bytes(), compressed=False)]
    blobs += [("v5z.mat", m) for m in _v5_mutants(files["v5z.mat"].read_bytes(), True)]
    for kind in ("weights-v1.caffemodel", "weights-v2.caffemodel"):
        blobs += [(kind, m) for m in _caffe_mutants()]
    blobs += [("weights.safetensors", m) for m in _safetensors_mutants()]
    sizes = [(30_000, 30_000), (1 << 20, 16), (16, 1 << 20), (65_500, 65_500), (0, 20)]
    png, jpg = files["image.png"].read_bytes(), files["image.jpg"].read_bytes()
    blobs += [("image.png", _png_with_size(png, w, h)) for w, h in sizes]
    blobs += [("image.jpg", _jpeg_with_size(jpg, w, h)) for w, h in sizes if max(w, h) < 65536]
    cases = []
    for i, (kind, data) in enumerate(blobs):
        path = folder / f"size{i:03d}-{kind}"
        path.write_bytes(data)
        cases.append((kind, path))
    return cases + [("v73.mat", p) for p in _hdf5_mutants(folder)]


def test_fuzzed_files_are_read_or_refused_with_our_error(tmp_path):
    rng = np.random.default_rng(SEED)
    folder = tmp_path / "fuzz"
    folder.mkdir()
    cases: list[tuple[str, Path]] = []
    files = _valid_files(folder, rng)
    for kind, path in files.items():
        data = path.read_bytes()
        cases.append((kind, path))
        for i in range(MUTANTS_PER_FILE):
            mutant = folder / f"m{i:03d}-{kind}"
            mutant.write_bytes(_mutate(data, rng))
            cases.append((kind, mutant))
    n_random = len(cases)
    cases += size_mutants(files, folder)
    n_sizes = len(cases) - n_random
    cases += _wrong_content(folder)
    assert len(cases) >= 800
    counts = {"files": len(cases), "size_fields": n_sizes, "read": 0, "refused": 0}
    worst_s, worst_mem, slowest, biggest, bad = 0.0, 0, "", "", []
    worker = ReaderWorker("test_fuzz_readers", PER_FILE_MEMORY, PER_FILE_LIMIT_S)
    try:
        for kind, path in cases:
            got = worker.run(kind, path)
            if got["status"] == "bad":
                bad.append(f"{path.name}: {got['msg']}")
            else:
                counts[got["status"]] += 1
            if got["seconds"] > worst_s:
                worst_s, slowest = got["seconds"], path.name
            if got["peak_bytes"] > worst_mem:
                worst_mem, biggest = got["peak_bytes"], path.name
    finally:
        worker.close()
    print(f"\nfuzz: {counts}, worst {worst_s:.3f} s per file ({slowest}), worst memory"
          f" {worst_mem / 2**20:.1f} MiB per file ({biggest})")
    assert not bad, f"{len(bad)} of {len(cases)} files:\n" + "\n".join(bad[:30])
    assert counts["read"] > 0 and counts["refused"] > 0


@pytest.mark.parametrize("kind", ["v5.mat", "v73.mat"])
def test_valid_files_read_back(tmp_path, kind):
    """The bases of the fuzzing read correctly (so 'read' above means read right)."""
    rng = np.random.default_rng(SEED)
    files = _valid_files(tmp_path, rng)
    rng = np.random.default_rng(SEED)
    expected = _feat(rng) if kind == "v5.mat" else (_feat(rng), _feat(rng), _feat(rng))[2]
    np.testing.assert_array_equal(load_mat(files[kind]), expected)
