"""``ReconDataModule``: the images to reconstruct, one batch of target feature sets at a time.

Each batch carries the labels, the targets (after std correction, stacked per layer),
the per-image layer weights and the true images when they exist. The reconstruction
module keeps targets as buffers, so the Trainer moves them to the device once per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from icnn_pl.data.images import ImageFolder
from icnn_pl.data.std_correction import std_correct
from icnn_pl.engine.objective import layer_weights
from icnn_pl.engine.targets import stack_targets
from icnn_pl.errors import ConfigError, DataError, IcnnError


class FeatureSource(Protocol):
    """Anything that lists image labels and reads their features (the readers)."""

    def labels(self) -> list[str]: ...

    def read(self, label: str) -> dict[str, np.ndarray]: ...


@dataclass
class TargetBatch:
    labels: list[str]
    targets: dict[str, torch.Tensor]  # name -> (B, ...)
    weights: dict[str, torch.Tensor]  # name -> (B,)
    true_images: list[np.ndarray | None]  # (H, W, 3) RGB 0-255 per image, or None


def check_selection(limit: Any = None, num_shards: Any = 1, shard: Any = 0,
                    batch_size: Any = 1) -> None:
    """Which images a job runs and how many at once: ``data.limit`` (None: all),
    ``data.num_shards`` / ``data.shard``, ``data.batch_size``."""
    for key, v in (("limit", limit), ("batch_size", batch_size), ("num_shards", num_shards)):
        if (v is not None or key != "limit") and (
                not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1):
            hint = f"set data.{key}=1 or more" + (" (or null)" if key == "limit" else "")
            raise ConfigError(f"data.{key}={v!r} must be a positive integer", hint)
    if not isinstance(shard, int | np.integer) or isinstance(shard, bool) \
            or not 0 <= shard < num_shards:
        raise ConfigError(f"data.shard={shard!r} is not in 0..{num_shards - 1}",
                          "use 0 <= data.shard < data.num_shards")


def select_labels(
    available: Sequence[str], labels: Sequence[str] | None = None, limit: int | None = None,
    num_shards: int = 1, shard: int = 0,
) -> list[str]:
    """Pick labels (explicit list, then ``limit``, then shard ``shard`` of ``num_shards``)."""
    check_selection(limit, num_shards, shard)
    available = list(available)
    if labels:
        missing = [lab for lab in labels if lab not in available]
        if missing:
            raise DataError(f"labels {missing} not found in the data",
                            f"available labels include {available[:8]}")
        chosen = list(labels)
    else:
        chosen = available
    if limit is not None:
        chosen = chosen[: int(limit)]
    # Strided split: deterministic, disjoint, and the union is every label.
    return chosen[int(shard)::int(num_shards)]


@dataclass
class FailedBatch:
    """A batch whose features could not be loaded; the job reports it and goes on."""

    labels: list[str]
    error: IcnnError


class _TargetSets(Dataset):
    def __init__(self, dm: ReconDataModule, chunks: list[list[str]]) -> None:
        self.dm, self.chunks = dm, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> TargetBatch | FailedBatch:
        try:
            return self.dm.load(self.chunks[i])
        except IcnnError as exc:
            return FailedBatch(list(self.chunks[i]), exc)


class ReconDataModule(pl.LightningDataModule):
    """Target features for a job, validated before any reconstruction starts.

    Args:
        source: a feature reader (decoded, Caffe-era, true, demo or image features).
        shapes: expected per-image shape of each target layer, in forward order
            (``icnn_pl.engine.targets.expected_shapes``).
        weights: layer weighting (``inverse_norm``, ``uniform`` or a dict).
        std_correction / ref_std / train_mean: decoded-feature scaling (``std_correct``).
        stimuli: images whose stems are the labels (true images for evaluation).
        labels / limit / num_shards / shard: which images to run.
        batch_size: images reconstructed together (GD methods).
    """

    def __init__(
        self,
        source: FeatureSource,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        weights: str | Mapping[str, float] = "inverse_norm",
        std_correction: str = "none",
        ref_std: Mapping[str, float] | None = None,
        train_mean: Mapping[str, np.ndarray] | None = None,
        stimuli: ImageFolder | None = None,
        labels: Sequence[str] | None = None,
        limit: int | None = None,
        num_shards: int = 1,
        shard: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_selection(limit, num_shards, shard, batch_size)
        self.source = source
        self.shapes = dict(shapes)
        self.weights = weights
        self.std_correction = std_correction
        self.ref_std = ref_std
        self.train_mean = train_mean
        self.stimuli = stimuli
        self._selection = (labels, limit, num_shards, shard)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.labels: list[str] = []  # this shard's images
        self.job_labels: list[str] = []  # every shard's: the job's tables cover them

    def setup(self, stage: str | None = None) -> None:
        """List and select the labels; fails fast on missing layers/subjects/labels."""
        available = self.source.labels()
        self.job_labels = select_labels(available, *self._selection[:2])
        self.labels = select_labels(available, *self._selection)
        if not self.labels:
            raise DataError("no images to reconstruct after label selection",
                            "check data.labels / data.limit / data.shard")

    def check(self, labels: Sequence[str]) -> dict[str, DataError]:
        """Feature-file problems of ``labels`` found from the files' headers alone (no
        array is read): unreadable file, no ``feat``, a shape the network's layer does not
        produce. Label -> the first problem. Sources without files (features computed
        from images) have nothing to check here."""
        shape_of = getattr(self.source, "shape", None)
        if shape_of is None:
            return {}
        layers = [n for n in self.shapes if n in getattr(self.source, "layers", self.shapes)]
        problems: dict[str, DataError] = {}
        for lab in labels:
            try:
                for layer in layers:
                    got, path = shape_of(lab, layer)
                    if got != self.shapes[layer]:
                        raise DataError(
                            f"image {lab}, layer {layer}: {path} holds features of shape"
                            f" {got}; the network's {layer} output is {self.shapes[layer]}",
                            "use features computed with the same network and input size"
                            " (network.input_size), or check the layer names")
            except DataError as exc:
                problems[lab] = exc
        return problems

    def load(self, labels: Sequence[str]) -> TargetBatch:
        """Read, std-correct, validate and stack the features of ``labels``."""
        sets = [std_correct({n: f for n, f in self.source.read(lab).items() if n in self.shapes},
                            self.ref_std, self.std_correction, self.train_mean)
                for lab in labels]
        targets = stack_targets(sets, self.shapes, labels)
        return TargetBatch(
            labels=list(labels),
            targets=targets,
            weights=layer_weights(targets, self.weights, labels),
            true_images=[self.true_image(lab) for lab in labels],
        )

    def true_image(self, label: str) -> np.ndarray | None:
        if self.stimuli is None or label not in self.stimuli:
            return None
        return self.stimuli.image(label)

    def predict_dataloader(self, labels: Sequence[str] | None = None) -> DataLoader:
        """Batches of ``labels`` (default: all selected), loaded in order."""
        labels = self.labels if labels is None else list(labels)
        chunks = [labels[i:i + self.batch_size] for i in range(0, len(labels), self.batch_size)]
        return DataLoader(_TargetSets(self, chunks), batch_size=None, shuffle=False,
                          num_workers=self.num_workers, collate_fn=_identity)


def _identity(x: Any) -> Any:
    return x
