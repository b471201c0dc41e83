"""Image folders: stimulus images (true images for evaluation) and true features computed
from them (``data=true``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from icnn_pl.errors import DataError
from icnn_pl.image import load_rgb, to_caffe
from icnn_pl.nets.encoder import FeatureEncoder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPEG", ".JPG", ".PNG")
MIN_SIDE = 16


class ImageFolder:
    """``<folder>/<label>.<ext>`` images, read as RGB 0-255 at the encoder's input size."""

    def __init__(self, folder: str | Path, size: tuple[int, int]) -> None:
        self.folder = Path(folder).expanduser()
        self.size = size
        if not self.folder.is_dir():
            raise DataError(f"image folder not found: {self.folder}",
                            "set data.stimuli=<folder of stimulus images> (or null)")
        self._paths = {p.stem: p for p in sorted(self.folder.iterdir())
                       if p.suffix in IMAGE_SUFFIXES and not p.name.startswith(".")}
        if not self._paths:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES[:6])}) in {self.folder}",
                            "point to a folder holding the stimulus images")

    def labels(self) -> list[str]:
        return list(self._paths)

    def __contains__(self, label: str) -> bool:
        return label in self._paths

    def image(self, label: str) -> np.ndarray:
        """The image as RGB float32 (H, W, 3) 0-255, resized (bicubic) to the input size."""
        path = self._paths.get(label)
        if path is None:
            raise DataError(f"no image {label!r} in {self.folder}", "add it or drop the label")
        try:
            from PIL import Image

            with Image.open(path) as im:
                if min(im.size) < MIN_SIDE:
                    raise DataError(f"image {path} is only {im.size[0]}x{im.size[1]} pixels",
                                    f"use images of at least {MIN_SIDE}x{MIN_SIDE}")
                _check_declared_size(path, im.size, len(im.getbands()))
            return load_rgb(path, self.size)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {exc}",
                            "replace or remove the unreadable file") from exc


# Decoding allocates the size the header declares; compressed pixels inflate at most
# ~1032:1 (deflate), so a header declaring more than this times the file is a lie.
MAX_INFLATION = 1100
MAX_PIXELS = 100_000_000


def _check_declared_size(path: Path, size: tuple[int, int], bands: int) -> None:
    """Refuse an image whose header declares more pixels than its bytes can hold (or
    than any stimulus has), before it is decoded."""
    pixels = size[0] * size[1]
    if pixels > MAX_PIXELS or pixels * bands > MAX_INFLATION * path.stat().st_size + 65536:
        raise DataError(f"image {path} declares {size[0]}x{size[1]} pixels, more than its"
                        f" {path.stat().st_size} bytes can hold: a damaged file",
                        "replace or remove the file")


class ImageFeatures:
    """True features of a folder of images, computed with the encoder (``data=true``)."""

    def __init__(self, images: ImageFolder, encoder: FeatureEncoder, layers: Sequence[str]):
        self.images = images
        self.encoder = encoder
        self.layers = list(layers)

    def labels(self) -> list[str]:
        return self.images.labels()

    @torch.no_grad()
    def read(self, label: str) -> dict[str, np.ndarray]:
        x = to_caffe(self.images.image(label), self.encoder.mean_bgr).to(self.encoder.device)
        self.encoder.set_layers(self.layers)
        return {n: t[0].cpu().numpy() for n, t in self.encoder(x).items()}
