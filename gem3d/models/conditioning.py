"""Conditioning signals for the GEM-3D denoisers.

- ``timestep_embedding``: the ADM / latent-diffusion sinusoidal embedding, ``[cos, sin]`` order.
- ``position_embedding``: the slice model's context, the timestep embedding of ``1000 * pos``.
- ``concat_condition``: the concat condition of the slice / volume models, mask latent first, then the
  informed-slice latent (stage 1 / stage 2: 8 channels) or the mask latent alone (baseline: 4 channels).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat

__all__ = ["timestep_embedding", "position_embedding", "concat_condition"]


def timestep_embedding(t: torch.Tensor | float | int, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period ** (-i / (dim // 2))``.

    Args:
        t: timesteps ``(N,)`` (any real values; a scalar gives ``N = 1``).
        dim: embedding width; an odd ``dim`` gets a trailing zero column.
        max_period: the lowest frequency's period.

    Returns:
        ``(N, dim)`` float32 embedding on ``t``'s device.
    """
    if int(dim) != dim or dim < 1:
        raise ValueError(f"timestep_embedding: dim must be a positive integer, got {dim!r}")
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = rearrange(t, " -> 1")
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must be a scalar or 1-D (N,), got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(exponent)
    args = torch.outer(t.float(), freqs)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def position_embedding(pos: torch.Tensor | float, dim: int) -> torch.Tensor:
    """Relative slice position(s) ``pos`` in [0, 1] ``(N,)`` -> ``(N, dim)`` = ``timestep_embedding(1000 * pos, dim)``.

    Used as the slice model's cross-attention context (one token per slice).
    """
    pos = torch.as_tensor(pos, dtype=torch.float32)
    if pos.numel() and (pos.min() < 0 or pos.max() > 1):
        raise ValueError(
            f"position_embedding: pos must lie in [0, 1] (index / num_slices), got range "
            f"[{pos.min().item():.4g}, {pos.max().item():.4g}]"
        )
    return timestep_embedding(1000.0 * pos, dim)


def concat_condition(mask_latent: torch.Tensor, informed_latent: torch.Tensor | None = None) -> torch.Tensor:
    """Concat condition along channels: mask latent first, then the informed-slice latent.

    Args:
        mask_latent: ``(N, z, h, w)`` or clips ``(B, F, z, h, w)``.
        informed_latent: ``None`` (baseline), or the informed slice's latent with the same shape as
            ``mask_latent``, or one per clip ``(B, z, h, w)`` for 5-D masks (repeated over the F slices),
            or one ``(z, h, w)`` shared by every row of a 4-D mask.

    Returns:
        ``(N, z or 2z, h, w)`` or ``(B, F, z or 2z, h, w)``; the UNet input is ``cat([x_noisy, cond], dim=channels)``.
    """
    if mask_latent.ndim not in (4, 5):
        raise ValueError(
            f"concat_condition: mask_latent must be (N,z,h,w) or (B,F,z,h,w), got shape {tuple(mask_latent.shape)}"
        )
    if informed_latent is None:
        return mask_latent
    channel_dim = mask_latent.ndim - 3
    if informed_latent.shape != mask_latent.shape:
        if mask_latent.ndim == 5 and informed_latent.ndim == 4 and informed_latent.shape[0] == mask_latent.shape[0]:
            informed_latent = repeat(informed_latent, "b c h w -> b f c h w", f=mask_latent.shape[1])
        elif mask_latent.ndim == 4 and informed_latent.ndim == 3:
            informed_latent = repeat(informed_latent, "c h w -> n c h w", n=mask_latent.shape[0])
        elif mask_latent.ndim == 4 and informed_latent.ndim == 4 and informed_latent.shape[0] == 1:
            informed_latent = repeat(rearrange(informed_latent, "1 c h w -> c h w"), "c h w -> n c h w", n=mask_latent.shape[0])
    if informed_latent.shape != mask_latent.shape:
        raise ValueError(
            "concat_condition: informed_latent shape "
            f"{tuple(informed_latent.shape)} does not match mask_latent {tuple(mask_latent.shape)}; allowed: the same "
            "shape, (B,z,h,w) per clip for 5-D masks, or (z,h,w) / (1,z,h,w) for 4-D masks"
        )
    return torch.cat([mask_latent, informed_latent.to(mask_latent.dtype)], dim=channel_dim)
