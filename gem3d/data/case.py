"""One image/label pair in canonical orientation, with the geometry to write results back onto the source grid."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .geometry import Geometry, load_nifti

AFFINE_ATOL_MM = 1e-3  # two affines whose entries differ by more (mm) are two grids


@dataclass
class Case:
    """name; image (D, H, W) float32 canonical raw intensities; label (D, H, W) int16 or None
    (may hold -1 = outside the body, e.g. from nnU-Net preprocessed data); geometry of the source file."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    image_path: Path | None = None
    label_path: Path | None = None

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


def labels_as_int16(label: np.ndarray, where: str = "label") -> np.ndarray:
    """Float/int label array -> int16, refusing non-integer or out-of-range values."""
    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)):
            raise ValueError(f"{where}: label holds non-finite values")
        rounded = np.rint(label)
        bad = np.abs(label - rounded) > 1e-3
        if bad.any():
            raise ValueError(f"{where}: label holds non-integer values, e.g. {label[bad][:5].tolist()}")
        label = rounded
    if label.size and (label.min() < -1 or label.max() > np.iinfo(np.int16).max):
        raise ValueError(f"{where}: label values must lie in [-1, 32767], got range [{label.min()}, {label.max()}]")
    return label.astype(np.int16)


def load_case(
    image_path: str | Path,
    label_path: str | Path | None = None,
    name: str | None = None,
    slice_axis: int = 2,
    channel: int | None = None,
) -> Case:
    """Read an image (and optional label) NIfTI into a canonical `Case`; checks that both share one grid."""
    image_path = Path(image_path)
    image, geometry = load_nifti(image_path, channel=channel, dtype=np.float32, slice_axis=slice_axis)
    if not np.all(np.isfinite(image)):
        n_nan, n_inf = int(np.isnan(image).sum()), int(np.isinf(image).sum())
        raise ValueError(f"{image_path}: image holds {n_nan} NaN and {n_inf} Inf voxels (non-finite); expected finite "
                         f"intensities: replace them (e.g. by the background value) first")
    label = None
    if label_path is not None:
        label_path = Path(label_path)
        label_raw, label_geometry = load_nifti(label_path, dtype=np.float64, slice_axis=slice_axis)
        what = f"image {image_path.name} and label {label_path.name}"
        if geometry.shape != label_geometry.shape:
            raise ValueError(f"{what} shapes differ: {geometry.shape} vs {label_geometry.shape}")
        diff = float(np.abs(geometry.affine - label_geometry.affine).max())
        if diff > AFFINE_ATOL_MM:
            a, b = (np.round(g.affine[:3], 4).tolist() for g in (geometry, label_geometry))
            raise ValueError(f"{what} affines differ (max |diff| {diff:.4g} mm > {AFFINE_ATOL_MM} mm): {a} vs {b}; "
                             "resample the label onto the image grid")
        label = geometry.to_canonical(labels_as_int16(label_raw, where=str(label_path)))
    if name is None:
        name = image_path.name.split(".")[0].removesuffix("_0000")
    return Case(name, geometry.to_canonical(image), label, geometry, image_path, label_path)
