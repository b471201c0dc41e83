"""Image galleries (Pillow) and loss-curve plots (matplotlib).

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
    """Line plot of loss histories (x = iteration index), one coloured line per label, drawn
    with matplotlib (axes with ticks and a grid).

    The y axis is log10 when every finite value is positive, linear otherwise; NaN/inf
    points are skipped (the line breaks there; a lone point is a dot). The legend on the
    right lists up to :data:`MAX_LEGEND` lines, ending in "+N more" when there are more
    curves (all curves are still drawn, colours cycle).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    width, height = int(size[0]), int(size[1])
    if width < 200 or height < 120:
        raise ConfigError(f"loss plot size {size} is too small", "use at least (200, 120)")
    series = _loss_series(curves)
    finite = np.concatenate([v[np.isfinite(v)] for _, v in series])
    log_y = finite.size > 0 and bool(np.all(finite > 0))
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles = []
    for k, (label, v) in enumerate(series):
        colour = tuple(c / 255 for c in PALETTE[k % len(PALETTE)])
        y = np.where(np.isfinite(v), v, np.nan)
        lone = np.isfinite(y) & ~np.isfinite(np.r_[np.nan, y[:-1]]) \
            & ~np.isfinite(np.r_[y[1:], np.nan])
        (line,) = ax.plot(np.arange(len(y)), y, color=colour, lw=1.5, label=label)
        if lone.any():
            ax.plot(np.flatnonzero(lone), y[lone], "o", color=colour, ms=3)
        handles.append(line)
    if log_y:
        ax.set_yscale("log")
    if finite.size == 0:
        ax.text(0.05, 0.9, "no finite values", transform=ax.transAxes, color="#a00000")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (log scale)" if log_y else "loss")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.tick_params(labelsize=8)
    if len(handles) > MAX_LEGEND:
        more = len(handles) - (MAX_LEGEND - 1)
        handles = [*handles[: MAX_LEGEND - 1], Line2D([], [], color="none", label=f"+{more} more")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              frameon=False)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3])).resize((width, height))


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
