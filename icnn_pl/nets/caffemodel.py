"""Caffe ``.caffemodel`` weight files, read without Caffe or protoc.

A ``.caffemodel`` is one protobuf ``NetParameter`` message. Only the few fields weights
need are decoded here (the field numbers are those of ``caffe.proto``):

* NetParameter: 2 ``layers`` (V1LayerParameter, old files such as
  ``VGG_ILSVRC_19_layers.caffemodel``), 100 ``layer`` (LayerParameter, current files such
  as the DeePSiM generators).
* V1LayerParameter: 4 name, 5 type (enum), 6 blobs. LayerParameter: 1 name, 2 type, 7 blobs.
* BlobProto: 7 shape (BlobShape: 1 dim, int64, packed or not), legacy 1-4
  num/channels/height/width, 5 data (float32, packed or not), 8 double_data (float64).

The file is memory-mapped and read in two passes: first its structure (layer names, blob
shapes and where each blob's numbers lie), which is checked against the model before any
number is copied; then each blob is copied once from the mapped bytes into its tensor and
its pages are dropped from memory, so loading needs about one copy of the weights.
Blob layouts equal torch's: Convolution (out, in, kH, kW) = ``nn.Conv2d``, Deconvolution
(in, out, kH, kW) = ``nn.ConvTranspose2d``, InnerProduct (out, in) = ``nn.Linear`` (V1
files store it as (1, 1, out, in): leading 1s are dropped when shapes are compared).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from icnn_pl.errors import WeightsError

# Wire types (protobuf encoding): varint, 64-bit, length-delimited, 32-bit.
VARINT, I64, LEN, I32 = 0, 1, 2, 5
# NetParameter fields
_NET_LAYERS_V1, _NET_LAYER = 2, 100
# V1LayerParameter.type enum values of layers with weights (others are named by number).
V1_TYPES = {4: "Convolution", 14: "InnerProduct", 39: "Deconvolution", 17: "Pooling",
            18: "ReLU", 6: "Dropout", 20: "Softmax", 5: "Data", 15: "LRN", 3: "Concat"}
# blobs[i] -> torch parameter name
BLOB_NAMES = ("weight", "bias")
_CHUNK = 1 << 22  # numbers per step when unpacked data is scanned or copied
_MAX_DIMS, _MAX_DIM = 32, (1 << 62) - 1  # a blob shape beyond these is a damaged file


@dataclass(frozen=True)
class Segment:
    """A run of numbers in the file: ``count`` values of ``dtype`` from byte ``offset``;
    unpacked data has one key byte before each value (``stride`` = 1 + itemsize)."""

    offset: int
    count: int
    dtype: str  # "<f4" or "<f8"
    stride: int  # itemsize (packed) or itemsize + 1 (unpacked)


@dataclass(frozen=True)
class BlobInfo:
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def count(self) -> int:
        return sum(s.count for s in self.segments)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    blobs: tuple[BlobInfo, ...]


class _Corrupt(Exception):
    """A wire-format error at a byte offset (turned into a WeightsError with the path)."""

    def __init__(self, pos: int, what: str, truncated: bool = False) -> None:
        super().__init__(what)
        self.pos, self.what, self.truncated = pos, what, truncated


# -- wire format -------------------------------------------------------------------------
def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise _Corrupt(pos, "a number runs past the end", truncated=True)
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Corrupt(pos, "a number is longer than 10 bytes")


def _next_field(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int, int, int]:
    """(field, wire type, start, stop) of the field at ``pos``: for LEN fields start..stop
    is the payload, for numbers the encoded value (varints: its bytes)."""
    key, start = _varint(buf, pos, end)
    field, wt = key >> 3, key & 7
    if field == 0 or wt not in (VARINT, I64, LEN, I32):
        raise _Corrupt(pos, f"invalid field key {key} (field {field}, wire type {wt})")
    if wt == VARINT:
        stop = _varint(buf, start, end)[1]
    elif wt == LEN:
        length, start = _varint(buf, start, end)
        stop = start + length
    else:
        stop = start + (8 if wt == I64 else 4)
    if stop > end:
        raise _Corrupt(pos, f"field {field} needs {stop - start} bytes, only"
                       f" {end - start} remain", truncated=True)
    return field, wt, start, stop


def _fields(buf: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Every field of ``buf[pos:end]`` (see ``_next_field``)."""
    while pos < end:
        field, wt, start, stop = _next_field(buf, pos, end)
        yield field, wt, start, stop
        pos = stop


def _unpacked_run(buf: mmap.mmap, pos: int, end: int, key: int, stride: int) -> int:
    """How many consecutive (key byte, value) records start at ``pos``."""
    n_max, done = (end - pos) // stride, 0
    while done < n_max:
        k = min(_CHUNK, n_max - done)
        keys = np.frombuffer(buf, np.uint8, count=k * stride, offset=pos + done * stride)
        bad = np.flatnonzero(keys[::stride] != key)
        del keys
        if bad.size:
            return done + int(bad[0])
        done += k
    return done


def _blob(buf: mmap.mmap, pos: int, end: int) -> BlobInfo:
    legacy = [0, 0, 0, 0]
    shape: list[int] | None = None
    segments: list[Segment] = []
    at = pos
    while at < end:
        field, wt, start, stop = _next_field(buf, at, end)
        at = stop
        if field in (5, 8):  # data (float32) / double_data (float64)
            dtype, size = ("<f4", 4) if field == 5 else ("<f8", 8)
            if wt == LEN:  # packed
                if (stop - start) % size:
                    raise _Corrupt(start, f"packed blob data of {stop - start} bytes is not"
                                   f" a whole number of {size}-byte values")
                segments.append(Segment(start, (stop - start) // size, dtype, size))
            elif wt == (I32 if size == 4 else I64):  # unpacked: one key byte per value
                n = _unpacked_run(buf, start - 1, end, buf[start - 1], size + 1)
                segments.append(Segment(start, n, dtype, size + 1))
                at = start - 1 + n * (size + 1)  # the whole run at once
            else:
                raise _Corrupt(start, f"blob data with wire type {wt}")
        elif field == 7 and wt == LEN:  # BlobShape
            shape = []
            for f, w, a, b in _fields(buf, start, stop):
                if f == 1 and w == LEN:  # packed int64 dims
                    p = a
                    while p < b:
                        d, p = _varint(buf, p, b)
                        shape.append(d)
                elif f == 1 and w == VARINT:
                    shape.append(_varint(buf, a, b)[0])
        elif field in (1, 2, 3, 4) and wt == VARINT:  # legacy num, channels, height, width
            legacy[field - 1] = _varint(buf, start, stop)[0]
    dims = tuple(shape) if shape is not None else tuple(legacy)
    blob = BlobInfo(dims, tuple(segments))
    # exact (Python) integers: a product that overflows int64 must not wrap to the count
    if len(dims) > _MAX_DIMS or any(d > _MAX_DIM for d in dims) or \
            blob.count != math.prod(dims):
        raise _Corrupt(pos, f"a blob holds {blob.count} values but its shape is"
                       f" {_fmt(dims) if len(dims) <= 8 else f'{len(dims)} dims'}")
    return blob


def _layer(buf: mmap.mmap, pos: int, end: int, v1: bool) -> LayerInfo:
    name_f, type_f, blobs_f = (4, 5, 6) if v1 else (1, 2, 7)
    name, type_, blobs = "", "", []
    for field, wt, start, stop in _fields(buf, pos, end):
        if field == name_f and wt == LEN:
            name = bytes(buf[start:stop]).decode("utf-8", "replace")
        elif field == type_f:
            if v1 and wt == VARINT:
                code = _varint(buf, start, stop)[0]
                type_ = V1_TYPES.get(code, f"V1 type {code}")
            elif wt == LEN:
                type_ = bytes(buf[start:stop]).decode("utf-8", "replace")
        elif field == blobs_f and wt == LEN:
            blobs.append(_blob(buf, start, stop))
        elif v1 and field == 1 and wt == LEN and not name:
            raise _Corrupt(pos, "a layer in the V0 format (before 2014)")
    return LayerInfo(name, type_, tuple(blobs))


def _open(path: Path) -> mmap.mmap:
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}",
                           "pass the path of an existing .caffemodel file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty", "download or copy the .caffemodel file again")
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_layers(path: str | Path) -> list[LayerInfo]:
    """The layers of a ``.caffemodel`` with their blob shapes; no weight is read yet."""
    path = Path(path).expanduser()
    buf = _open(path)
    try:
        layers = []
        for field, wt, start, stop in _fields(buf, 0, len(buf)):
            if field in (_NET_LAYERS_V1, _NET_LAYER) and wt == LEN:
                layers.append(_layer(buf, start, stop, v1=field == _NET_LAYERS_V1))
    except _Corrupt as exc:
        size = len(buf)
        if exc.truncated:
            raise WeightsError(
                f"{path} is truncated or not a .caffemodel: at byte {exc.pos} of {size},"
                f" {exc.what}",
                "copy or download the file again (compare its size with the original)",
            ) from None
        raise WeightsError(
            f"{path} is not a .caffemodel (protobuf NetParameter) file: at byte {exc.pos},"
            f" {exc.what}",
            "give the .caffemodel weight file itself (not the .prototxt, not an HDF5"
            " .caffemodel.h5); other formats: .pt, .pth, .safetensors",
        ) from None
    finally:
        buf.close()
    if not any(layer.blobs for layer in layers):
        raise WeightsError(f"{path} is not a .caffemodel: it holds no layer with weights"
                           f" ({len(layers)} layers)",
                           "give the trained .caffemodel file, not a model definition")
    return layers


# -- layers -> state dict ----------------------------------------------------------------
def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without leading 1s: V1 InnerProduct (1, 1, out, in) vs (out, in)."""
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return tuple(shape[i:])


def _fmt(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def check_layers(layers: list[LayerInfo], expected: Mapping[str, torch.Tensor],
                 layer_map: Mapping[str, str], path: Path) -> dict[str, BlobInfo]:
    """Match Caffe layers to the model's parameters by name; every mismatch in one error.

    Returns state-dict key -> blob for every expected key.
    """
    by_name: dict[str, LayerInfo] = {}
    for layer in layers:
        if layer.blobs:
            if layer.name in by_name:
                raise WeightsError(f"{path}: layer {layer.name!r} holds weights twice",
                                   "give a file with one copy of each layer")
            by_name[layer.name] = layer
    to_module = dict(layer_map)
    mapped_keys = {f"{p}.{b}" for p in to_module.values() for b in BLOB_NAMES}
    unmapped = sorted(k for k in expected if k not in mapped_keys)
    missing, extra, wrong = [], [], []
    plan: dict[str, BlobInfo] = {}
    for caffe_name, module_path in to_module.items():
        keys = [k for k in (f"{module_path}.{b}" for b in BLOB_NAMES) if k in expected]
        if not keys:
            continue
        want = ", ".join(f"{k.rsplit('.', 1)[1]} {_fmt(tuple(expected[k].shape))}" for k in keys)
        layer = by_name.get(caffe_name)
        if layer is None:
            missing.append(f"{caffe_name} ({want})")
            continue
        if len(layer.blobs) != len(keys):
            wrong.append(f"{caffe_name}: file has {len(layer.blobs)} blobs"
                         f" {', '.join(_fmt(b.shape) for b in layer.blobs)}, model {want}")
            continue
        for key, blob in zip(keys, layer.blobs, strict=True):
            shape = tuple(expected[key].shape)
            if _squeezed(blob.shape) != _squeezed(shape):
                wrong.append(f"{caffe_name} {key.rsplit('.', 1)[1]}: file {_fmt(blob.shape)}"
                             f" vs model {_fmt(shape)}")
            plan[key] = blob
    for name, layer in by_name.items():
        if name not in to_module:
            extra.append(f"{name} [{layer.type}] ({', '.join(_fmt(b.shape) for b in layer.blobs)})")
    if missing or extra or wrong or unmapped:
        parts = []
        for title, items in (("missing layers", missing), ("extra layers", extra),
                             ("wrong shapes", wrong),
                             ("model parameters no Caffe layer maps to", unmapped)):
            if items:
                parts.append(f"{title}: " + "; ".join(items))
        raise WeightsError(
            f"{path} does not fit the network: " + " | ".join(parts),
            "give the .caffemodel trained for this network (VGG19: VGG_ILSVRC_19_layers;"
            " generator=relu7: the DeePSiM fc7 generator.caffemodel)",
        )
    return plan


def _copy_blob(buf: mmap.mmap, blob: BlobInfo) -> np.ndarray:
    """The blob's numbers as float32, copied once from the mapped file; the pages read are
    then dropped from this process's memory (they are file-backed: re-readable)."""
    out = np.empty(blob.count, dtype=np.float32)
    i = 0
    for seg in blob.segments:
        packed = seg.stride == int(seg.dtype[-1])
        for j in range(0, seg.count, _CHUNK):  # chunks: at most one chunk's pages mapped
            n = min(_CHUNK, seg.count - j)
            if packed:
                src = np.frombuffer(buf, seg.dtype, count=n, offset=seg.offset + j * seg.stride)
                out[i + j:i + j + n] = src
            else:  # skip the key byte before each value
                src = np.frombuffer(buf, np.uint8, count=n * seg.stride,
                                    offset=seg.offset + j * seg.stride - 1)
                out[i + j:i + j + n] = src.reshape(n, seg.stride)[:, 1:].copy().view(
                    seg.dtype).ravel()
            del src
            _drop_pages(buf, seg.offset + j * seg.stride - 1, n * seg.stride + 1)
        i += seg.count
    return out


def _drop_pages(buf: mmap.mmap, start: int, length: int) -> None:
    if not hasattr(buf, "madvise"):
        return
    page = mmap.PAGESIZE
    first = max(0, start) // page * page
    stop = min(len(buf), start + length)
    if stop > first:
        buf.madvise(mmap.MADV_DONTNEED, first, stop - first)


def caffe_layer_map(module: torch.nn.Module, layer_mapping: Mapping[str, str] | None = None
                    ) -> dict[str, str]:
    """Caffe layer name -> module path for every module holding parameters: the feature
    name that ``layer_mapping`` gives the module (VGG19: ``conv1_1`` -> ``features.0``),
    else the module path itself (the relu7 generator: ``defc7``, ``deconv5``, ...)."""
    from icnn_pl.nets.encoder import parse_tap  # bdpy's features[0] -> features.0

    names = {parse_tap(module, spec).path: name for name, spec in (layer_mapping or {}).items()}
    return {names.get(path, path): path for path, m in module.named_modules()
            if any(True for _ in m.parameters(recurse=False))}


def caffe_state_dict(path: str | Path, expected: Mapping[str, torch.Tensor],
                     layer_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A state dict for a model with ``expected`` parameters from a ``.caffemodel``.

    ``layer_map``: Caffe layer name -> module path (``{"conv1_1": "features.0"}``), as
    ``caffe_layer_map`` builds it (the relu7 generator's module paths are its Caffe names).
    The file's structure is checked first (missing, extra and mis-shaped layers, all
    listed), then each blob is copied once into a float32 tensor of the model's shape.
    """
    path = Path(path).expanduser()
    plan = check_layers(read_layers(path), expected, layer_map, path)
    state: dict[str, torch.Tensor] = {}
    buf = _open(path)
    try:
        for key, blob in plan.items():
            arr = _copy_blob(buf, blob)
            state[key] = torch.from_numpy(arr).view(tuple(expected[key].shape))
    finally:
        buf.close()
    return state


def read_caffemodel(path: str | Path) -> dict[str, torch.Tensor]:
    """Every blob of a ``.caffemodel`` as ``"<layer>.weight"`` / ``"<layer>.bias"`` tensors
    in the file's shapes (further blobs: ``"<layer>.blob<i>"``)."""
    path = Path(path).expanduser()
    layers = read_layers(path)
    state: dict[str, torch.Tensor] = {}
    buf = _open(path)
    try:
        for layer in layers:
            for i, blob in enumerate(layer.blobs):
                name = BLOB_NAMES[i] if i < len(BLOB_NAMES) else f"blob{i}"
                state[f"{layer.name}.{name}"] = torch.from_numpy(
                    _copy_blob(buf, blob)).view(blob.shape)
    finally:
        buf.close()
    return state
