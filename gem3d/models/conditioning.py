"""Conditioning signals for the GEM-3D denoisers: the sinusoidal timestep embedding, the slice model's position
context and the concat condition (mask latent, then the informed-slice latent unless baseline)."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_timestep_embedding
from einops import repeat

__all__ = ["timestep_embedding", "position_embedding", "concat_condition"]


def timestep_embedding(t: torch.Tensor | float | int, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period ** (-i / (dim // 2))`` (diffusers'
    ``get_timestep_embedding``): timesteps ``(N,)`` (any reals; a scalar gives N = 1) -> ``(N, dim)`` float32 on
    ``t``'s device; an odd ``dim`` ends in a zero column."""
    if int(dim) != dim or dim < 1:
        raise ValueError(f"timestep_embedding: dim must be a positive integer, got {dim!r}")
    t = torch.atleast_1d(torch.as_tensor(t))
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must be a scalar or 1-D (N,), got shape {tuple(t.shape)}")
    return get_timestep_embedding(t, int(dim), flip_sin_to_cos=True, downscale_freq_shift=0, max_period=max_period)


def position_embedding(pos: torch.Tensor | float, dim: int) -> torch.Tensor:
    """Relative slice positions in [0, 1] ``(N,)`` -> the slice model's context,
    ``timestep_embedding(1000 * pos, dim)``."""
    pos = torch.as_tensor(pos, dtype=torch.float32)
    if pos.numel() and (pos.min() < 0 or pos.max() > 1):
        raise ValueError(
            f"position_embedding: pos must lie in [0, 1] (index / num_slices), got range "
            f"[{pos.min().item():.4g}, {pos.max().item():.4g}]"
        )
    return timestep_embedding(1000.0 * pos, dim)


def concat_condition(mask_latent: torch.Tensor, informed_latent: torch.Tensor | None = None) -> torch.Tensor:
    """Mask latent clips ``(B, F, z, h, w)``, then the informed-slice latent (None for the baseline) along channels
    -> ``(B, F, z or 2z, h, w)``. ``informed_latent`` is ``(B, F, z, h, w)`` or one per clip ``(B, z, h, w)``."""
    if mask_latent.ndim != 5:
        raise ValueError(f"concat_condition: mask_latent must be (B,F,z,h,w), got shape {tuple(mask_latent.shape)}")
    if informed_latent is None:
        return mask_latent
    if informed_latent.ndim == 4:
        informed_latent = repeat(informed_latent, "b c h w -> b f c h w", f=mask_latent.shape[1])
    if informed_latent.shape != mask_latent.shape:
        raise ValueError(
            f"concat_condition: informed_latent shape {tuple(informed_latent.shape)} does not match mask_latent "
            f"{tuple(mask_latent.shape)}; allowed: the same shape or (B,z,h,w), one per clip"
        )
    return torch.cat([mask_latent, informed_latent.to(mask_latent.dtype)], dim=2)
