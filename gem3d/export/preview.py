"""PNG previews: a row of axial / coronal / sagittal panels (square cells keeping the physical aspect ratio; D drawn
vertically, superior up) under a title strip per canonical ``(D, H, W)`` volume, the mask as contours and as a row."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from gem3d.files import atomic_path

__all__ = ["save_preview", "preview_size", "LABEL_COLOURS", "TITLE_HEIGHT", "VIEWS"]

TITLE_HEIGHT = 14
WINDOW_PERCENTILES = (0.5, 99.5)  # each volume's display window
# (name, fixed axis): axial fixes D; with canonical (S, R, A) layout, axis 2 fixed = coronal, axis 1 fixed = sagittal
VIEWS: tuple[tuple[str, int], ...] = (("axial", 0), ("coronal", 2), ("sagittal", 1))
LABEL_COLOURS: tuple[tuple[int, int, int], ...] = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25),
                                                   (240, 50, 230), (70, 240, 240), (245, 130, 48), (145, 30, 180))
_COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple")  # of LABEL_COLOURS
_OUTSIDE_BODY = (40, 40, 40)
_TICK = (255, 200, 0)
_TICK_LENGTH = 6


def preview_size(num_volumes: int, with_mask: bool, panel_size: int = 160, with_informed: bool = False) -> tuple[int, int]:
    """``(width, height)`` in pixels of a preview with ``num_volumes`` rows (+ the informed and mask rows)."""
    rows = num_volumes + int(with_mask) + int(with_informed)
    return 3 * panel_size, TITLE_HEIGHT + rows * (TITLE_HEIGHT + panel_size)


def _windowed(array: np.ndarray) -> tuple[np.ndarray, str]:
    """``array`` mapped to [0, 255] by its display window (``WINDOW_PERCENTILES`` of the finite values; NaN -> low),
    and the window as a caption."""
    finite = array[np.isfinite(array)]
    low, high = (float(v) for v in np.percentile(finite, WINDOW_PERCENTILES)) if finite.size else (0.0, 1.0)
    high = high if high > low else low + 1.0
    return (np.nan_to_num(array, nan=low) - low) / (high - low) * 255.0, f"[{low:.3g}, {high:.3g}]"


def _centre_index(shape: Sequence[int], mask: np.ndarray | None) -> tuple[int, int, int]:
    if mask is not None and np.any(mask > 0):
        return tuple(int(round(c)) for c in ndimage.center_of_mass(mask > 0))  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def _view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2-D slice for display: rows top -> bottom, columns left -> right."""
    plane = np.take(volume, index, axis=axis)
    if axis == 0:  # (H, W): W vertical (anterior up), H horizontal
        return plane.T[::-1]
    return plane[::-1]  # (D, other): D vertical, superior up


def _view_spacing(spacing: Sequence[float], axis: int) -> tuple[float, float]:
    """(row, column) pixel size in mm for ``_view``."""
    d, h, w = (float(s) for s in spacing)
    if axis == 0:
        return w, h
    return d, (w if axis == 1 else h)


def _fit(rows: int, cols: int, row_mm: float, col_mm: float, panel: int) -> tuple[int, int]:
    """Display ``(height, width)`` of a ``rows x cols`` image with the given pixel sizes inside ``panel``."""
    height_mm, width_mm = rows * row_mm, cols * col_mm
    k = panel / max(height_mm, width_mm)
    return max(1, min(panel, round(height_mm * k))), max(1, min(panel, round(width_mm * k)))


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Bool: pixels with a label > 0 that touch a different label (4-neighbourhood, edges repeated)."""
    cross = ndimage.generate_binary_structure(2, 1)
    low = ndimage.minimum_filter(labels, footprint=cross, mode="nearest")
    high = ndimage.maximum_filter(labels, footprint=cross, mode="nearest")
    return ((low != labels) | (high != labels)) & (labels > 0)


def _panel(grey: np.ndarray | None, labels: np.ndarray | None, row_mm: float, col_mm: float, panel: int,
           contours: bool, filled: bool) -> Image.Image:
    """One ``panel x panel`` RGB cell: grey image (already in [0, 255]) and/or labels, centred."""
    ref = grey if grey is not None else labels
    height, width = _fit(ref.shape[0], ref.shape[1], row_mm, col_mm, panel)
    if grey is not None:
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
        rgb = np.repeat(np.asarray(image)[..., None], 3, axis=-1).copy()
    else:
        rgb = np.zeros((height, width, 3), dtype=np.uint8)
    if labels is not None:
        lab_img = Image.fromarray(np.ascontiguousarray(labels, dtype=np.int32)).resize((width, height), Image.NEAREST)
        lab = np.asarray(lab_img).astype(np.int64)
        palette = np.asarray(LABEL_COLOURS, np.uint8)  # label k > 0 gets colour k - 1, repeating after 8
        if filled:
            rgb[lab < 0] = _OUTSIDE_BODY
            rgb[lab > 0] = palette[(lab[lab > 0] - 1) % len(palette)]
        if contours:
            edge = _boundary(lab)
            rgb[edge] = palette[(lab[edge] - 1) % len(palette)]
    cell = Image.new("RGB", (panel, panel), (0, 0, 0))
    cell.paste(Image.fromarray(rgb), ((panel - width) // 2, (panel - height) // 2))
    return cell


def save_preview(path: str | os.PathLike, volumes: Sequence[tuple[str, np.ndarray]], mask: np.ndarray | None = None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), max_label: int | None = None, *, panel_size: int = 160,
                 contours: bool | Sequence[str] = True, informed: np.ndarray | None = None,
                 informed_title: str = "informed slice", informed_index: int | None = None) -> Path:
    """Write a PNG preview atomically and return its path.

    - ``volumes``: ``[(title, (D, H, W) array), ...]`` of one shape, each shown in its own
      intensity window (``WINDOW_PERCENTILES``).
    - ``mask``: ``(D, H, W)`` labels (-1 outside the body allowed), drawn as a filled last row and, with ``contours``,
      as outlines on the volumes (``True``: all, or a list of titles); ``max_label``: the legend lists 1..max_label.
    - The views go through the centre of mass of ``mask > 0`` (or the volume's centre).
    - ``informed``: the informed slice ``(H', W')`` (axial, any size), in a row of its own under ``informed_title``;
      ``informed_index``: the slice it stands for, marked by ticks on the coronal and sagittal panels.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"preview path must end with .png, got {path.name!r}")
    if not volumes and mask is None:
        raise ValueError("save_preview needs at least one volume or a mask")
    if panel_size < 16:
        raise ValueError(f"panel_size must be >= 16 pixels, got {panel_size}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (mm along D, H, W), got {spacing}")
    arrays: list[tuple[str, np.ndarray]] = []
    for item in volumes:
        if len(item) != 2:
            raise ValueError(f"each volume must be a (title, array) pair, got {item!r:.80}")
        title, array = item
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 3:
            raise ValueError(f"volume {title!r} must be (D, H, W), got shape {array.shape}")
        if arrays and array.shape != arrays[0][1].shape:
            raise ValueError(f"volume {title!r} has shape {array.shape}, "
                             f"expected {arrays[0][1].shape} like the first volume")
        arrays.append((str(title), array))
    shape = arrays[0][1].shape if arrays else np.asarray(mask).shape
    label = None
    if mask is not None:
        label = np.asarray(mask)
        if label.shape != tuple(shape):
            raise ValueError(f"mask shape {label.shape} does not match volume shape {tuple(shape)}")
        label = np.rint(label).astype(np.int64)
        if max_label is not None and label.size and label.max() > max_label:
            raise ValueError(f"mask holds label {label.max()} above max_label={max_label}")
    centre = _centre_index(shape, label)
    if informed is not None:
        informed = np.asarray(informed, dtype=np.float32)
        if informed.ndim != 2:
            raise ValueError(f"informed must be one slice (H, W), got shape {informed.shape}")
    if informed_index is not None and not 0 <= int(informed_index) < shape[0]:
        raise ValueError(f"informed_index {informed_index} is outside the {shape[0]} slices")
    titles = [t for t, _ in arrays]
    contour_titles = set(titles) if contours is True else set(contours or ())
    unknown = sorted(contour_titles - set(titles))
    if unknown:
        raise ValueError(f"contours names unknown volume titles {unknown}; titles: {titles}")

    width, height = preview_size(len(arrays), label is not None, panel_size, with_informed=informed is not None)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for column, (name, axis) in enumerate(VIEWS):
        draw.text((column * panel_size + 3, 1), f"{name} {'DHW'[axis]}={centre[axis]}", fill=(255, 255, 255), font=font)

    top = TITLE_HEIGHT
    rows = [(title, array, label is not None and title in contour_titles, False) for title, array in arrays]
    if label is not None:
        present = sorted(int(v) for v in np.unique(label) if v > 0)
        legend_values = list(range(1, max_label + 1)) if max_label is not None else present
        legend = ", ".join(f"{v} {_COLOUR_NAMES[(v - 1) % len(_COLOUR_NAMES)]}" for v in legend_values)
        rows.append((f"mask ({legend})" if legend else "mask (empty)", None, False, True))

    for title, array, with_contours, filled in rows:
        caption = title
        if array is not None:
            grey_volume, window = _windowed(array)
            caption = f"{title}  {window}"
        draw.text((3, top + 1), caption, fill=(255, 255, 255), font=font)
        top += TITLE_HEIGHT
        for column, (_, axis) in enumerate(VIEWS):
            row_mm, col_mm = _view_spacing(spacing, axis)
            grey = _view(grey_volume, axis, centre[axis]) if array is not None else None
            labels = _view(label, axis, centre[axis]) if (label is not None and (with_contours or filled)) else None
            cell = _panel(grey, labels, row_mm, col_mm, panel_size, contours=with_contours, filled=filled)
            if informed_index is not None and axis != 0 and array is not None:
                _mark_slice(cell, shape[0], int(informed_index), _fit(shape[0], shape[3 - axis], row_mm, col_mm, panel_size)[0])
            canvas.paste(cell, (column * panel_size, top))
        top += panel_size
        if informed is not None and array is not None and title == arrays[-1][0]:
            top = _informed_row(canvas, draw, font, informed, informed_title, shape, spacing, panel_size, top)

    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def _mark_slice(cell: Image.Image, num_slices: int, index: int, height: int) -> None:
    """Ticks at both sides of a coronal/sagittal cell (slices drawn superior up) at slice ``index``."""
    panel = cell.size[1]
    y = (panel - height) // 2 + int((num_slices - 1 - index + 0.5) * height / num_slices)
    draw = ImageDraw.Draw(cell)
    draw.line([(0, y), (_TICK_LENGTH - 1, y)], fill=_TICK)
    draw.line([(panel - _TICK_LENGTH, y), (panel - 1, y)], fill=_TICK)


def _informed_row(canvas, draw, font, informed: np.ndarray, title: str, shape: Sequence[int], spacing: Sequence[float],
                  panel_size: int, top: int) -> int:
    """The informed slice in the axial column, with its physical extent taken from the volume's axial view."""
    grey, window = _windowed(informed)
    draw.text((3, top + 1), f"{title}  {window}", fill=_TICK, font=font)
    top += TITLE_HEIGHT
    grey = _view(grey[None], 0, 0)
    row_mm, col_mm = _view_spacing(spacing, 0)  # per volume pixel; the informed slice may be resampled
    rows_mm, cols_mm = row_mm * shape[2] / grey.shape[0], col_mm * shape[1] / grey.shape[1]
    canvas.paste(_panel(grey, None, rows_mm, cols_mm, panel_size, contours=False, filled=False), (0, top))
    return top + panel_size
