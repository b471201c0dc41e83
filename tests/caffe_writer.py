"""A minimal ``.caffemodel`` writer for the tests, independent of the reader under test.

It encodes protobuf by the book (keys, varints, length prefixes) with ``struct``: V1
(``layers``, field 2, enum types, legacy 4-D blob shapes) or current (``layer``, field 100,
string types, ``BlobShape``), data packed or one field per number, float32 or float64
(``double_data``). Messages are lists of byte pieces (a length prefix is the sum of its
pieces' lengths), written one after another: a full-size VGG19 is never copied whole.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

V1_ENUM = {"Convolution": 4, "InnerProduct": 14, "Deconvolution": 39, "ReLU": 18,
           "Pooling": 17}
Pieces = list[bytes]


def varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def length_delimited(field: int, payload: Pieces) -> Pieces:
    return [key(field, 2) + varint(sum(len(p) for p in payload)), *payload]


def varint_field(field: int, value: int) -> bytes:
    return key(field, 0) + varint(value)


def blob(array: np.ndarray, *, legacy_shape: bool, packed: bool, double: bool = False,
         packed_dims: bool = True) -> Pieces:
    """A BlobProto message: the shape first (legacy files) or after the data."""
    a = np.asarray(array)
    if legacy_shape:
        dims = (1,) * (4 - a.ndim) + tuple(a.shape)
        assert len(dims) == 4, "the legacy shape has 4 dimensions"
        shape = [varint_field(f, d) for f, d in zip((1, 2, 3, 4), dims, strict=True)]
    elif packed_dims:
        shape = length_delimited(7, length_delimited(1, [b"".join(varint(d) for d in a.shape)]))
    else:
        shape = length_delimited(7, [varint_field(1, d) for d in a.shape])
    field, dtype, wire = (8, "<f8", 1) if double else (5, "<f4", 5)
    values = np.ascontiguousarray(a, dtype=dtype).ravel()
    if packed:
        data = length_delimited(field, [values.tobytes()])
    else:  # one (key, value) record per number
        records = np.empty(values.size, dtype=[("key", "u1"), ("value", dtype)])
        records["key"] = key(field, wire)[0]
        records["value"] = values
        data = [records.tobytes()]
    return shape + data if legacy_shape else data + shape


def layer(name: str, type_: str, blobs: Sequence[Pieces], *, v1: bool) -> Pieces:
    """A (V1)LayerParameter with bottom/top and an unknown number field the reader skips."""
    if v1:
        body = [key(2, 2) + varint(6) + b"bottom",
                key(3, 2) + varint(len(name)) + name.encode(),
                key(4, 2) + varint(len(name)) + name.encode(), varint_field(5, V1_ENUM[type_]),
                key(7, 5) + struct.pack("<f", 1.0)]  # blobs_lr (unpacked), skipped
    else:
        body = [key(1, 2) + varint(len(name)) + name.encode(),
                key(2, 2) + varint(len(type_)) + type_.encode(),
                key(3, 2) + varint(6) + b"bottom",
                key(5, 1) + struct.pack("<d", 0.5)]  # a 64-bit field, skipped
    for b in blobs:
        body += length_delimited(6 if v1 else 7, b)
    return body


def net(layers: Iterable[tuple[str, str, Sequence[np.ndarray]]], *, v1: bool,
        packed: bool = True, legacy_shape: bool | None = None, double: bool = False,
        packed_dims: bool = True, name: str = "test_net") -> Iterable[bytes]:
    """The pieces of a NetParameter with ``layers`` = (name, type, [weight, bias]) in
    order; layers without arrays (ReLU) are written too, as real files hold them."""
    legacy = v1 if legacy_shape is None else legacy_shape
    yield from length_delimited(1, [name.encode()])
    for lname, ltype, arrays in layers:
        blobs = [blob(a, legacy_shape=legacy, packed=packed, double=double,
                      packed_dims=packed_dims) for a in arrays]
        yield from length_delimited(2 if v1 else 100, layer(lname, ltype, blobs, v1=v1))


def vgg_layers(state: Mapping[str, np.ndarray], mapping: Mapping[str, str]
               ) -> list[tuple[str, str, list[np.ndarray]]]:
    """VGG19 state dict (torch keys) -> Caffe layers named conv1_1 ... fc8 with a ReLU
    layer after each; InnerProduct weights as (out, in)."""
    out: list[tuple[str, str, list[np.ndarray]]] = []
    for caffe_name, path in mapping.items():
        kind = "InnerProduct" if caffe_name.startswith("fc") else "Convolution"
        out.append((caffe_name, kind, [state[f"{path}.weight"], state[f"{path}.bias"]]))
        suffix = caffe_name[4:] if kind == "Convolution" else caffe_name[2:]
        out.append((f"relu{suffix}", "ReLU", []))
    return out


def write(path, pieces: Iterable[bytes]) -> None:
    with open(path, "wb") as f:
        for p in pieces:
            f.write(p)


def write_generator(path, generator) -> None:
    """A relu7 generator module as the DeePSiM release's ``generator.caffemodel``: current
    format, InnerProduct defc7..defc5, Deconvolution deconv5..deconv0, packed data."""
    state = {k: v.numpy() for k, v in generator.state_dict().items()}
    names = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in state))
    write(path, net([(n, "InnerProduct" if n.startswith("defc") else "Deconvolution",
                      [state[f"{n}.weight"], state[f"{n}.bias"]]) for n in names], v1=False))
