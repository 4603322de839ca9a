"""Conditioning signals for the GEM-3D denoisers: the sinusoidal timestep embedding, the slice model's position
context, the mask latent's label-fraction encoding and the concat condition (mask latent, then the informed-slice
latent unless baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from einops import pack, rearrange, repeat, unpack

__all__ = ["timestep_embedding", "position_embedding", "concat_condition", "MASK_ENCODINGS", "label_fractions"]

# how the mask becomes its latent: "autoencoder" (the paper: the grey mask image through the frozen first stage) or
# "label_fractions" (beyond the paper: each latent pixel holds the share of its footprint in every label, exactly)
MASK_ENCODINGS = ("autoencoder", "label_fractions")


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
    """Mask latent clips ``(B, F, m, h, w)`` (``m``: the mask encoding's channels), then the informed-slice latent
    (None for the baseline) along channels -> ``(B, F, m or m + z, h, w)``. ``informed_latent`` is ``(B, F, z, h,
    w)`` or one per clip ``(B, z, h, w)``."""
    if mask_latent.ndim != 5:
        raise ValueError(f"concat_condition: mask_latent must be (B,F,z,h,w), got shape {tuple(mask_latent.shape)}")
    if informed_latent is None:
        return mask_latent
    if informed_latent.ndim == 4:
        informed_latent = repeat(informed_latent, "b c h w -> b f c h w", f=mask_latent.shape[1])
    skip_channels = lambda shape: tuple(shape[:2]) + tuple(shape[3:])  # noqa: E731
    if informed_latent.ndim != 5 or skip_channels(informed_latent.shape) != skip_channels(mask_latent.shape):
        raise ValueError(
            f"concat_condition: informed_latent shape {tuple(informed_latent.shape)} does not match mask_latent "
            f"{tuple(mask_latent.shape)} (channels aside); allowed: (B,F,z,h,w) or (B,z,h,w), one per clip"
        )
    return torch.cat([mask_latent, informed_latent.to(mask_latent.dtype)], dim=2)


def label_fractions(grey: torch.Tensor, max_label: int, factor: int) -> torch.Tensor:
    """Grey masks ``(..., 1, S, S)`` (:func:`~gem3d.data.preprocess.label_to_grey` levels: outside the body, then
    labels 0..max_label) -> ``(..., max_label + 2, S/f, S/f)``: channel ``c`` is the share of each latent pixel's
    ``f x f`` footprint that holds level ``c - 1`` (outside the body, tissue, label 1, ..), mapped from [0, 1] to
    [-1, 1]. Unlike the grey mask through the autoencoder, no label is lost, however small (docs/mask-true.md)."""
    if grey.ndim < 4 or grey.shape[-3] != 1:
        raise ValueError(f"grey masks must be (..., 1, S, S), got shape {tuple(grey.shape)}")
    if int(max_label) != max_label or max_label < 1:
        raise ValueError(f"max_label must be a positive integer, got {max_label!r}")
    if grey.shape[-1] % factor or grey.shape[-2] % factor:
        raise ValueError(f"mask slices {tuple(grey.shape[-2:])} are not divisible by the first stage's factor {factor}")
    flat, batch_shape = pack([grey.float()], "* c h w")
    level = torch.round((flat + 1.0) * max_label / 2.0).clamp(-1, max_label).long() + 1  # 0 = outside the body
    onehot = rearrange(F.one_hot(level[:, 0], num_classes=max_label + 2).float(), "n h w c -> n c h w")
    shares = F.avg_pool2d(onehot, kernel_size=factor)
    return unpack(2.0 * shares - 1.0, batch_shape, "* c h w")[0]
