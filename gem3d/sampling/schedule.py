"""The training noise schedule and the original's DDIM timestep spacing.

GEM-3D uses 1000 steps with betas linear in sqrt, ``linspace(sqrt(0.00085), sqrt(0.012), 1000)**2``, and
``alphas_cumprod`` computed in float64 and stored as float32: exactly the buffers of the original checkpoints.
diffusers' ``scaled_linear`` computes the same in float32 (``alphas_cumprod`` off by up to 5e-7), so gem3d computes
them itself and hands diffusers matching betas (:func:`trained_betas`).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["alphas_cumprod_tensor", "original_ddim_timesteps", "trained_betas"]


def alphas_cumprod_tensor(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """``cumprod(1 - betas)`` of the betas ``linspace(sqrt(beta_start), sqrt(beta_end), T)**2``, in float64,
    returned as float32 ``(T,)`` (the original's ``alphas_cumprod`` buffer)."""
    if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    if not (0.0 < beta_start < beta_end < 1.0):
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start!r}, beta_end={beta_end!r}")
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas)).to(torch.float32)


def original_ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The original's "uniform" DDIM timesteps, ascending: ``range(0, T, T // steps) + 1`` as a LongTensor
    (``1, 6, ..., 996`` for 200 steps; ``ceil(T / (T // steps))`` entries where ``steps`` does not divide ``T``)."""
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be an int in [1, {num_train_timesteps}], got {steps!r}")
    timesteps = torch.arange(0, num_train_timesteps, num_train_timesteps // steps, dtype=torch.long) + 1
    if int(timesteps[-1]) >= num_train_timesteps:
        raise ValueError(
            f"steps={steps} gives the original spacing timesteps up to {int(timesteps[-1])}, beyond the last training "
            f"timestep {num_train_timesteps - 1} (the original fails here too); choose steps so that "
            f"({num_train_timesteps} // steps) * (len - 1) + 1 < {num_train_timesteps}, e.g. a divisor of {num_train_timesteps}"
        )
    return timesteps


def trained_betas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Float32 betas ``(T,)`` whose cumulative product as a diffusers scheduler computes it from its config's
    ``trained_betas`` (float32 ``torch.cumprod(1 - betas)``) is exactly ``alphas_cumprod``. Each ratio of successive
    entries is rounded to float32, then moved by a few float32 steps until the running product hits its target."""
    target = alphas_cumprod.detach().to("cpu", torch.float32).numpy()
    alphas, running = np.empty_like(target), 1.0
    for i, goal in enumerate(target):
        alpha = np.float32(float(goal) / running)
        for _ in range(8):
            product = np.float32(running * float(alpha))
            if product == goal:
                break
            alpha = np.nextafter(alpha, np.float32(2.0 if product < goal else 0.0))
        alphas[i], running = alpha, running * float(alpha)
    return np.float32(1.0) - alphas
