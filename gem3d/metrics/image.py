"""PSNR, SSIM and MS-SSIM (MONAI; Wang et al. 2004: Gaussian window 11, sigma 1.5) of canonical ``(D, H, W)`` volumes,
3D or per axial slice, inside a mask, on one scale ``data_range`` (default: the reference's range)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from einops import rearrange
from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default
SSIM_MODES = {"axial": ("d h w -> d 1 h w", 2), "3d": ("d h w -> 1 1 d h w", 3)}  # mode -> (layout, spatial dims)


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x).to(torch.float64)


def _pair(prediction, reference, data_range: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Both volumes as float64 tensors of one ``(D, H, W)`` shape, and the data range."""
    x, y = _as_tensor(prediction), _as_tensor(reference)
    if x.shape != y.shape:
        raise ValueError(f"volumes must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 3:
        raise ValueError(f"volumes must be (D, H, W), got shape {tuple(x.shape)}")
    if data_range is None:
        data_range = float(y.max() - y.min())
        data_range = data_range if data_range > 0 else 1.0  # constant reference
    return x, y, float(data_range)


def _as_mask(mask, shape) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(m.shape)} differs from the volumes' {tuple(shape)}")
    if not m.any():
        raise ValueError("mask is empty")
    return m


def _layout(mode: str) -> tuple[str, int]:
    if mode not in SSIM_MODES:
        raise ValueError(f"mode must be one of {tuple(SSIM_MODES)}, got {mode!r}")
    return SSIM_MODES[mode]


def psnr(prediction, reference, data_range: float | None = None, mask=None) -> float:
    """PSNR in dB (MONAI's ``20 log10(range) - 10 log10(mse)``) of ``(D, H, W)`` volumes over the voxels of ``mask``
    (bool ``(D, H, W)``, default all); ``inf`` when they are equal there."""
    x, y, data_range = _pair(prediction, reference, data_range)
    err = (x - y) ** 2
    if mask is not None:
        err = err[_as_mask(mask, x.shape)]
    mse = float(err.mean())
    return math.inf if mse == 0 else 20.0 * math.log10(data_range) - 10.0 * math.log10(mse)


def _odd_window(window: int, sizes) -> int:
    size = min(window, *sizes)
    return size - (1 - size % 2)  # odd, at most every size


def ssim(prediction, reference, data_range: float | None = None, mask=None, mode: str = "axial",
         window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> float:
    """Mean SSIM (MONAI ``compute_ssim_and_cs``) of ``(D, H, W)`` volumes, per axial slice (``mode="axial"``) or
    3D; with ``mask`` only windows centred inside it count. The window shrinks (odd) to fit small volumes."""
    return ssim_map(prediction, reference, data_range, mode, window, sigma).mean(mask)


@dataclass(frozen=True)
class SsimMap:
    """The SSIM of every valid window (``values``: the volume of ``shape`` less ``half`` voxels at each border of
    the ``dims`` last axes, those the window spans), to be averaged over one mask or several without computing it
    again."""

    values: torch.Tensor
    shape: tuple[int, int, int]
    half: int
    dims: int

    def mean(self, mask=None) -> float:
        """The mean SSIM over the windows centred inside ``mask`` (bool ``(D, H, W)``; None: all of them)."""
        if mask is None:
            return float(self.values.mean())
        valid = [slice(None)] * (3 - self.dims) + [slice(self.half, s - self.half)
                                                   for s in self.shape[3 - self.dims:]]
        m = _as_mask(mask, self.shape)[tuple(valid)]
        if not m.any():
            raise ValueError(f"mask has no voxel at least {self.half} voxels from the border "
                             f"(SSIM window {2 * self.half + 1})")
        return float(self.values[m].mean())


def ssim_map(prediction, reference, data_range: float | None = None, mode: str = "axial",
             window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> SsimMap:
    """The SSIM map of ``(D, H, W)`` volumes (per axial slice or 3D) that :func:`ssim` averages."""
    pattern, dims = _layout(mode)
    x, y, data_range = _pair(prediction, reference, data_range)
    size = _odd_window(window, x.shape[3 - dims:])
    full, _ = compute_ssim_and_cs(rearrange(x, pattern), rearrange(y, pattern), spatial_dims=dims,
                                  kernel_size=[size] * dims, kernel_sigma=[sigma] * dims, data_range=data_range)
    values = full.reshape(full.shape[-3:]) if mode == "3d" else full[:, 0]  # the valid-window map
    return SsimMap(values, tuple(x.shape), size // 2, dims)


def ms_ssim_scales(shape, window: int = SSIM_WINDOW, max_scales: int = len(MS_SSIM_WEIGHTS)) -> tuple[int, int]:
    """``(scales, window)`` for MS-SSIM on images of spatial ``shape``: the largest odd window <= ``window`` that allows
    2+ scales, with the most scales (<= ``max_scales``) whose coarsest image holds it (and MONAI's
    ``size // (scales - 1)**2 > window - 1``); a single scale (plain SSIM) only when nothing else fits."""
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
    pattern, dims = _layout(mode)
    x, y, data_range = _pair(prediction, reference, data_range)
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


def reconstruction_metrics(synthetic, real, body=None, labels=None, label_names: Mapping[int, str] | None = None,
                           unit_scale: bool = False) -> dict[str, float]:
    """PSNR / SSIM / MS-SSIM of a canonical ``(D, H, W)`` ``synthetic`` volume against ``real``, both mapped to [0, 1]
    with the real volume's min/max (``unit_scale``: both are on one [0, 1] scale already, e.g. clipped to a CT
    window, and are used as given): 3D and per axial slice inside ``body`` (bool, default everywhere), and inside
    each label > 0 of ``labels`` (int ``(D, H, W)``, named by ``label_names``)."""
    if unit_scale:
        real01, fake01 = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    else:
        real01 = to_unit_range(real, real)
        fake01 = to_unit_range(synthetic, real)
    body = np.ones(real01.shape, bool) if body is None else np.asarray(body, bool)
    axial = ssim_map(fake01, real01, 1.0, mode="axial")  # one map for the body and every label
    out = {
        "psnr_body": psnr(fake01, real01, 1.0, body),
        "psnr_axial_body": _slicewise_psnr(fake01, real01, body, 1.0),
        "ssim_body": ssim(fake01, real01, 1.0, body, mode="3d"),
        "ssim_axial_body": axial.mean(body),
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
                out[f"ssim_axial_{name}"] = axial.mean(region)
            except ValueError:  # a label only at the border: no valid SSIM window
                out[f"ssim_axial_{name}"] = math.nan
    return out
