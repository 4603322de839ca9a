"""Image-quality metrics on volumes ``(D, H, W)`` (numpy or torch), computed slice-wise where noted.

- :func:`psnr`: peak signal-to-noise ratio in dB over a given data range (default: the reference's range).
- :func:`ssim`: structural similarity (Gaussian window, sigma 1.5, K1 0.01, K2 0.03; Wang et al. 2004), mean over
  the axial slices.
- :func:`slice_consistency`: mean absolute difference between neighbouring slices, the quantity volumetric layers
  are there to keep close to the real volume's.

Optionally restricted to a boolean ``mask`` (e.g. the body region) for PSNR.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.array(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x).to(torch.float64)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"volumes must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 3:
        raise ValueError(f"volumes must be (D, H, W), got shape {tuple(x.shape)}")


def data_range_of(reference) -> float:
    ref = _as_tensor(reference)
    value = float(ref.max() - ref.min())
    return value if value > 0 else 1.0


def psnr(prediction, reference, data_range: float | None = None, mask=None) -> float:
    """PSNR in dB of ``prediction`` against ``reference`` (both ``(D, H, W)``); ``inf`` when they are equal."""
    x, y = _as_tensor(prediction), _as_tensor(reference)
    _check_pair(x, y)
    data_range = data_range_of(y) if data_range is None else float(data_range)
    err = (x - y) ** 2
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        if m.shape != x.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} differs from the volumes' {tuple(x.shape)}")
        if not m.any():
            raise ValueError("mask is empty")
        err = err[m]
    mse = float(err.mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return rearrange(torch.outer(g, g), "h w -> 1 1 h w")


def ssim(prediction, reference, data_range: float | None = None, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over the axial slices (valid-window, no padding); windows shrink for slices smaller than 11 px."""
    x, y = _as_tensor(prediction), _as_tensor(reference)
    _check_pair(x, y)
    data_range = data_range_of(y) if data_range is None else float(data_range)
    size = min(window, x.shape[1], x.shape[2])
    size -= 1 - size % 2  # odd
    kernel = _gaussian_window(size, sigma)
    x, y = rearrange(x, "d h w -> d 1 h w"), rearrange(y, "d h w -> d 1 h w")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t):
        return F.conv2d(t, kernel)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def slice_consistency(volume) -> float:
    """Mean absolute difference between neighbouring slices of ``(D, H, W)`` (0 for a constant volume)."""
    v = _as_tensor(volume)
    if v.ndim != 3 or v.shape[0] < 2:
        raise ValueError(f"volume must be (D >= 2, H, W), got shape {tuple(v.shape)}")
    return float((v[1:] - v[:-1]).abs().mean())
