"""Image galleries and loss-curve plots drawn with Pillow (no matplotlib).

``make_gallery`` lays reconstructions out in a grid: one row per method / subject (e.g.
``"true"``, ``"icnn_gd sub-01"``), one column per image label, a caption under each cell
(e.g. ``"r=0.42"``) and row titles on the left. The layout has fixed margins, so the size
of a gallery is known in advance: see :func:`gallery_size`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from icnn_pl.atomic import atomic_path
from icnn_pl.errors import ConfigError, DataError
from icnn_pl.image import display_image

__all__ = ["gallery_size", "loss_curves_image", "make_gallery", "save_png"]

PAD = 4  #: gap between cells and around the grid (pixels)
TITLE_W = 132  #: width of the row-title column on the left
HEADER_H = 18  #: height of the column-header strip on top
CAPTION_H = 14  #: height of the caption strip under each cell

BACKGROUND = (255, 255, 255)
MISSING = (190, 190, 190)  #: grey of a cell whose image is None
TEXT = (0, 0, 0)
INVALID_TEXT = (160, 0, 0)

#: Line colours of the loss plot (matplotlib's tab10 and two more).
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 128),
    (128, 0, 0),
]
MAX_LEGEND = 12  #: legend lines at most (the last one reads "+N more" when curves overflow)

_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _font() -> _Font:
    return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: _Font, max_w: float) -> str:
    """``text`` shortened with '..' until it is at most ``max_w`` pixels wide."""
    if draw.textlength(text, font=font) <= max_w:
        return text
    while text and draw.textlength(text + "..", font=font) > max_w:
        text = text[:-1]
    return text + ".." if text else ""


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: _Font, max_w: float) -> list[str]:
    """Greedy word wrap; words wider than ``max_w`` are shortened with '..'."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= max_w:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(draw, word, font, max_w))
    return lines


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray | None:
    """HxWx3 uint8 for display; floats go through ``display_image``. None if non-finite."""
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.size == 0:
        raise DataError(
            f"gallery image has shape {arr.shape}, expected H x W x 3 (or H x W grey)",
            "pass images channels-last (HWC, RGB); transpose CHW with img.transpose(1, 2, 0)",
        )
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return np.clip(arr.astype(np.int64), 0, 255).astype(np.uint8)
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        return None
    return display_image(arr)


def gallery_size(n_rows: int, n_cols: int, cell: int = 128) -> tuple[int, int]:
    """``(width, height)`` in pixels of a :func:`make_gallery` grid."""
    width = TITLE_W + n_cols * (cell + PAD) + PAD
    height = HEADER_H + n_rows * (cell + CAPTION_H + PAD) + PAD
    return width, height


def _check_grid(rows: Sequence[tuple[str, Sequence[np.ndarray | None]]], labels: Sequence[str],
                captions: Sequence[Sequence[str | None]] | None, cell: int) -> None:
    if cell < 8:
        raise ConfigError(f"gallery cell size {cell} is too small", "use cell >= 8 (e.g. 128)")
    if not rows:
        raise DataError("make_gallery got no rows", "pass at least one (title, images) row")
    n_cols = len(labels)
    if n_cols == 0:
        raise DataError("make_gallery got no column labels", "pass one label per image column")
    for title, images in rows:
        if len(images) != n_cols:
            raise DataError(
                f"gallery row {title!r} has {len(images)} images but there are {n_cols} labels",
                "pass one image (or None for a missing one) per label in every row",
            )
    if captions is not None and (
        len(captions) != len(rows) or any(len(c) != n_cols for c in captions)
    ):
        raise DataError(
            "captions do not match the grid: expected "
            f"{len(rows)} rows x {n_cols} columns, got "
            f"{len(captions)} rows x {[len(c) for c in captions]}",
            "pass one caption list per row with one string (or None) per label",
        )


def make_gallery(
    rows: Sequence[tuple[str, Sequence[np.ndarray | None]]],
    labels: Sequence[str],
    captions: Sequence[Sequence[str | None]] | None = None,
    cell: int = 128,
) -> Image.Image:
    """Grid of images: one row per ``(row title, images)``, one column per label.

    Each image is resized to ``cell x cell``; uint8 images are shown as they are, float
    images through :func:`icnn_pl.image.display_image` (percentile clip + min-max), so
    pass true images as uint8 to show them unstretched. ``None`` draws a grey cell; a float
    image with NaN/inf draws a grey cell marked "non-finite". ``captions[r][c]`` is drawn
    under cell ``(r, c)``. Size: :func:`gallery_size`. White background, default PIL font.
    """
    _check_grid(rows, labels, captions, cell)
    n_cols = len(labels)
    font = _font()
    canvas = Image.new("RGB", gallery_size(len(rows), n_cols, cell), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    line_h = CAPTION_H - 2

    for c, label in enumerate(labels):
        x = TITLE_W + PAD + c * (cell + PAD)
        draw.text((x, 3), _fit(draw, str(label), font, cell), fill=TEXT, font=font)

    for r, (title, images) in enumerate(rows):
        y = HEADER_H + r * (cell + CAPTION_H + PAD)
        max_lines = max(1, cell // line_h)
        for k, line in enumerate(_wrap(draw, str(title), font, TITLE_W - 2 * PAD)[:max_lines]):
            draw.text((PAD, y + k * line_h), line, fill=TEXT, font=font)
        for c, img in enumerate(images):
            x = TITLE_W + PAD + c * (cell + PAD)
            rgb = None if img is None else _to_rgb_uint8(img)
            if rgb is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=MISSING)
                if img is not None:
                    draw.text((x + 3, y + 3), "non-finite", fill=INVALID_TEXT, font=font)
            else:
                tile = Image.fromarray(np.ascontiguousarray(rgb))
                if tile.size != (cell, cell):
                    tile = tile.resize((cell, cell), Image.Resampling.LANCZOS)
                canvas.paste(tile, (x, y))
            text = captions[r][c] if captions is not None else None
            if text:
                draw.text((x, y + cell + 1), _fit(draw, text, font, cell), fill=TEXT, font=font)
    return canvas


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    """Write ``img`` to ``path`` as PNG atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def loss_curves_image(
    curves: Mapping[str, np.ndarray | Sequence[float]],
    size: tuple[int, int] = (640, 400),
) -> Image.Image:
    """Line plot of loss histories (x = iteration index), one coloured line per label.

    The y axis is log10 when every finite value is positive, linear otherwise; NaN/inf
    points are skipped (the line breaks there). Axes carry min/max tick labels. The legend
    on the right lists up to :data:`MAX_LEGEND` lines, ending in "+N more" when there are
    more curves (all curves are still drawn, colours cycle).
    """
    width, height = int(size[0]), int(size[1])
    if width < 200 or height < 120:
        raise ConfigError(f"loss plot size {size} is too small", "use at least (200, 120)")
    series = _loss_series(curves)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    plot = _LossPlot(ImageDraw.Draw(canvas), width, height, series)
    for k, (_, v) in enumerate(series):
        plot.line(v, PALETTE[k % len(PALETTE)])
    plot.legend([label for label, _ in series])
    return canvas


def _loss_series(curves: Mapping[str, np.ndarray | Sequence[float]]
                 ) -> list[tuple[str, np.ndarray]]:
    if not curves:
        raise DataError("loss_curves_image got no curves", "pass {label: loss history}")
    series = []
    for label, values in curves.items():
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 1:
            raise DataError(
                f"loss curve {label!r} has shape {v.shape}, expected 1-D",
                "pass one 1-D loss history per label",
            )
        series.append((str(label), v))
    return series


class _LossPlot:
    """The axes of a loss plot (drawn on creation) and the mapping of values to pixels."""

    def __init__(self, draw: ImageDraw.ImageDraw, width: int, height: int,
                 series: Sequence[tuple[str, np.ndarray]]) -> None:
        self.draw, self.font = draw, _font()
        finite = np.concatenate([v[np.isfinite(v)] for _, v in series])
        self.log_y = finite.size > 0 and bool(np.all(finite > 0))
        n_x = max(len(v) for _, v in series)
        self.legend_w = min(180, width // 3)
        self.x0, self.y0 = 64, 14
        self.x1, self.y1 = width - self.legend_w - 12, height - 30
        self.x_span = max(n_x - 1, 1)
        x0, y0, x1, y1, font = self.x0, self.y0, self.x1, self.y1, self.font
        draw.rectangle([x0, y0, x1, y1], outline=TEXT)
        draw.text((x0, 1), "loss (log scale)" if self.log_y else "loss", fill=TEXT, font=font)
        draw.text(((x0 + x1) // 2 - 20, height - 14), "iteration", fill=TEXT, font=font)
        if finite.size == 0:
            draw.text((x0 + 8, y0 + 8), "no finite values", fill=INVALID_TEXT, font=font)
            lo = hi = 0.0
        else:
            t = np.log10(finite) if self.log_y else finite
            lo, hi = float(t.min()), float(t.max())
            for y, v in ((y0 - 5, finite.max()), (y1 - 6, finite.min())):
                draw.text((4, y), _fit(draw, f"{float(v):.3g}", font, x0 - 8), fill=TEXT,
                          font=font)
        if hi - lo <= 0:
            margin = max(abs(hi) * 0.05, 0.5)
            lo, hi = lo - margin, hi + margin
        self.ty_lo, self.ty_hi = lo, hi
        draw.text((x0, y1 + 3), "0", fill=TEXT, font=font)
        last = str(max(n_x - 1, 0))
        draw.text((x1 - draw.textlength(last, font=font), y1 + 3), last, fill=TEXT, font=font)

    def _to_px(self, i: np.ndarray, val: np.ndarray) -> list[tuple[float, float]]:
        tv = np.log10(val) if self.log_y else val
        px = self.x0 + 1 + (self.x1 - self.x0 - 2) * i / self.x_span
        py = self.y1 - 1 - (self.y1 - self.y0 - 2) * (tv - self.ty_lo) / (self.ty_hi - self.ty_lo)
        return list(zip(px.tolist(), py.tolist(), strict=True))

    def line(self, v: np.ndarray, colour: tuple[int, int, int]) -> None:
        """One curve, broken where values are not finite (a lone point is a dot)."""
        idx = np.flatnonzero(np.isfinite(v))
        if idx.size == 0:
            return
        for run in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1):
            pts = self._to_px(run.astype(np.float64), v[run])
            if len(pts) == 1:
                (px, py) = pts[0]
                self.draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            else:
                self.draw.line(pts, fill=colour, width=2)

    def legend(self, labels: Sequence[str]) -> None:
        lx, ly, draw, font = self.x1 + 12, self.y0, self.draw, self.font
        shown = labels if len(labels) <= MAX_LEGEND else labels[: MAX_LEGEND - 1]
        for k, label in enumerate(shown):
            yy = ly + k * 14
            draw.line([(lx, yy + 6), (lx + 16, yy + 6)], fill=PALETTE[k % len(PALETTE)], width=3)
            draw.text((lx + 20, yy), _fit(draw, label, font, self.legend_w - 24), fill=TEXT,
                      font=font)
        if len(labels) > len(shown):
            draw.text((lx + 20, ly + len(shown) * 14), f"+{len(labels) - len(shown)} more",
                      fill=TEXT, font=font)
