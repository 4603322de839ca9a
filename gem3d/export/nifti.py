"""NIfTI writing in the source geometry, and atomic file writes.

Every write goes to a temporary file in the destination folder and is then moved into place
with ``os.replace``: a reader never sees a partial file, and a failed write leaves no trace
(the previous file, if any, stays as it was).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

__all__ = [
    "NIFTI_SUFFIXES",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "save_nifti",
    "save_canonical_nifti",
    "resolve_affine",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _suffix_of(path: Path) -> str:
    """The file ending that decides the format (``.nii.gz`` counts as one ending)."""
    name = path.name
    for suffix in (".nii.gz", ".tar.gz", ".json.gz"):
        if name.endswith(suffix):
            return suffix
    return path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The temporary file keeps ``path``'s ending (so libraries that pick a format from the name,
    e.g. nibabel for ``.nii.gz``, behave the same). On any exception the temporary file is removed
    and ``path`` is left untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + _suffix_of(path), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # flush the bytes to disk before the rename makes them visible
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(data))
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically. Returns the path."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (numpy scalars/arrays and Paths allowed)."""
    text = json.dumps(obj, indent=indent, default=_json_default, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def resolve_affine(geometry_or_affine: Any) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """``(affine (4,4) float64, expected source shape or None)`` from a Geometry or an affine array.

    Anything with ``.affine`` and ``.shape`` attributes counts as a geometry (``gem3d.data.geometry.Geometry``).
    """
    if hasattr(geometry_or_affine, "affine"):
        affine = np.asarray(geometry_or_affine.affine, dtype=np.float64)
        shape = getattr(geometry_or_affine, "shape", None)
        shape = tuple(int(s) for s in shape) if shape is not None else None
    else:
        affine = np.asarray(geometry_or_affine, dtype=np.float64)
        shape = None
    if affine.shape != (4, 4):
        raise ValueError(f"affine must have shape (4, 4), got {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be finite, got\n{affine}")
    if not np.array_equal(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine is singular (zero voxel size?):\n{affine}")
    return affine, shape


def _default_dtype(arr: np.ndarray) -> np.dtype:
    """A NIfTI-friendly dtype: bool -> uint8, float64 -> float32, int64 -> int32/int16 when it fits."""
    if arr.dtype == np.bool_:
        return np.dtype(np.uint8)
    if arr.dtype == np.float64 or arr.dtype == np.float16:
        return np.dtype(np.float32)
    if arr.dtype in (np.int64, np.uint64):
        if arr.size == 0:
            return np.dtype(np.int16)
        lo, hi = int(arr.min()), int(arr.max())
        for candidate in (np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                return np.dtype(candidate)
        raise ValueError(f"int64 values in [{lo}, {hi}] do not fit int32; pass dtype explicitly")
    return arr.dtype


def save_nifti(
    arr_source: np.ndarray,
    geometry_or_affine: Any,
    path: str | os.PathLike,
    dtype: Any = None,
) -> Path:
    """Write ``arr_source`` (array in the *source* orientation, e.g. ``geometry.to_source(vol_dhw)``)
    as ``.nii`` or ``.nii.gz`` with the geometry's affine in both sform and qform (codes 1, scanner),
    atomically. Returns the path.

    - ``geometry_or_affine``: a ``Geometry`` (its ``shape`` must equal ``arr_source.shape``) or a (4,4) affine.
    - ``dtype``: stored data type (no scaling); default keeps the array's dtype, except
      bool -> uint8, float64 -> float32, int64 -> the smallest of int16/int32 that holds the values.
    """
    path = Path(path)
    if not any(path.name.endswith(s) for s in NIFTI_SUFFIXES):
        raise ValueError(f"NIfTI path must end with one of {NIFTI_SUFFIXES}, got {path.name!r}")
    arr = np.asarray(arr_source)
    affine, expected_shape = resolve_affine(geometry_or_affine)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected a 3-D volume (or 4-D with channels last), got shape {arr.shape}")
    if expected_shape is not None and tuple(arr.shape[:3]) != tuple(expected_shape[:3]):
        raise ValueError(
            f"array shape {tuple(arr.shape)} does not match the geometry's source shape {tuple(expected_shape)}; "
            f"pass the array in source orientation (geometry.to_source(volume_dhw)) or use save_canonical_nifti"
        )
    out_dtype = np.dtype(dtype) if dtype is not None else _default_dtype(arr)
    if np.issubdtype(out_dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        rounded = np.rint(arr)
        info = np.iinfo(out_dtype)
        if arr.size and (rounded.min() < info.min or rounded.max() > info.max):
            raise ValueError(f"values in [{rounded.min()}, {rounded.max()}] do not fit {out_dtype}")
        arr = rounded
    data = np.ascontiguousarray(arr).astype(out_dtype, copy=False)

    header = nib.Nifti1Header()
    header.set_data_dtype(out_dtype)
    image = nib.Nifti1Image(data, affine, header=header)
    image.header.set_sform(affine, code=1)
    image.header.set_qform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm", t="sec")
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return path


def save_canonical_nifti(
    arr_dhw: np.ndarray,
    geometry: Any,
    path: str | os.PathLike,
    dtype: Any = None,
) -> Path:
    """Write a canonical ``(D,H,W)`` volume in its source geometry: ``save_nifti(geometry.to_source(arr), geometry, path)``."""
    if not hasattr(geometry, "to_source"):
        raise TypeError(f"save_canonical_nifti needs a Geometry (with to_source), got {type(geometry).__name__}")
    return save_nifti(geometry.to_source(np.asarray(arr_dhw)), geometry, path, dtype=dtype)
