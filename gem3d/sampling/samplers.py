"""Clip sampling: one loop over a diffusers scheduler, with known-frame replacement (k-diffusion style)::

    schedule = make_schedule("ddim", alphas_cumprod, steps=200, eta=1.0)   # or "dpmpp"
    x0 = sample(eps_fn, x_T, schedule, known=None, generator=None, progress=False)

``eps_fn(x (B,F,C,h,w), t LongTensor (B,)) -> (B,F,C,h,w)`` is the denoiser with its condition bound in (the F
slices of a clip share its timestep); it returns what the model predicts, the noise eps or, for a
``prediction_type="v_prediction"`` schedule, the velocity v (:mod:`gem3d.sampling.schedule`). ``generator`` makes
every random draw repeatable. A schedule with zero terminal SNR (``alphas_cumprod[T - 1] == 0``) needs v-prediction
and a spacing that starts at ``T - 1`` (``trailing``, its default, or ``linspace``; Lin et al. 2023).

Known frames (:class:`KnownFrames`) start as their latent forward-noised, ``sqrt(a) z0 + sqrt(1 - a) noise``, are
noised again with fresh noise after every step, and end exactly at ``z0``. ``noise_level="timestep"`` (default) uses
``a = alphas_cumprod[t]`` at the clip's timestep ``t``; ``"original"`` (the original GEM-3D's, kept for measuring)
``alphas_cumprod[T - 1]`` at the start, then ``alphas_cumprod[i]`` after DDIM step *index* ``i`` (N-1, ..., 0).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from einops import einsum, rearrange
from tqdm.auto import tqdm

from .schedule import (
    PREDICTION_TYPES,
    TERMINAL_ALPHA_CUMPROD,
    original_ddim_timesteps,
    output_from_x0,
    trained_betas,
    x0_from_output,
)

__all__ = [
    "EpsFn", "KnownFrames", "NOISE_LEVELS", "SPACINGS", "Schedule", "make_schedule", "sample", "slice_correlated_noise",
    "validate_sample_options",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NOISE_LEVELS = ("timestep", "original")
# Timestep spacings per sampler, the first is the default. DDIM "original": the original's "uniform",
# range(0, T, T // S) + 1; the others are diffusers' ("diffusers" = "trailing", recommended by Lin et al. 2023).
SPACINGS = {
    "ddim": ("original", "diffusers", "leading", "trailing", "linspace"),
    "dpmpp": ("linspace", "leading", "trailing"),
}
ZERO_SNR_SPACING = "trailing"  # the default of both samplers on a zero-terminal-SNR schedule


@dataclass(frozen=True)
class KnownFrames:
    """Known frames of a clip, held fixed while the rest is sampled: ``mask (B,F) bool`` (True where known),
    ``latents (B,F,C,h,w)`` (clean; ignored where unknown), ``noise_level`` (see the module docstring)."""

    mask: torch.Tensor
    latents: torch.Tensor
    noise_level: str = "timestep"

    def __post_init__(self) -> None:
        if self.noise_level not in NOISE_LEVELS:
            raise ValueError(f"noise_level must be one of {NOISE_LEVELS}, got {self.noise_level!r}")
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool or self.mask.ndim != 2:
            got = (self.mask.dtype, tuple(self.mask.shape)) if isinstance(self.mask, torch.Tensor) else type(self.mask)
            raise ValueError(f"KnownFrames.mask must be a bool tensor (B,F), got {got}")
        if not isinstance(self.latents, torch.Tensor) or self.latents.ndim != 5:
            got = tuple(self.latents.shape) if isinstance(self.latents, torch.Tensor) else type(self.latents)
            raise ValueError(f"KnownFrames.latents must be a tensor (B,F,C,h,w), got {got}")
        if tuple(self.latents.shape[:2]) != tuple(self.mask.shape):
            raise ValueError(
                f"KnownFrames.latents (B,F)={tuple(self.latents.shape[:2])} does not match mask {tuple(self.mask.shape)}"
            )


@dataclass(frozen=True)
class Schedule:
    """What :func:`sample` steps through: a diffusers ``scheduler`` with its timesteps set (the loop steps a copy),
    the descending ``timesteps (N,)`` the model is called at, extra ``step_options`` of ``scheduler.step`` and the
    model's ``prediction_type`` (what its output is: eps or v)."""

    scheduler: SchedulerMixin
    timesteps: torch.Tensor
    step_options: dict = field(default_factory=dict)
    prediction_type: str = "epsilon"


def make_schedule(
    sampler: str, alphas_cumprod: torch.Tensor, steps: int, *, eta: float = 0.0, spacing: str | None = None,
    order: int = 2, prediction_type: str = "epsilon",
) -> Schedule:
    """A :class:`Schedule` for ``sampler`` on ``alphas_cumprod (T,)`` with ``steps`` steps, validated eagerly.

    ``"ddim"``: ``DDIMScheduler`` (``set_alpha_to_one=False``); with ``spacing="original"`` the original's DDIM
    (GEM-3D samples with ``eta=1``, 200 steps). ``"dpmpp"``: ``DPMSolverMultistepScheduler`` (``dpmsolver++`` of
    ``order`` 1-3, final sigma 0), deterministic: ``eta`` is ignored, as in diffusers' pipelines.
    ``prediction_type``: what the model outputs (one of :data:`~gem3d.sampling.schedule.PREDICTION_TYPES`; the
    model's own, e.g. ``Denoiser.prediction_type``). A zero-terminal-SNR ``alphas_cumprod`` (last entry 0) needs
    ``"v_prediction"`` and a spacing whose first timestep is ``T - 1`` (default ``"trailing"``); DPM-Solver++ then
    runs on :data:`~gem3d.sampling.schedule.TERMINAL_ALPHA_CUMPROD` in place of the 0, as diffusers does.
    """
    if sampler not in SPACINGS:
        raise ValueError(f"sampler={sampler!r} is not one of {sorted(SPACINGS)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: {list(PREDICTION_TYPES)}")
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
        got = tuple(alphas_cumprod.shape) if isinstance(alphas_cumprod, torch.Tensor) else type(alphas_cumprod)
        raise ValueError(f"alphas_cumprod must be a 1-D tensor (T,) with T >= 2, got {got}")
    zero_snr = float(alphas_cumprod[-1]) == 0.0
    if zero_snr and prediction_type != "v_prediction":
        raise ValueError(
            f"alphas_cumprod ends at 0 (zero terminal SNR), which needs prediction_type='v_prediction', got "
            f"{prediction_type!r}: the first step's input is pure noise, from which eps says nothing about x0"
        )
    default_spacing = ZERO_SNR_SPACING if zero_snr else SPACINGS[sampler][0]
    spacing = default_spacing if spacing is None else spacing
    if spacing not in SPACINGS[sampler]:
        raise ValueError(f"spacing must be one of {SPACINGS[sampler]} for sampler {sampler!r}, got {spacing!r}")
    T = alphas_cumprod.numel()
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}] (positive, at most the training timesteps), got {steps!r}")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or eta < 0:
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be one of (1, 2, 3), got {order!r}")
    diffusers_spacing = {"original": "leading", "diffusers": "trailing"}.get(spacing, spacing)
    config = dict(num_train_timesteps=T, trained_betas=trained_betas(alphas_cumprod), prediction_type=prediction_type,
                  timestep_spacing=diffusers_spacing, steps_offset=int(diffusers_spacing == "leading"))
    if sampler == "ddim":
        original = original_ddim_timesteps(int(steps), T).flip(0) if spacing == "original" else None
        scheduler = DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
        scheduler.set_timesteps(int(steps))
        timesteps = scheduler.timesteps if original is None else original  # DDIM's step reads only `steps`
        schedule = Schedule(scheduler, timesteps, {"eta": float(eta)}, prediction_type)
    else:
        if zero_snr:  # diffusers' rescale_betas_zero_snr stand-in: the solver's log SNR must stay finite
            finite = alphas_cumprod.detach().to("cpu", torch.float32).clone()
            finite[-1] = TERMINAL_ALPHA_CUMPROD
            config["trained_betas"] = trained_betas(finite)
        scheduler = DPMSolverMultistepScheduler(
            **config, solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
            final_sigmas_type="zero",
        )
        with warnings.catch_warnings():  # diffusers calls np.array on a tensor here (a numpy 2 DeprecationWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            scheduler.set_timesteps(int(steps))
        schedule = Schedule(scheduler, scheduler.timesteps, prediction_type=prediction_type)
    if zero_snr and int(schedule.timesteps[0]) != T - 1:
        starting = [s for s in SPACINGS[sampler] if s not in ("original", "leading")]
        raise ValueError(
            f"spacing={spacing!r} starts {sampler} at timestep {int(schedule.timesteps[0])}, not at the last "
            f"training timestep {T - 1}, where a zero-terminal-SNR model's pure noise lies; use one of {starting}"
        )
    return schedule


def slice_correlated_noise(
    shape: tuple[int, ...], rho: float = 0.0, *, generator: torch.Generator | None = None,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise ``(B, F, ...)`` whose slices (axis 1) form an AR(1) chain with correlation ``rho``.

    ``noise[:, f] = rho * noise[:, f-1] + sqrt(1 - rho^2) * w[:, f]`` for i.i.d. normal ``w = randn_tensor(shape)``
    (``w`` itself for rho = 0): every slice stays N(0, I), ``corr(noise[:, f], noise[:, f+k]) = rho^k``. gem3d's
    version of ISCS (Du et al., arXiv 2602.04162), whose Slerp of two near-orthogonal Gaussians with weight ``s`` is
    this step with ``rho = cos(s pi/2)``. Across windows the noise stays independent (the known frames link them).
    """
    validate_sample_options(slice_noise_correlation=rho)
    noise = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
    if rho == 0:
        return noise
    f, k = torch.arange(shape[1]).view(-1, 1), torch.arange(shape[1]).view(1, -1)
    scale = torch.where(k == 0, 1.0, (1.0 - rho**2) ** 0.5)
    weights = torch.where(k <= f, rho ** (f - k).clamp(min=0).double() * scale, 0.0)  # (F, F) lower triangular
    return einsum(weights.to(noise), noise, "f k, b k ... -> b f ...")


def validate_sample_options(clip_x0: float | None = None, slice_noise_correlation: float = 0.0) -> None:
    """The options of :func:`sample` that are not part of the schedule (eager, printing the offending value)."""
    if clip_x0 is not None and (not isinstance(clip_x0, (int, float)) or isinstance(clip_x0, bool) or clip_x0 <= 0):
        raise ValueError(f"clip_x0 must be None (off) or a float > 0, got {clip_x0!r}")
    rho = slice_noise_correlation
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not 0.0 <= rho < 1.0:
        raise ValueError(f"slice_noise_correlation must be a float in [0, 1), got {rho!r}")


def _replace_known(x: torch.Tensor, known: KnownFrames | None, alpha_cumprod: float | None, noise) -> torch.Tensor:
    """Set the known frames of ``x`` to their latent forward-noised at ``alpha_cumprod`` with ``noise()``,
    ``sqrt(a) z0 + sqrt(1 - a) noise`` (None: clean)."""
    if known is None:
        return x
    z0 = known.latents.to(device=x.device, dtype=x.dtype)
    if alpha_cumprod is not None:
        z0 = alpha_cumprod**0.5 * z0 + (1.0 - alpha_cumprod) ** 0.5 * noise()
    return torch.where(rearrange(known.mask.to(x.device), "b f -> b f 1 1 1"), z0, x)


def _known_level(known: KnownFrames | None, alphas_cumprod: torch.Tensor, timesteps: list[int], k: int) -> float | None:
    """Noise level of the known frames before step k (0-based; k = N: after the last step, clean = None)."""
    if known is None or k == len(timesteps):
        return None
    if known.noise_level == "timestep":
        return float(alphas_cumprod[timesteps[k]])
    return float(alphas_cumprod[len(timesteps) - k if k else -1])  # the original's DDIM step index


def _clip_x0(output: torch.Tensor, x: torch.Tensor, alpha_cumprod: torch.Tensor, bound: float,
             prediction_type: str = "epsilon") -> torch.Tensor:
    """The model output (eps or v, as ``prediction_type``) whose x0 estimate is clipped to ``[-bound, bound]``
    (``output`` itself, bit for bit, wherever the estimate is inside the bound)."""
    a = alpha_cumprod.to(x)
    x0 = x0_from_output(output, x, a, prediction_type)
    clipped = output_from_x0(x0.clamp(-bound, bound), x, a, prediction_type)
    return torch.where(x0.abs() > bound, clipped, output)


# DDIM's eta at a zero-SNR timestep, at most: diffusers computes sqrt(1 - a_prev - sigma^2) with sigma^2 = eta^2
# (1 - a_prev) there, for eta = 1 the square root of a rounding error (NaN when it comes out negative)
ZERO_SNR_MAX_ETA = 1.0 - 1e-6


def _step_options(schedule: Schedule, alpha_cumprod: torch.Tensor) -> dict:
    """``schedule.step_options`` for a step at ``alpha_cumprod``; DDIM's eta capped at :data:`ZERO_SNR_MAX_ETA`
    where ``alpha_cumprod == 0`` (the first step of a zero-terminal-SNR schedule)."""
    eta = schedule.step_options.get("eta", 0.0)
    if eta > ZERO_SNR_MAX_ETA and float(alpha_cumprod) == 0.0:
        return {**schedule.step_options, "eta": ZERO_SNR_MAX_ETA}
    return schedule.step_options


def _noised(x0: torch.Tensor, alpha_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x0`` forward-noised to the level ``alpha_cumprod``: ``sqrt(a) x0 + sqrt(1 - a) noise``."""
    return alpha_cumprod.sqrt() * x0 + (1 - alpha_cumprod).sqrt() * noise


@torch.no_grad()
def sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    known: KnownFrames | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip_x0: float | None = None,
    slice_noise_correlation: float = 0.0,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    label_region: torch.Tensor | None = None,
    label_strength: float | None = None,
) -> torch.Tensor:
    """Sample ``x0 (B,F,C,h,w)`` from ``x = x_T (B,F,C,h,w)`` along ``schedule`` (:func:`make_schedule`);
    ``eps_fn``'s output is read as ``schedule.prediction_type`` says (eps or v).

    ``clip_x0``: clip the x0 estimate to ``[-clip_x0, clip_x0]`` at every step (None: off, as in the original), by
    replacing eps with the noise the clipped x0 implies (for DDIM this is diffusers' ``clip_sample`` with
    ``use_clipped_model_output``; DPM-Solver++ has only quantile ``thresholding``, a rescale, not a clip).
    ``slice_noise_correlation``: rho in [0, 1); every noise draw is :func:`slice_correlated_noise`.
    ``init`` (x's shape) and ``strength`` in (0, 1): SDEdit, as diffusers' img2img ``strength``: only the last
    ``ceil(strength * N)`` timesteps run, from ``init`` forward-noised to the first of them (``x`` is the noise).
    ``label_region`` (broadcastable to x, e.g. ``(B,F,1,h,w)``, 1 inside the labelled structures, 0 elsewhere) and
    ``label_strength`` in (``strength``, 1]: the labelled structures start earlier, at the SDEdit level of
    ``label_strength`` (1: pure noise); until the ``strength`` step, every step's result outside them is replaced by
    ``init`` forward-noised to the next timestep, so from there on the run is SDEdit outside and has had more steps
    inside (RePaint's replacement of a known region, without its resampling).
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)
        raise ValueError(f"x_T must be a tensor (B,F,C,h,w), got {got}")
    if known is not None and (not isinstance(known, KnownFrames) or tuple(known.latents.shape) != tuple(x.shape)):
        got = tuple(known.latents.shape) if isinstance(known, KnownFrames) else type(known)
        raise ValueError(f"known must be None or KnownFrames with latents of x_T's shape {tuple(x.shape)}, got {got}")
    validate_sample_options(clip_x0, slice_noise_correlation)
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must lie in (0, 1] (1: from pure noise), got {strength!r}")
    scheduler, timesteps = copy.deepcopy(schedule.scheduler), [int(t) for t in schedule.timesteps]
    alphas_cumprod = scheduler.alphas_cumprod
    replaced_steps = 0  # steps whose result outside label_region is replaced by the forward-noised init
    if init is not None and strength < 1.0:
        first = len(timesteps) - math.ceil(strength * len(timesteps))
        if label_region is not None and label_strength is not None and label_strength > strength:
            if not label_strength <= 1.0:
                raise ValueError(f"label_strength must lie in (strength, 1] (1: from pure noise), got {label_strength!r}")
            label_first = len(timesteps) - math.ceil(label_strength * len(timesteps))
            replaced_steps, timesteps = first - label_first, timesteps[label_first:]
            label_region = label_region.to(x)
        else:
            timesteps = timesteps[first:]
        if replaced_steps == 0 or label_strength < 1.0:
            x = _noised(init.to(x), alphas_cumprod[timesteps[0]].to(x), x)

    def noise() -> torch.Tensor:
        rho = slice_noise_correlation
        return slice_correlated_noise(x.shape, rho, generator=generator, device=x.device, dtype=x.dtype)

    x = _replace_known(x, known, _known_level(known, alphas_cumprod, timesteps, 0), noise)
    for k, t in enumerate(tqdm(timesteps, desc=type(scheduler).__name__, disable=not progress, leave=False)):
        output = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))  # eps or v
        if tuple(output.shape) != tuple(x.shape):
            raise ValueError(f"eps_fn returned shape {tuple(output.shape)}, expected the input's {tuple(x.shape)}")
        if clip_x0 is not None:
            output = _clip_x0(output, x, alphas_cumprod[t], clip_x0, schedule.prediction_type)
        step_noise = noise() if schedule.step_options.get("eta", 0) > 0 else None  # DDIM's eta noise
        x = scheduler.step(output, t, x, variance_noise=step_noise, **_step_options(schedule, alphas_cumprod[t]))
        x = x.prev_sample
        if k < replaced_steps:  # outside the labelled structures: init at the next timestep's level
            outside = _noised(init.to(x), alphas_cumprod[timesteps[k + 1]].to(x), noise())
            x = label_region * x + (1 - label_region) * outside
        x = _replace_known(x, known, _known_level(known, alphas_cumprod, timesteps, k + 1), noise)
    return x
