"""Shared builders for the pipeline tests (``tests/test_pipeline_*.py``).

* Running the real entry point: ``run_cli`` (``python train_recon.py ...`` in a subprocess)
  and ``run_many`` (several ``train_recon.py`` commands in ONE interpreter: each is run as
  ``__main__`` with its own ``sys.argv``, exactly as the CLI runs it, but the ~10 s of
  interpreter start-up and imports are paid once; ``start_many`` / ``many_results`` run
  such interpreters side by side).
* Writing small on-disk inputs in the lab's formats: image folders, bdpy-layout and
  Caffe-era decoded features, reference-std files.
* A tiny in-memory setup for ``run_job`` (tiny conv net, feature source in memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
ENTRY = "train_recon.py"

# Tiny settings for every real run: VGG19 at 64x64 is ~16x cheaper than at 224.
SIZE = 64
# trainer=cpu: tests choose their device; they never switch to a GPU by themselves.
TINY = [f"network.input_size=[{SIZE},{SIZE}]", "method.n_iter=2", "progress=false", "trainer=cpu"]
DEMO_LABELS = ("astronaut", "chelsea")
CONV1 = ("conv1_1", "conv1_2")  # layers=conv1: shape (64, SIZE, SIZE) each

RESULT_COLUMNS = ("label", "method", "subject", "roi", "final_loss", "iterations",
                  "function_evals", "seconds", "stop_reason", "loss_fell")
METHODS = ("icnn_gd", "icnn_lbfgs", "icnn_dgn_gd", "icnn_dgn_lbfgs")
DGN_METHODS = ("icnn_dgn_gd", "icnn_dgn_lbfgs")
# The weight-free Fourier prior and the no-optimisation DGN baseline (tests/test_prior.py)
PRIOR_METHODS = ("icnn_fourier", "icnn_fourier_lbfgs", "dgn_direct")
ALL_METHODS = METHODS + PRIOR_METHODS


# -- running the entry point ---------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The environment for a child run: no full Hydra tracebacks forced on (they would
    hide whether our own errors print one), and no host GPUs recorded by a train_recon.py
    that an earlier test ran in this process (a child must record the GPUs it sees)."""
    from icnn_pl.pipeline.devices import HOST_GPUS_ENV

    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop(HOST_GPUS_ENV, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args: Sequence[str], timeout: float = 300, env: Mapping[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """``python train_recon.py *args`` from the repository root (``env``: added variables)."""
    return subprocess.run([sys.executable, ENTRY, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**child_env(), **(env or {})})


def with_defaults(defaults: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``defaults`` then ``overrides``, dropping defaults whose key an override sets (Hydra
    refuses a key given twice)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    if "data" in keys:  # another data option: the demo's root is not its root
        keys.add("data.root")
    return [d for d in defaults if d.split("=", 1)[0] not in keys] + list(overrides)


def output_of(proc: subprocess.CompletedProcess | Mapping[str, Any]) -> str:
    if isinstance(proc, Mapping):
        return proc["out"] + proc["err"]
    return proc.stdout + proc.stderr


_DRIVER = r"""
import contextlib, io, json, logging, runpy, sys, time
cases = json.loads(sys.argv[1])
results = []
for args in cases:
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [ENTRY, *args]
    code, t0 = 0, time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(ENTRY, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # reported, not fatal for the other cases
            import traceback
            traceback.print_exc()
            code = "raised " + type(exc).__name__
    logging.shutdown()
    for h in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(h)
    results.append({"args": args, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                    "seconds": round(time.perf_counter() - t0, 2)})
sys.__stdout__.write("\n@@RESULTS@@" + json.dumps(results))
""".replace("ENTRY", repr(ENTRY))


@dataclass
class ManyRun:
    """``run_many``'s interpreter, started by ``start_many``; ``many_results`` waits for it.
    Its output goes to files (a full pipe would stall it while another one is read)."""

    proc: subprocess.Popen
    stdout: IO[str]
    stderr: IO[str]
    deadline: float  # time.monotonic()


def start_many(cases: Sequence[Sequence[str]], timeout: float = 400,
               env: Mapping[str, str] | None = None) -> ManyRun:
    """Start ``run_many``'s interpreter for ``cases`` and return at once (``env``: added
    variables)."""
    # closed by many_results
    stdout = tempfile.TemporaryFile("w+")  # noqa: SIM115
    stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps([list(c) for c in cases])],
                            cwd=REPO, stdout=stdout, stderr=stderr, text=True,
                            env={**child_env(), **(env or {})})
    return ManyRun(proc, stdout, stderr, time.monotonic() + timeout)


def many_results(run: ManyRun) -> list[dict[str, Any]]:
    """Wait for a ``start_many`` interpreter (killed at its timeout) and return its results
    as ``run_many`` does."""
    try:
        run.proc.wait(max(0.0, run.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.wait()
        raise
    finally:
        texts = []
        for fh in (run.stdout, run.stderr):
            fh.seek(0)
            texts.append(fh.read())
            fh.close()
    out, err = texts
    marker = out.rfind("@@RESULTS@@")
    if marker < 0:
        raise AssertionError(f"driver crashed (rc {run.proc.returncode}):\n"
                             f"{(out + err)[-4000:]}")
    return json.loads(out[marker + len("@@RESULTS@@"):])


def run_many(cases: Sequence[Sequence[str]], timeout: float = 400) -> list[dict[str, Any]]:
    """Run ``train_recon.py <args>`` for each case in one interpreter (from the repository
    root, as ``__main__``, with Hydra's own exit handling). Returns per case: ``args``,
    ``code`` (exit code), ``out``, ``err``, ``seconds``."""
    return many_results(start_many(cases, timeout))


# -- on-disk inputs ------------------------------------------------------------------------
def write_demo(root: Path, labels: Sequence[str] = DEMO_LABELS,
               subjects: Sequence[int | None] = (None,)) -> Path:
    """The embedded demo for the tiny network, written in-process exactly as a run writes
    it (same encoder, same network id): true features of ``labels`` and, per subject in
    ``subjects`` (None: none), their decoded features."""
    import shutil

    from hydra import compose, initialize_config_dir

    from icnn_pl.data.demo import Demo
    from icnn_pl.pipeline.factory import build_encoder_from_cfg, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"data.root={root}"])
    encoder, network_id = build_encoder_from_cfg(cfg)
    demo = Demo(root, encoder, network_id)
    for subject in subjects:
        # Work-around for test_demo_second_subject_after_cached_true_features (units): the
        # decoded features of a subject written after the true features were cached get a
        # spurious leading axis, so start each subject from uncached true features.
        shutil.rmtree(demo.true_dir, ignore_errors=True)
        demo.ensure(labels, subject=subject)
    return root


def write_images(folder: Path, labels: Sequence[str], size: int = 40) -> Path:
    """Small distinct RGB PNGs ``<folder>/<label>.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i, lab in enumerate(labels):
        rng = np.random.default_rng(i)
        img = np.stack([(xx * (3 + i) + yy) % 256, (yy * (2 + i)) % 256,
                        rng.integers(0, 256, (size, size))], axis=-1)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{lab}.png")
    return folder


def conv1_features(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal((64, SIZE, SIZE)) * (10.0 + 5 * k)).astype(np.float32)
            for k, n in enumerate(CONV1)}


def write_decoded_bdpy(root: Path, subject: str, roi: str, labels: Sequence[str]) -> None:
    """``<root>/<layer>/<subject>/<roi>/decoded_features/<label>.mat``, ``feat`` (1,C,H,W)."""
    for i, lab in enumerate(labels):
        for layer, f in conv1_features(i).items():
            d = root / layer / subject / roi / "decoded_features"
            d.mkdir(parents=True, exist_ok=True)
            scipy.io.savemat(d / f"{lab}.mat", {"feat": f[None]})


def write_decoded_caffe(root: Path, subject: str, roi: str, labels: Sequence[str],
                        feature_type: str = "natural", net: str = "VGG19") -> None:
    """``<root>/<type>/<net>/<layer>/<S1>/<roi>/<type>-<net>-<layer>-<S1>-<roi>-<label>.mat``,
    ``feat`` (C,H,W)."""
    for i, lab in enumerate(labels):
        for layer, f in conv1_features(100 + i).items():
            d = root / feature_type / net / layer / subject / roi
            d.mkdir(parents=True, exist_ok=True)
            name = f"{feature_type}-{net}-{layer}-{subject}-{roi}-{lab}.mat"
            scipy.io.savemat(d / name, {"feat": f})


def write_std_ref(path: Path, layers: Sequence[str] = CONV1) -> Path:
    """One scalar variable per layer (like ``estimated_vgg19_cnn_feat_std.mat``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {n: np.float64(3.0 + i) for i, n in enumerate(layers)})
    return path


# -- result checks -------------------------------------------------------------------------
def distinct_values(path: Path) -> int:
    with Image.open(path) as im:
        return len(np.unique(np.asarray(im)))


def read_results(run_dir: Path) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    import csv

    with open(run_dir / "results.csv", newline="") as fh:
        rows_csv = list(csv.DictReader(fh))
    rows_json = json.loads((run_dir / "results.json").read_text())
    return rows_csv, rows_json


# -- tiny in-memory setup for run_job --------------------------------------------------------
TINY_SIZE = (16, 16)
TINY_MEAN = (104.0, 117.0, 123.0)
TINY_MAPPING = {"c1": "0", "c2": "3", "fc": "6"}


def tiny_net(seed: int = 0) -> nn.Sequential:
    """conv(3->4) relu pool conv(4->6) relu flatten linear(384->10), 16x16 input."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 8 * 8, 10))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return net


def tiny_encoder(seed: int = 0):
    from icnn_pl.nets.encoder import FeatureEncoder

    return FeatureEncoder(tiny_net(seed), TINY_MAPPING, mean_bgr=TINY_MEAN, input_size=TINY_SIZE)


class MemorySource:
    """A ``FeatureSource`` in memory: features of random images computed by the encoder.

    ``broken`` labels raise ``DataError`` on ``read`` (a corrupt file, say)."""

    def __init__(self, encoder, labels: Sequence[str], layers: Sequence[str] = ("c1", "c2", "fc"),
                 broken: Sequence[str] = ()) -> None:
        from icnn_pl.image import to_caffe

        self.broken = set(broken)
        self.reads: list[str] = []
        self.images: dict[str, np.ndarray] = {}
        self.features: dict[str, dict[str, np.ndarray]] = {}
        encoder.set_layers(encoder.forward_order(layers))
        for i, lab in enumerate(labels):
            img = np.random.default_rng(1000 + i).uniform(0, 255, (*TINY_SIZE, 3))
            self.images[lab] = img.astype(np.float32)
            with torch.no_grad():
                feats = encoder(to_caffe(self.images[lab], encoder.mean_bgr))
            self.features[lab] = {n: t[0].numpy().copy() for n, t in feats.items()}

    def labels(self) -> list[str]:
        return list(self.features)

    def read(self, label: str) -> dict[str, np.ndarray]:
        from icnn_pl.errors import DataError

        self.reads.append(label)
        if label in self.broken:
            raise DataError(f"features of {label} are corrupt", "re-export them")
        return {n: f.copy() for n, f in self.features[label].items()}


def tiny_job(encoder, run_dir: Path, *, labels: Sequence[str] = (),
             layers: Sequence[str] = ("c1", "c2", "fc"), source: MemorySource | None = None,
             broken: Sequence[str] = (), optimizer=None, n_iter: int = 2,
             method: str = "tiny_gd", data_kw: Mapping[str, Any] | None = None, **job_kw):
    """A ``run_job`` ``Job`` on the tiny setup: ``source`` (default: a ``MemorySource`` of
    ``labels`` on ``layers``, ``broken`` ones unreadable) as sub-01/VC under ``run_dir``,
    ``optimizer`` (default SGD, lr 2, momentum 0.9) for ``n_iter`` iterations from a uniform
    init, on the CPU, no progress bar. ``data_kw``: ``ReconDataModule``'s keywords
    (``num_shards``, ``shard``, ``stimuli``, ``labels``, ``batch_size``...); ``job_kw``:
    ``Job``'s."""
    import functools

    from icnn_pl.data.datamodule import ReconDataModule
    from icnn_pl.engine.recipe import Recipe
    from icnn_pl.engine.targets import expected_shapes
    from icnn_pl.pipeline.job import Job
    from icnn_pl.pipeline.outputs import ReconOutputs

    if source is None:
        source = MemorySource(encoder, labels, layers, broken=broken)
    dm = ReconDataModule(source, expected_shapes(encoder, layers), **(data_kw or {}))
    if optimizer is None:
        optimizer = functools.partial(torch.optim.SGD, lr=2.0, momentum=0.9)
    recipe = Recipe(optimizer, n_iter=n_iter, init="uniform")
    return Job(datamodule=dm, encoder=encoder, recipe=recipe,
               outputs=ReconOutputs(run_dir, "sub-01", "VC"), method=method,
               subject="sub-01", roi="VC", trainer_args={"accelerator": "cpu", "devices": 1},
               progress=False, **job_kw)
