"""The training noise schedule and the original's DDIM timestep spacing.

GEM-3D uses 1000 steps with betas linear in sqrt, ``linspace(sqrt(0.00085), sqrt(0.012), 1000)**2``, and
``alphas_cumprod`` computed in float64 and stored as float32: exactly the buffers of the original checkpoints.
diffusers' ``scaled_linear`` computes the same in float32 (``alphas_cumprod`` off by up to 5e-7), so gem3d computes
them itself and hands diffusers matching betas (:func:`trained_betas`).

Beyond the paper, a model may predict the velocity ``v = sqrt(a) eps - sqrt(1 - a) x0`` instead of the noise
(``prediction_type="v_prediction"``, Salimans & Ho 2022; diffusers' names) and train on the schedule rescaled to zero
terminal SNR (``zero_terminal_snr``: ``alphas_cumprod[T - 1] = 0``, Lin et al. 2023, diffusers'
``rescale_zero_terminal_snr``), so that sampling starts from pure noise as training ends there. :func:`model_target`,
:func:`x0_from_output`, :func:`eps_from_output` and :func:`output_from_x0` convert between the two parameterisations.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

__all__ = [
    "PREDICTION_TYPES", "TERMINAL_ALPHA_CUMPROD", "alphas_cumprod_tensor", "eps_from_output", "model_target",
    "original_ddim_timesteps", "output_from_x0", "trained_betas", "validate_prediction", "x0_from_output",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the model predicts: the noise (GEM-3D) or the velocity
# the finite stand-in of a zero alphas_cumprod[T - 1] that diffusers' DPM-Solver++ uses with rescale_betas_zero_snr
# (the float16 subnormal 2**-24: log SNR stays finite at the first step)
TERMINAL_ALPHA_CUMPROD = 2.0**-24


def validate_prediction(prediction_type: str, zero_terminal_snr: bool) -> None:
    """Eager check of a model's objective: ``prediction_type`` one of :data:`PREDICTION_TYPES`, ``zero_terminal_snr``
    a bool, and zero terminal SNR only with v-prediction (at ``alphas_cumprod = 0`` the input is pure noise: an eps
    prediction says nothing about x0 there, Lin et al. 2023)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: {list(PREDICTION_TYPES)}")
    if not isinstance(zero_terminal_snr, (bool, np.bool_)):
        raise ValueError(f"zero_terminal_snr must be true or false, got {zero_terminal_snr!r}")
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError(
            f"zero_terminal_snr=True needs prediction_type='v_prediction', got prediction_type={prediction_type!r}: "
            "at the last timestep alphas_cumprod is 0 and x0 cannot be read from an eps prediction"
        )


def alphas_cumprod_tensor(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """``cumprod(1 - betas)`` of the betas ``linspace(sqrt(beta_start), sqrt(beta_end), T)**2``, in float64,
    returned as float32 ``(T,)`` (the original's ``alphas_cumprod`` buffer). ``zero_terminal_snr``: the betas
    rescaled first by diffusers' ``rescale_zero_terminal_snr`` (in float64), so ``alphas_cumprod[T - 1] == 0``
    exactly and ``alphas_cumprod[0]`` is unchanged."""
    if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    if not (0.0 < beta_start < beta_end < 1.0):
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start!r}, beta_end={beta_end!r}")
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
    return torch.from_numpy(np.cumprod(1.0 - betas)).to(torch.float32)


def _broadcast(alpha_cumprod: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``alpha_cumprod`` (a scalar, or ``(B,)`` / ``(B, F)`` per clip / slice) shaped to broadcast over ``like``."""
    a = torch.as_tensor(alpha_cumprod, device=like.device).to(like.dtype)
    return a.reshape(*a.shape, *([1] * (like.ndim - a.ndim)))


def model_target(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod, prediction_type: str) -> torch.Tensor:
    """What the model learns to predict for ``x_t = sqrt(a) x0 + sqrt(1 - a) noise``: ``noise`` (epsilon) or
    ``v = sqrt(a) noise - sqrt(1 - a) x0`` (v_prediction, diffusers' ``get_velocity``). ``alpha_cumprod``: a scalar
    or a tensor of x0's leading dimensions."""
    if prediction_type == "epsilon":
        return noise
    validate_prediction(prediction_type, False)
    a = _broadcast(alpha_cumprod, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def x0_from_output(output: torch.Tensor, x: torch.Tensor, alpha_cumprod, prediction_type: str) -> torch.Tensor:
    """The x0 estimate of a model ``output`` at ``x`` (noise level ``alpha_cumprod``): ``(x - sqrt(1 - a) eps) /
    sqrt(a)`` (epsilon; undefined at a = 0) or ``sqrt(a) x - sqrt(1 - a) v`` (v_prediction)."""
    validate_prediction(prediction_type, False)
    a = _broadcast(alpha_cumprod, x)
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * output) / a.sqrt()
    return a.sqrt() * x - (1 - a).sqrt() * output


def eps_from_output(output: torch.Tensor, x: torch.Tensor, alpha_cumprod, prediction_type: str) -> torch.Tensor:
    """The noise estimate of a model ``output`` at ``x``: ``output`` itself (epsilon) or ``sqrt(a) v + sqrt(1 - a)
    x`` (v_prediction)."""
    validate_prediction(prediction_type, False)
    if prediction_type == "epsilon":
        return output
    a = _broadcast(alpha_cumprod, x)
    return a.sqrt() * output + (1 - a).sqrt() * x


def output_from_x0(x0: torch.Tensor, x: torch.Tensor, alpha_cumprod, prediction_type: str) -> torch.Tensor:
    """The model output whose x0 estimate at ``x`` is ``x0``: ``(x - sqrt(a) x0) / sqrt(1 - a)`` (epsilon) or
    ``(sqrt(a) x - x0) / sqrt(1 - a)`` (v_prediction); the inverse of :func:`x0_from_output` where ``a < 1``."""
    validate_prediction(prediction_type, False)
    a = _broadcast(alpha_cumprod, x)
    if prediction_type == "epsilon":
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return (a.sqrt() * x - x0) / (1 - a).sqrt()


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
    entries is rounded to float32, then moved by float32 steps until the running product hits its target. The ratio
    that counts is the one diffusers recovers, ``1 - float32(1 - alpha)``: the same as ``alpha`` for ``alpha >= 0.5``
    (the original schedule), coarser below. Exact for the original schedule; where no float32 ratio hits an entry
    (a few of the last, large-beta steps of a zero-terminal-SNR schedule) that entry is one float32 step off and the
    next ones start from it."""
    target = alphas_cumprod.detach().to("cpu", torch.float32).numpy()
    betas, running, one = np.empty_like(target), 1.0, np.float32(1.0)
    for i, goal in enumerate(target):
        alpha = np.float32(float(goal) / running)
        for _ in range(64):
            beta = one - alpha
            product = np.float32(running * float(one - beta))
            if product == goal:
                break
            alpha = np.nextafter(alpha, np.float32(2.0 if product < goal else 0.0))
        betas[i], running = beta, running * float(one - beta)
    return betas
