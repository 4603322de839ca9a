"""gem3d.sampling: the noise schedule, clip samplers with known-frame replacement, and volume propagation."""

from .propagation import (
    Window,
    WindowJob,
    informed_latents_for_jobs,
    known_frames_for_jobs,
    plan_base_windows,
    plan_windows,
    propagate_volume,
    window_rounds,
)
from .samplers import (
    KnownFrames,
    ddim_timesteps,
    make_ddim_scheduler,
    make_dpmpp_scheduler,
    sample_ddim,
    sample_dpmpp,
)
from .schedule import alphas_cumprod_tensor, betas_tensor, make_train_scheduler, original_ddim_timesteps

__all__ = [
    "KnownFrames",
    "Window",
    "WindowJob",
    "alphas_cumprod_tensor",
    "betas_tensor",
    "ddim_timesteps",
    "informed_latents_for_jobs",
    "known_frames_for_jobs",
    "make_ddim_scheduler",
    "make_dpmpp_scheduler",
    "make_train_scheduler",
    "original_ddim_timesteps",
    "plan_base_windows",
    "plan_windows",
    "propagate_volume",
    "sample_ddim",
    "sample_dpmpp",
    "window_rounds",
]
