"""3D consistency: how smoothly a canonical ``(D, H, W)`` volume changes from one slice to the next (what stage 2
exists for). Plain differences along the slice axis, inside an optional bool mask; no library has these."""
from __future__ import annotations

import math

import numpy as np


def _volume_and_mask(volume, mask) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` as float64 ``(D >= 2, H, W)`` and ``mask`` as bool of its shape (everywhere if None)."""
    v = np.asarray(volume, dtype=np.float64)
    if v.ndim != 3 or v.shape[0] < 2:
        raise ValueError(f"volume must be (D >= 2, H, W), got shape {v.shape}")
    m = np.ones(v.shape, bool) if mask is None else np.asarray(mask, bool)
    if m.shape != v.shape:
        raise ValueError(f"mask shape {m.shape} differs from the volume's {v.shape}")
    return v, m


def _slice_means(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``values`` inside ``mask`` per slice (first axis); NaN for slices without mask voxels."""
    count = mask.sum(axis=(1, 2))
    return np.where(count > 0, np.where(mask, values, 0.0).sum(axis=(1, 2)) / np.maximum(count, 1), np.nan)


def slice_jumps(volume, mask=None) -> np.ndarray:
    """``(D-1,)`` mean ``|v[d+1] - v[d]|`` over the pixels inside ``mask`` in both slices (NaN where none)."""
    v, m = _volume_and_mask(volume, mask)
    return _slice_means(np.abs(v[1:] - v[:-1]), m[1:] & m[:-1])


def through_plane_gradient(volume, mask=None) -> tuple[float, float]:
    """``(mean |dv/dd|, mean |dv/dd| / mean in-plane |grad v|)`` inside ``mask`` (numpy.gradient, voxel units). An
    isotropic texture gives a ratio near 1; slice-wise stripes raise it."""
    v, m = _volume_and_mask(volume, mask)
    gd, gh, gw = np.gradient(v)
    through = float(np.abs(gd)[m].mean())
    in_plane = float(np.hypot(gh, gw)[m].mean())
    return through, (through / in_plane if in_plane > 0 else math.inf)


def intensity_profile(volume, mask=None) -> np.ndarray:
    """``(D,)`` mean intensity of each slice inside ``mask`` (NaN for slices without mask voxels)."""
    return _slice_means(*_volume_and_mask(volume, mask))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (1.0 if a == b else math.inf)


def consistency_metrics(synthetic, real, body=None) -> dict[str, float]:
    """Slice-jump and gradient statistics of ``synthetic`` inside ``body``, and their ratios to ``real``'s (both
    ``(D, H, W)`` on one intensity scale; ratio 1 = as smooth as the real volume)."""
    jumps, real_jumps = slice_jumps(synthetic, body), slice_jumps(real, body)
    grad, aniso = through_plane_gradient(synthetic, body)
    real_grad, _ = through_plane_gradient(real, body)
    mean_jump, real_mean = float(np.nanmean(jumps)), float(np.nanmean(real_jumps))
    return {
        "slice_jump": mean_jump,
        "slice_jump_p95": float(np.nanpercentile(jumps, 95)),
        "slice_jump_ratio": _ratio(mean_jump, real_mean),
        "through_plane_grad": grad,
        "through_plane_ratio": aniso,
        "through_plane_grad_ratio": _ratio(grad, real_grad),
    }
