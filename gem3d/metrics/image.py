"""Image-quality metrics of a synthetic volume against its real counterpart (the ``test`` reconstruction setting).

Volumes are canonical ``(D, H, W)`` arrays (slice axis first: axial for the default ``slice_axis=2``; load them with
:func:`gem3d.metrics.volumes.load_canonical`, never in the source file's axis order). Intensities are compared on
one scale given by ``data_range`` (default: the reference's range); :func:`reconstruction_metrics` first maps both
volumes to [0, 1] with the real volume's min/max, so its PSNR is on the [0, 1] scale.

- :func:`psnr`: peak signal-to-noise ratio in dB (MONAI's formula ``20 log10(range) - 10 log10(mse)``), optionally
  inside a boolean ``mask``; ``inf`` for equal volumes.
- :func:`ssim`: SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03; MONAI's
  ``compute_ssim_and_cs``), 2D per axial slice (``mode="axial"``) or 3D (``mode="3d"``), the SSIM map averaged
  inside ``mask`` (valid-window map: the mask is cropped by the window's half width).
- :func:`ms_ssim`: multi-scale SSIM (MONAI ``compute_ms_ssim``); small volumes get fewer scales and a smaller window
  (:func:`ms_ssim_scales` says which), because each scale halves the image.
- :func:`reconstruction_metrics`: all of the above in 3D and per axial slice, inside the body and per label.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from einops import rearrange
from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default
SSIM_MODES = ("axial", "3d")


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x).to(torch.float64)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"volumes must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 3:
        raise ValueError(f"volumes must be (D, H, W), got shape {tuple(x.shape)}")


def _as_mask(mask, shape) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(m.shape)} differs from the volumes' {tuple(shape)}")
    if not m.any():
        raise ValueError("mask is empty")
    return m


def data_range_of(reference) -> float:
    """``max - min`` of ``reference`` (1 for a constant array)."""
    ref = _as_tensor(reference)
    value = float(ref.max() - ref.min())
    return value if value > 0 else 1.0


def psnr(prediction, reference, data_range: float | None = None, mask=None) -> float:
    """PSNR in dB of ``prediction`` against ``reference`` (both ``(D, H, W)``), over the voxels of ``mask`` (bool
    ``(D, H, W)``, default all); ``inf`` when they are equal there."""
    x, y = _as_tensor(prediction), _as_tensor(reference)
    _check_pair(x, y)
    data_range = data_range_of(y) if data_range is None else float(data_range)
    err = (x - y) ** 2
    if mask is not None:
        err = err[_as_mask(mask, x.shape)]
    mse = float(err.mean())
    return math.inf if mse == 0 else 20.0 * math.log10(data_range) - 10.0 * math.log10(mse)


def _odd_window(window: int, sizes) -> int:
    size = min(window, *sizes)
    return size - (1 - size % 2)  # odd, at most every size


def _crop_to_valid(mask: torch.Tensor, window: int, dims: int) -> torch.Tensor:
    """Crop the last ``dims`` axes of ``mask`` by the window's half width (the centres of valid windows)."""
    half = window // 2
    if half == 0:
        return mask
    index = [slice(None)] * (mask.ndim - dims) + [slice(half, s - half) for s in mask.shape[-dims:]]
    return mask[tuple(index)]


def ssim_map(prediction, reference, data_range: float | None = None, mode: str = "axial",
             window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> tuple[torch.Tensor, int]:
    """SSIM map and the window used: ``mode="axial"``: ``(D, H-w+1, W-w+1)`` (2D per slice); ``"3d"``:
    ``(D-w+1, H-w+1, W-w+1)``. The window shrinks (odd) to fit volumes smaller than ``window``."""
    if mode not in SSIM_MODES:
        raise ValueError(f"mode must be one of {SSIM_MODES}, got {mode!r}")
    x, y = _as_tensor(prediction), _as_tensor(reference)
    _check_pair(x, y)
    data_range = data_range_of(y) if data_range is None else float(data_range)
    if mode == "axial":
        size = _odd_window(window, x.shape[1:])
        x, y = rearrange(x, "d h w -> d 1 h w"), rearrange(y, "d h w -> d 1 h w")
        dims = 2
    else:
        size = _odd_window(window, x.shape)
        x, y = rearrange(x, "d h w -> 1 1 d h w"), rearrange(y, "d h w -> 1 1 d h w")
        dims = 3
    full, _ = compute_ssim_and_cs(x.double(), y.double(), spatial_dims=dims, kernel_size=[size] * dims,
                                  kernel_sigma=[sigma] * dims, data_range=data_range)
    return full.reshape(full.shape[-3:]) if mode == "3d" else full[:, 0], size


def ssim(prediction, reference, data_range: float | None = None, mask=None, mode: str = "axial",
         window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> float:
    """Mean SSIM of ``prediction`` against ``reference`` (``(D, H, W)``): per axial slice (``mode="axial"``, the
    mean over all slices' maps) or 3D; with ``mask`` (bool ``(D, H, W)``) only windows centred inside it count."""
    values, size = ssim_map(prediction, reference, data_range, mode, window, sigma)
    if mask is None:
        return float(values.mean())
    m = _crop_to_valid(_as_mask(mask, np.shape(prediction)), size, 2 if mode == "axial" else 3)
    if not m.any():
        raise ValueError(f"mask has no voxel at least {size // 2} voxels from the border (SSIM window {size})")
    return float(values[m].mean())


def ms_ssim_scales(shape, window: int = SSIM_WINDOW, max_scales: int = len(MS_SSIM_WEIGHTS)) -> tuple[int, int]:
    """``(scales, window)`` that MS-SSIM can use on images of spatial ``shape``: the largest window (``window``, then
    smaller odd ones down to 3) that allows at least 2 scales, with the most scales (<= ``max_scales``) whose
    coarsest image still holds it; a single scale (plain SSIM) only when nothing else fits. MONAI also asks for
    ``size // (scales - 1)**2 > window - 1``, enforced here too."""
    shape = tuple(int(s) for s in shape)

    def fits(scales: int, size: int) -> bool:
        return min(shape) // 2 ** (scales - 1) >= size and all(s // max(1, scales - 1) ** 2 > size - 1 for s in shape)

    for size in range(window if window % 2 else window - 1, 2, -2):
        for scales in range(max_scales, 1, -1):
            if fits(scales, size):
                return scales, size
    size = _odd_window(window, shape)
    if size >= 3:
        return 1, size
    raise ValueError(f"images of shape {shape} are too small for MS-SSIM (need at least 3 pixels per axis)")


def ms_ssim(prediction, reference, data_range: float | None = None, mode: str = "axial",
            window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> tuple[float, int, int]:
    """Multi-scale SSIM ``(value, scales, window)`` of ``(D, H, W)`` volumes, per axial slice (mean over slices) or
    3D. Uses the first ``scales`` of Wang et al.'s weights, renormalised to sum 1 (see :func:`ms_ssim_scales`)."""
    if mode not in SSIM_MODES:
        raise ValueError(f"mode must be one of {SSIM_MODES}, got {mode!r}")
    x, y = _as_tensor(prediction), _as_tensor(reference)
    _check_pair(x, y)
    data_range = data_range_of(y) if data_range is None else float(data_range)
    pattern, dims = ("d h w -> d 1 h w", 2) if mode == "axial" else ("d h w -> 1 1 d h w", 3)
    x, y = rearrange(x, pattern).float(), rearrange(y, pattern).float()
    scales, size = ms_ssim_scales(x.shape[2:], window)
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    value = compute_ms_ssim(x, y, spatial_dims=dims, data_range=data_range, kernel_size=size, kernel_sigma=sigma,
                            weights=tuple(float(w) for w in weights))
    return float(value.mean()), scales, size


def _slicewise_psnr(x: np.ndarray, y: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    """Mean over the axial slices that hold mask voxels of each slice's PSNR inside the mask (inf slices kept out
    unless every slice is exact)."""
    values = [psnr(x[d][None], y[d][None], data_range, mask[d][None]) for d in range(x.shape[0]) if mask[d].any()]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.inf


def to_unit_range(volume, reference) -> np.ndarray:
    """``volume`` mapped with the ``reference``'s min/max to the [0, 1] scale of the reference (not clipped)."""
    lo, hi = float(np.min(reference)), float(np.max(reference))
    return (np.asarray(volume, dtype=np.float64) - lo) / (hi - lo if hi > lo else 1.0)


def reconstruction_metrics(synthetic, real, body=None, labels=None,
                           label_names: Mapping[int, str] | None = None) -> dict[str, float]:
    """Reconstruction quality of a canonical ``(D, H, W)`` ``synthetic`` volume against the ``real`` one.

    Both are mapped to [0, 1] with the real volume's min/max. ``body``: bool ``(D, H, W)`` (default: everywhere);
    ``labels``: int ``(D, H, W)`` (per-label rows for every value > 0, named by ``label_names``). Returns
    ``psnr_body`` (3D, dB), ``psnr_axial_body`` (mean over axial slices), ``ssim_body`` (3D), ``ssim_axial_body``,
    ``ms_ssim`` (3D, whole volume), ``ms_ssim_axial``, ``ms_ssim_scales`` (scales used in 3D), and per label
    ``psnr_<name>``, ``ssim_axial_<name>``."""
    real01 = to_unit_range(real, real)
    fake01 = to_unit_range(synthetic, real)
    if fake01.shape != real01.shape:
        raise ValueError(f"synthetic volume {fake01.shape} and real volume {real01.shape} differ in shape")
    body = np.ones(real01.shape, bool) if body is None else np.asarray(body, bool)
    out = {
        "psnr_body": psnr(fake01, real01, 1.0, body),
        "psnr_axial_body": _slicewise_psnr(fake01, real01, body, 1.0),
        "ssim_body": ssim(fake01, real01, 1.0, body, mode="3d"),
        "ssim_axial_body": ssim(fake01, real01, 1.0, body, mode="axial"),
    }
    out["ms_ssim"], out["ms_ssim_scales"], _ = ms_ssim(fake01, real01, 1.0, mode="3d")
    out["ms_ssim_axial"], _, _ = ms_ssim(fake01, real01, 1.0, mode="axial")
    if labels is not None:
        labels = np.asarray(labels)
        for value in sorted(int(v) for v in np.unique(labels) if v > 0):
            name = (label_names or {}).get(value, str(value))
            region = labels == value
            out[f"psnr_{name}"] = psnr(fake01, real01, 1.0, region)
            try:
                out[f"ssim_axial_{name}"] = ssim(fake01, real01, 1.0, region, mode="axial")
            except ValueError:  # a label only at the border: no valid SSIM window
                out[f"ssim_axial_{name}"] = math.nan
    return out
