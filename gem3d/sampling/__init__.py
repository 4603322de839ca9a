"""gem3d.sampling: the noise schedule, clip sampling with known-frame replacement, and volume propagation."""

from .propagation import (
    Window,
    WindowJob,
    informed_latents_for_jobs,
    known_frames_for_jobs,
    plan_base_windows,
    plan_windows,
    propagation,
    run_lockstep,
    window_rounds,
)
from .samplers import KnownFrames, Schedule, make_schedule, sample, slice_correlated_noise
from .schedule import alphas_cumprod_tensor, betas_tensor, original_ddim_timesteps

__all__ = [
    "KnownFrames",
    "Schedule",
    "Window",
    "WindowJob",
    "alphas_cumprod_tensor",
    "betas_tensor",
    "informed_latents_for_jobs",
    "known_frames_for_jobs",
    "make_schedule",
    "original_ddim_timesteps",
    "plan_base_windows",
    "plan_windows",
    "propagation",
    "run_lockstep",
    "sample",
    "slice_correlated_noise",
    "window_rounds",
]
