"""PNG previews (matplotlib): a row of axial / coronal / sagittal panels (physical aspect ratio, D drawn vertically,
superior up) under a title strip per canonical ``(D, H, W)`` volume, the mask as contours and as a row."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from gem3d.files import atomic_path

__all__ = ["save_preview", "preview_size", "LABEL_COLOURS", "TITLE_HEIGHT", "VIEWS"]

TITLE_HEIGHT = 14
DPI = 100
WINDOW_PERCENTILES = (0.5, 99.5)  # each volume's display window
# (name, fixed axis): axial fixes D; with canonical (S, R, A) layout, axis 2 fixed = coronal, axis 1 fixed = sagittal
VIEWS: tuple[tuple[str, int], ...] = (("axial", 0), ("coronal", 2), ("sagittal", 1))
LABEL_COLOURS: tuple[tuple[int, int, int], ...] = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25),
                                                   (240, 50, 230), (70, 240, 240), (245, 130, 48), (145, 30, 180))
_COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple")  # of LABEL_COLOURS
_PALETTE = np.asarray(LABEL_COLOURS, np.uint8)
_OUTSIDE_BODY = (40, 40, 40)
_TICK = "#ffc800"
_TICK_LENGTH = 0.06  # of the image's width


def preview_size(num_volumes: int, with_mask: bool, panel_size: int = 160,
                 with_informed: bool = False) -> tuple[int, int]:
    """``(width, height)`` in pixels of a preview with ``num_volumes`` rows (+ the informed and mask rows)."""
    rows = num_volumes + int(with_mask) + int(with_informed)
    return 3 * panel_size, TITLE_HEIGHT + rows * (TITLE_HEIGHT + panel_size)


def _window(array: np.ndarray) -> tuple[float, float]:
    """``(low, high)`` display window: ``WINDOW_PERCENTILES`` of the finite values (NaN is drawn black)."""
    finite = array[np.isfinite(array)]
    low, high = (float(v) for v in np.percentile(finite, WINDOW_PERCENTILES)) if finite.size else (0.0, 1.0)
    return low, high if high > low else low + 1.0


def _centre_index(shape: Sequence[int], mask: np.ndarray | None) -> tuple[int, int, int]:
    if mask is not None and np.any(mask > 0):
        return tuple(int(round(c)) for c in ndimage.center_of_mass(mask > 0))  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def view_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2-D slice to draw with ``origin="lower"``: axial ``(W, H)`` (anterior up), else ``(D, other)`` (superior up)."""
    plane = np.take(volume, index, axis=axis)
    return plane.T if axis == 0 else plane


def _aspect(spacing: Sequence[float], axis: int) -> float:
    """Height / width of a pixel of ``view_slice``."""
    d, h, w = spacing
    if axis == 0:
        return w / h
    return d / (w if axis == 1 else h)


def _label_rgb(labels: np.ndarray) -> np.ndarray:
    """Label k > 0 gets colour k - 1 of ``LABEL_COLOURS`` (repeating after 8), < 0 (outside the body) dark grey."""
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[labels < 0] = _OUTSIDE_BODY
    rgb[labels > 0] = _PALETTE[(labels[labels > 0] - 1) % len(_PALETTE)]
    return rgb


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
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="black")

    def caption(left: int, top: int, text: str, colour: str = "white") -> None:
        figure.text(left / width, 1 - top / height, text, color=colour, fontsize=7, va="top")

    def panel(column: int, top: int):
        axes = figure.add_axes((column * panel_size / width, 1 - (top + panel_size) / height,
                                panel_size / width, panel_size / height))
        axes.set_axis_off()
        return axes

    for column, (name, axis) in enumerate(VIEWS):
        caption(column * panel_size + 3, 1, f"{name} {'DHW'[axis]}={centre[axis]}")
    top = TITLE_HEIGHT
    for title, array in arrays:
        low, high = _window(array)
        caption(3, top + 1, f"{title}  [{low:.3g}, {high:.3g}]")
        top += TITLE_HEIGHT
        for column, (_, axis) in enumerate(VIEWS):
            axes = panel(column, top)
            axes.imshow(view_slice(array, axis, centre[axis]), cmap="gray", vmin=low, vmax=high, origin="lower",
                        aspect=_aspect(spacing, axis), interpolation="bilinear")
            if label is not None and title in contour_titles:
                labels = view_slice(label, axis, centre[axis])
                values, voxels = np.unique(labels[labels > 0], return_counts=True)
                for value in values[np.argsort(-voxels, kind="stable")]:  # the smallest drawn last, on top
                    colour = _PALETTE[(value - 1) % len(_PALETTE)] / 255
                    axes.contour(labels == value, levels=[0.5], colors=[colour], linewidths=1, antialiased=False)
            if informed_index is not None and axis != 0:
                axes.axhline(informed_index, 0, _TICK_LENGTH, color=_TICK, linewidth=1, antialiased=False)
                axes.axhline(informed_index, 1 - _TICK_LENGTH, 1, color=_TICK, linewidth=1, antialiased=False)
        top += panel_size
    if informed is not None:
        low, high = _window(informed)
        caption(3, top + 1, f"{informed_title}  [{low:.3g}, {high:.3g}]", _TICK)
        top += TITLE_HEIGHT
        # the volume's axial extent: the informed slice may be resampled
        extent = (-0.5, shape[1] - 0.5, -0.5, shape[2] - 0.5)
        panel(0, top).imshow(informed.T, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent,
                             aspect=_aspect(spacing, 0), interpolation="bilinear")
        top += panel_size
    if label is not None:
        present = sorted(int(v) for v in np.unique(label) if v > 0)
        legend_values = list(range(1, max_label + 1)) if max_label is not None else present
        legend = ", ".join(f"{v} {_COLOUR_NAMES[(v - 1) % len(_COLOUR_NAMES)]}" for v in legend_values)
        caption(3, top + 1, f"mask ({legend})" if legend else "mask (empty)")
        top += TITLE_HEIGHT
        for column, (_, axis) in enumerate(VIEWS):
            panel(column, top).imshow(_label_rgb(view_slice(label, axis, centre[axis])), origin="lower",
                                      aspect=_aspect(spacing, axis), interpolation="nearest")

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
