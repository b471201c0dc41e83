"""What the benchmarks share: the pipeline's own configs, targets, the floor, memory peaks.

Every benchmark builds its reconstructions from the composed Hydra config (``conf/``),
through the same ``build_recipe`` and ``Recipe.build`` as ``train_recon.py``, so it
measures the defaults users run, not a hand-written copy of them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import runpy
import statistics
import sys
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

from icnn_pl.engine.fit import device_trainer_args, fit
from icnn_pl.engine.recipe import Recipe
from icnn_pl.engine.reconstruction import ReconResult
from icnn_pl.image import to_caffe
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.nets.generator import center_crop
from icnn_pl.pipeline.factory import build_encoder_from_cfg, build_recipe

REPO = Path(__file__).resolve().parents[1]


# -- command line ---------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark takes: where it runs, at what size, where the CSV goes."""
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda[:i]: never chosen by itself")
    parser.add_argument("--size", type=int, default=224, help="image side (paper: 224)")
    parser.add_argument("--out", type=Path, default=None, help="CSV file for the table")


def setup_run(args: argparse.Namespace) -> list[str]:
    """Apply ``--threads``; the config overrides that ``--size`` and ``--device`` mean."""
    torch.set_num_threads(args.threads)
    return [f"network.input_size=[{args.size},{args.size}]", *trainer_overrides(args.device)]


def trainer_overrides(device: str | torch.device) -> list[str]:
    """The trainer config that runs on ``device``: ``trainer=cpu``, or ``trainer=gpu``
    (device 0) with ``trainer.devices=[i]`` for ``cuda:i``."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["trainer=cpu"]
    return ["trainer=gpu"] + ([f"trainer.devices=[{device.index}]"] if device.index else [])


# -- configs and networks -----------------------------------------------------------------
def compose_cfg(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``train_recon.py`` would run with these overrides."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@dataclass
class Setup:
    """One method as the pipeline builds it: its config, encoder and recipe."""

    method: str
    cfg: DictConfig
    encoder: FeatureEncoder
    recipe: Recipe
    overrides: list[str]  # besides method and n_iter: for the same job via train_recon.py

    @property
    def generator(self) -> nn.Module | None:
        return self.recipe.generator

    @property
    def layers(self) -> list[str]:
        return list(self.cfg.layers.names)


def method_setup(method: str, n_iter: int, device: str, overrides: Sequence[str] = (),
                 encoder: FeatureEncoder | None = None) -> Setup:
    """Config, (shared) encoder and recipe of ``method`` with ``n_iter`` iterations."""
    cfg = compose_cfg([f"method={method}", f"method.n_iter={n_iter}", *overrides])
    if encoder is None:
        encoder, _ = build_encoder_from_cfg(cfg)
    encoder.to(device)
    recipe = build_recipe(cfg)
    if recipe.generator is not None:
        recipe.generator.to(device)
    return Setup(method, cfg, encoder, recipe, list(overrides))


def stimulus(size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """A natural image (scikit-image's astronaut) as HxWx3 float RGB, 0-255."""
    import skimage.data
    from PIL import Image

    img = Image.fromarray(skimage.data.astronaut()).resize(size[::-1], Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def true_targets(encoder: FeatureEncoder, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Features of the stimulus, name -> (1, ...) on the encoder's device."""
    encoder.set_layers(list(layers))
    image = to_caffe(stimulus(tuple(encoder.input_size)), encoder.mean_bgr).to(encoder.device)
    with torch.no_grad():
        return {n: f.detach() for n, f in encoder(image).items()}


def reconstruct(setup: Setup, targets: Mapping[str, torch.Tensor],
                on_eval: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                build: Mapping[str, Any] | None = None, **trainer_kwargs: Any) -> ReconResult:
    """One reconstruction with the method's recipe; ``on_eval(loss, image)`` runs after each
    loss; ``build`` goes to ``Recipe.build`` (layer ``weights``, ``labels``, ``seed``);
    ``trainer_kwargs`` go to ``make_trainer`` (``precision``, ``tf32``)."""
    module = setup.recipe.build(targets, setup.encoder, **(build or {}))
    if on_eval is not None:
        compute = module.compute_loss

        def timed():
            out = compute()
            on_eval(*out)
            return out

        module.compute_loss = timed
    return fit(module, **device_trainer_args(setup.encoder.device), **trainer_kwargs)


# -- the floor ----------------------------------------------------------------------------
def _stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The torchvision-VGG forward as a flat list of (module path, module)."""
    stages = [(f"features.{i}", m) for i, m in enumerate(net.features)]
    stages += [("avgpool", net.avgpool), ("flatten", nn.Flatten(1))]
    return stages + [(f"classifier.{i}", m) for i, m in enumerate(net.classifier)]


def floor_seconds(encoder: FeatureEncoder, targets: Mapping[str, torch.Tensor], iters: int,
                  generator: nn.Module | None = None, early_stop: bool = True) -> float:
    """Seconds per iteration of the bare work: forward to the deepest target layer (or
    through the whole net) and backward to the input, with the l2 loss; no optimiser,
    schedules, logging or Lightning."""
    paths = {encoder.layer_mapping[n]: n for n in targets}
    stages = _stages(encoder.net)
    if early_stop:
        last = max(i for i, (p, _) in enumerate(stages) if p in paths)
        stages = stages[: last + 1]
    device = encoder.device
    shape = (1, 4096) if generator is not None else (1, 3, *encoder.input_size)
    x = torch.zeros(shape, device=device, requires_grad=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        h = x if generator is None else center_crop(generator(x), tuple(encoder.input_size))
        loss = h.new_zeros(())
        for path, module in stages:
            h = module(h)
            if path in paths:
                loss = loss + ((h - targets[paths[path]]) ** 2).sum()
        loss.backward()
        x.grad = None
    sync()
    return (time.perf_counter() - t0) / iters


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- memory -------------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident memory of this process now (Linux), MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory while a block runs: the CUDA allocator's peak on a GPU, else the
    process's resident memory sampled every 10 ms. ``peak_mb`` is absolute, ``extra_mb``
    is above the level at entry."""

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.peak_mb = self.extra_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
            return self
        self._base = self._peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, rss_mb())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, rss_mb())
        self.extra_mb = self.peak_mb - self._base


# -- timing -------------------------------------------------------------------------------
def interleave(cases: Mapping[Hashable, Callable[[], float]], repeats: int, device: str,
               warmup: bool = True) -> tuple[dict[Hashable, float], dict[Hashable, float]]:
    """Run every case once per round for ``repeats`` rounds (after one uncounted warm-up
    round: first-touch allocations, lazy inits), so that the machine's drift hits all cases
    alike. Returns each case's median result and its largest peak memory (MB)."""
    times: dict[Hashable, list[float]] = {k: [] for k in cases}
    peaks: dict[Hashable, list[float]] = {k: [] for k in cases}
    for round_ in range(repeats + int(warmup)):
        for key, case in cases.items():
            with PeakMemory(device) as mem:
                seconds = case()
            if round_ >= int(warmup):
                times[key].append(seconds)
                peaks[key].append(mem.peak_mb)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: max(v) for k, v in peaks.items()})


# -- the real entry point ------------------------------------------------------------------
def run_train_recon(args: Sequence[str]) -> float:
    """Run ``python train_recon.py *args`` in this process (as ``__main__``, exactly as the
    CLI does); returns its wall time in seconds. Raises if the job fails."""
    argv, handlers = sys.argv, list(logging.root.handlers)
    sys.argv = ["train_recon.py", *args]
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(str(REPO / "train_recon.py"), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"train_recon.py {' '.join(args)} failed:\n{out.getvalue()}"
                               ) from None
    finally:
        sys.argv = argv
        # Hydra's handlers (a log file in the run directory) must not outlive the job.
        for h in set(logging.root.handlers) - set(handlers):
            logging.root.removeHandler(h)
            h.close()
    return time.perf_counter() - t0


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- tables -------------------------------------------------------------------------------
def report(rows: Sequence[Mapping[str, Any]], settings: str, out: Path | None) -> None:
    """Print what the table was measured on and the table (Markdown); write it as CSV."""
    print(f"\n{machine()}; {settings}\n")
    print_markdown(rows)
    write_csv(rows, out)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path | None) -> None:
    if not path or not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def print_markdown(rows: Sequence[Mapping[str, Any]]) -> None:
    print(markdown(rows))


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table (columns in first-seen order)."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in fields) + " |" for row in rows]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def machine() -> str:
    """One line naming what the numbers were measured on."""
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {where}"
