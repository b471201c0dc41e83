"""Per-image seeds: every random draw about an image comes from its own label's seed, so a
result does not depend on the order, batching or sharding of the images."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch


def image_seed(seed: int, *labels: str) -> int:
    """A seed from the job seed and image labels (or a label and the purpose of a stream)."""
    return (seed * 1_000_003 + zlib.crc32("|".join(labels).encode())) % 2**31


def image_generators(seed: int, labels: Sequence[str], purpose: str = "") -> list[torch.Generator]:
    """One CPU generator per image, seeded from the job seed, its label and ``purpose``
    (a separate stream per use: the initial value, the random moves)."""
    extra = (purpose,) if purpose else ()
    return [torch.Generator().manual_seed(image_seed(seed, lab, *extra)) for lab in labels]
