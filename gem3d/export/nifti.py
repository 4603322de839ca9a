"""NIfTI writing in the source geometry, atomically (:func:`gem3d.files.atomic_path`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from gem3d.data.geometry import Geometry
from gem3d.files import atomic_path

__all__ = ["NIFTI_SUFFIXES", "save_nifti"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _default_dtype(arr: np.ndarray) -> np.dtype:  # see save_nifti
    if arr.dtype == np.bool_:
        return np.dtype(np.uint8)
    if arr.dtype in (np.float64, np.float16):
        return np.dtype(np.float32)
    if arr.dtype in (np.int64, np.uint64):
        lo, hi = int(arr.min()), int(arr.max())
        for candidate in (np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                return np.dtype(candidate)
        raise ValueError(f"int64 values in [{lo}, {hi}] do not fit int32; pass dtype explicitly")
    return arr.dtype


def save_nifti(arr_source: np.ndarray, geometry_or_affine: Geometry | np.ndarray, path: str | os.PathLike,
               dtype: Any = None) -> Path:
    """Write ``arr_source`` (in the *source* orientation, e.g. ``geometry.to_source(vol_dhw)``) atomically as ``.nii``
    or ``.nii.gz`` with the affine of ``geometry_or_affine`` (a ``Geometry`` of the array's shape, or a (4,4) affine)
    in sform and qform (codes 1). ``dtype``: stored type, no scaling; default the array's, except bool -> uint8,
    float64 -> float32, int64 -> the smallest of int16/int32 that holds the values."""
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"NIfTI path must end with one of {NIFTI_SUFFIXES}, got {path.name!r}")
    arr = np.asarray(arr_source)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected a 3-D volume (or 4-D with channels last), got shape {arr.shape}")
    geometry = geometry_or_affine
    if not isinstance(geometry, Geometry):  # a plain affine, validated by Geometry
        geometry = Geometry(geometry_or_affine, arr.shape[:3])
    affine = geometry.affine
    if not np.array_equal(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
    if tuple(arr.shape[:3]) != geometry.shape:
        raise ValueError(f"array shape {tuple(arr.shape)} does not match the geometry's source shape {geometry.shape}; "
                         "pass the array in source orientation (geometry.to_source(volume_dhw))")
    out_dtype = np.dtype(dtype) if dtype is not None else _default_dtype(arr)
    if np.issubdtype(out_dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        rounded = np.rint(arr)
        info = np.iinfo(out_dtype)
        if arr.size and (rounded.min() < info.min or rounded.max() > info.max):
            raise ValueError(f"values in [{rounded.min()}, {rounded.max()}] do not fit {out_dtype}")
        arr = rounded
    data = np.ascontiguousarray(arr).astype(out_dtype, copy=False)

    image = nib.Nifti1Image(data, affine)
    image.header.set_sform(affine, code=1)
    image.header.set_qform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm", t="sec")
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return path
