"""Fuzzed inputs (#14): every reader of user files, on mutated copies of valid files.

Valid files are written here (MATLAB v5 plain and compressed, v7.3/HDF5, reference-std
files, act_range text, weight files as ``.pt``, ``.safetensors`` and ``.caffemodel`` in
both net formats, written by the tests' own protobuf writer), then mutated with a
fixed seed: truncated, bytes flipped, chunks overwritten, zeroed, inserted or deleted; and
valid files with the wrong content (dtype, shape, NaN, empty, wrong keys). Each file must
either read or be refused with one of our errors (``IcnnError``, a one-line problem),
never another exception; each read is timed (and stopped by an alarm if it hangs).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import caffe_writer
import numpy as np
import pytest
import scipy.io
import torch
from engine_helpers import tiny_net
from mat_writers import write_v5, write_v73
from safetensors.torch import save_file
from torch import nn

from icnn_pl.data.matio import load_mat, load_mat_dict, mat_shape
from icnn_pl.data.readers import TrueFeatures, load_act_range, load_reference_std
from icnn_pl.errors import IcnnError
from icnn_pl.nets.weights import load_weights

SEED = 14
MUTANTS_PER_FILE = 65
PER_FILE_LIMIT_S = 5.0  # a hang fails the test; the worst seen is reported
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
    return load_weights(tiny_net(), path, "tiny")


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


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def test_fuzzed_files_are_read_or_refused_with_our_error(tmp_path):
    rng = np.random.default_rng(SEED)
    folder = tmp_path / "fuzz"
    folder.mkdir()
    cases: list[tuple[str, Path]] = []
    for kind, path in _valid_files(folder, rng).items():
        data = path.read_bytes()
        cases.append((kind, path))
        for i in range(MUTANTS_PER_FILE):
            mutant = folder / f"m{i:03d}-{kind}"
            mutant.write_bytes(_mutate(data, rng))
            cases.append((kind, mutant))
    cases += _wrong_content(folder)
    assert len(cases) >= 500
    counts = {"tried": 0, "read": 0, "refused": 0}
    worst, slowest, bad = 0.0, "", []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for kind, path in cases:
            counts["tried"] += 1
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, PER_FILE_LIMIT_S)
            try:
                READERS[kind](path)
                counts["read"] += 1
            except IcnnError as exc:
                counts["refused"] += 1
                if "\n" in exc.problem or not exc.problem:
                    bad.append(f"{path.name}: not one line: {exc.problem!r}")
            except _Timeout:
                bad.append(f"{path.name}: still reading after {PER_FILE_LIMIT_S} s")
            except Exception as exc:  # noqa: BLE001 - the point of the test
                bad.append(f"{path.name}: {type(exc).__name__}: {str(exc)[:200]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            seconds = time.perf_counter() - t0
            if seconds > worst:
                worst, slowest = seconds, path.name
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"\nfuzz: {counts}, worst {worst:.3f} s per file ({slowest})")
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
