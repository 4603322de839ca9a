"""Voxel geometry: reorientation to the canonical `(D, H, W)` layout and back onto the exact source grid.

Canonical = the closest RAS orientation of the source array (nibabel.orientations) with `slice_axis` (0 = sagittal,
1 = coronal, 2 = axial) moved to the front. `to_source` is its exact inverse (axis permutation and flips only)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

SLICE_AXES = (0, 1, 2)


@dataclass(eq=False)
class Geometry:
    """affine: (4, 4) float64 voxel -> world (mm, RAS+) of the source file; shape: source array shape (3 ints);
    slice_axis: the RAS axis that becomes the first (slice) axis of the canonical array."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    slice_axis: int = 2
    _to_canonical: np.ndarray = field(init=False, repr=False, compare=False)
    _to_source: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise ValueError(f"affine must be a finite (4, 4) matrix, got shape {self.affine.shape}: {self.affine}")
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive ints, got {self.shape}")
        if self.slice_axis not in SLICE_AXES:
            raise ValueError(f"slice_axis must be one of {SLICE_AXES} (RAS axes; 2 = axial), got {self.slice_axis!r}")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise ValueError(f"affine is singular: {self.affine.tolist()}")
        # canonical axis k runs along +RAS axis order[k]
        order = [self.slice_axis, *(a for a in SLICE_AXES if a != self.slice_axis)]
        canonical = np.column_stack([order, np.ones(3)])
        self._to_canonical = nio.ornt_transform(nio.io_orientation(self.affine), canonical)
        self._to_source = nio.ornt_transform(canonical, nio.io_orientation(self.affine))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    @property
    def _source_axes(self) -> np.ndarray:
        """The source axis behind each canonical (D, H, W) axis."""
        return np.argsort(self._to_canonical[:, 0])

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """(D, H, W) shape of `to_canonical(array)`."""
        return tuple(self.shape[a] for a in self._source_axes)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical (D, H, W) axes."""
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine)[self._source_axes])

    def to_canonical(self, arr: np.ndarray) -> np.ndarray:
        """Source-grid array (shape == self.shape) -> canonical (D, H, W) array (a contiguous copy)."""
        arr = np.asarray(arr)
        if tuple(arr.shape) != self.shape:
            raise ValueError(f"array shape {tuple(arr.shape)} does not match the geometry's source shape {self.shape}")
        return np.ascontiguousarray(nio.apply_orientation(arr, self._to_canonical))

    def to_source(self, arr_dhw: np.ndarray) -> np.ndarray:
        """Canonical (D, H, W) array -> source-grid array (exact inverse of `to_canonical`)."""
        arr_dhw = np.asarray(arr_dhw)
        if tuple(arr_dhw.shape) != self.canonical_shape:
            raise ValueError(f"canonical array shape {tuple(arr_dhw.shape)} does not match the geometry's canonical "
                             f"shape {self.canonical_shape} (source shape {self.shape}, slice_axis {self.slice_axis})")
        return np.ascontiguousarray(nio.apply_orientation(arr_dhw, self._to_source))

    def to_dict(self) -> dict:
        return {"affine": self.affine.tolist(), "shape": list(self.shape), "slice_axis": int(self.slice_axis)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        missing = {"affine", "shape"} - set(d)
        if missing:
            raise KeyError(f"geometry dict lacks {sorted(missing)}; has {sorted(d)}")
        return cls(d["affine"], d["shape"], int(d.get("slice_axis", 2)))


def load_nifti(
    path: str | Path, channel: int | None = None, dtype=np.float32, slice_axis: int = 2
) -> tuple[np.ndarray, Geometry]:
    """Read a NIfTI file -> (source-grid array (X, Y, Z) as `dtype`, its Geometry). A 4-D file needs one channel,
    or `channel` picking one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise ValueError(f"cannot read {path} as NIfTI: {exc}") from exc
    shape = tuple(img.shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"{path} must hold 3-D data (or 4-D with channels), got shape {shape} ({len(shape)}-D)")
    n = shape[3] if len(shape) == 4 else 1
    if channel is None and n != 1:
        raise ValueError(f"{path} is 4-D with {n} channels (shape {shape}); pass channel in [0, {n - 1}]")
    channel = channel or 0
    if not 0 <= channel < n:
        raise ValueError(f"channel {channel} out of range for {path} (shape {shape}, allowed 0..{n - 1})")
    try:
        data = np.asarray(img.dataobj[(..., channel) if len(shape) == 4 else ...], dtype=dtype)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise ValueError(f"cannot read {path}: truncated or corrupt file ({exc}); write it again") from exc
    return data, Geometry(affine=np.asarray(img.affine, dtype=np.float64), shape=data.shape, slice_axis=slice_axis)
