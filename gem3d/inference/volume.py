"""Sampling whole volumes (and single informed slices) with a loaded model: the glue between
:class:`gem3d.denoiser.Denoiser`, the clip samplers and the bi-directional propagation.

Shapes: masks and images ``(D, S, S)`` in [-1, 1] (the grey mask goes below -1 outside the body); latents
``(D, C, h, w)`` scaled by the first stage's scale factor.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from gem3d.sampling.propagation import (
    Propagation,
    WindowJob,
    informed_latents_for_jobs,
    known_frames_for_jobs,
    propagation,
    run_lockstep,
)
from gem3d.sampling.samplers import NOISE_LEVELS, make_schedule, sample, slice_correlated_noise, validate_sample_options
from gem3d.sampling.schedule import alphas_cumprod_tensor

CONDITION_POSTERIORS = ("mean", "sample")  # the conditioning latents: posterior mean (gem3d) or a draw (the original)


@dataclass
class SamplerOptions:
    """How to sample (see :mod:`gem3d.sampling.samplers`): ``sampler`` (ddim | dpmpp), ``steps``, ``eta`` (DDIM
    only; the paper: 200 steps, eta 1), ``window``/``overlap`` (slices), ``known_noise`` (``timestep``: known frames
    noised to their clip's timestep; ``original``: the original's step-index level), ``batch_directions`` (upward and
    downward windows in one batch), ``clip_x0`` (clip the latent x0 estimate to [-clip_x0, clip_x0]; None: off),
    ``slice_noise_correlation`` (rho in [0, 1) across neighbouring slices, ISCS-style; 0: independent),
    ``condition_posterior`` (conditioning latents: the encoder posterior's ``mean``, or a ``sample`` as the original
    draws), ``informed_guidance`` (W: ``eps_null + W (eps_informed - eps_null)``; 1 = off; for models trained with
    ``informed_dropout``), ``batch_windows`` (volumes sampled in lockstep; a volume's result does not depend on it),
    ``informed_start`` (SDEdit strength S in (0, 1]: windows start from :func:`informed_start_latents` noised to the
    level of the last S of the steps; 1 = off: from pure noise, as the original), ``label_start`` (None, or L in
    (S, 1]: the mask's labelled structures start at the level of the last L of the steps, the rest at S; the
    structures then get more steps to depart from the informed slice's tissue; :func:`gem3d.sampling.samplers.sample`'s
    ``label_strength``), ``window_informed`` (each later window's informed latent: ``nearest`` generated slice, as
    the paper, or the ``first``, real one)."""

    sampler: str = "ddim"
    steps: int = 200
    eta: float = 1.0
    window: int = 16
    overlap: int = 1
    known_noise: str = "timestep"
    batch_directions: bool = True
    clip_x0: float | None = None
    slice_noise_correlation: float = 0.0
    condition_posterior: str = "mean"
    informed_guidance: float = 1.0
    batch_windows: int = 1
    informed_start: float = 1.0
    label_start: float | None = None
    window_informed: str = "nearest"

    def __post_init__(self):
        make_schedule(self.sampler, alphas_cumprod_tensor(), self.steps, eta=self.eta)  # validates eagerly
        validate_sample_options(self.clip_x0, self.slice_noise_correlation)
        if self.condition_posterior not in CONDITION_POSTERIORS:
            raise ValueError(f"condition_posterior={self.condition_posterior!r} is not one of {list(CONDITION_POSTERIORS)}")
        if self.known_noise not in NOISE_LEVELS:
            raise ValueError(f"known_noise={self.known_noise!r} is not one of {list(NOISE_LEVELS)}")
        if not float(self.informed_guidance) >= 0.0:
            raise ValueError(f"informed_guidance must be >= 0 (1 = off), got {self.informed_guidance!r}")
        if not 0.0 < float(self.informed_start) <= 1.0:
            raise ValueError(f"informed_start must lie in (0, 1] (1 = off: from pure noise), got {self.informed_start!r}")
        if self.known_noise == "original" and float(self.informed_start) < 1.0:
            raise ValueError(
                f"known_noise='original' with informed_start={self.informed_start!r}: the original's known-frame noise "
                f"level follows the step index of a run from pure noise, so a run that starts mid-schedule would noise "
                f"its known frames as if at the start; use known_noise='timestep' or informed_start=1"
            )
        if self.label_start is not None and not float(self.informed_start) <= float(self.label_start) <= 1.0:
            raise ValueError(f"label_start must be None or lie in [informed_start, 1] = [{self.informed_start}, 1], "
                             f"got {self.label_start!r}")
        if not isinstance(self.batch_windows, int) or isinstance(self.batch_windows, bool) or self.batch_windows < 1:
            raise ValueError(f"batch_windows must be an int >= 1, got {self.batch_windows!r}")
        if self.window < 2 or not 0 <= self.overlap < self.window:
            raise ValueError(f"need window >= 2 and 0 <= overlap < window, got window={self.window}, overlap={self.overlap}")

    def noise(self, shape, generator: torch.Generator, device) -> torch.Tensor:
        """Seeded starting noise ``(B, F, C, h, w)`` drawn on the generator's device, then moved (same numbers on
        any device), correlated across slices by ``slice_noise_correlation``."""
        rho = self.slice_noise_correlation
        return slice_correlated_noise(shape, rho, generator=generator, device=generator.device).to(device)

    def sample(self, eps_fn, x_T, model, *, known=None, generator=None, progress=False, init=None, label_region=None):
        """Run the chosen sampler on ``x_T (B, F, C, h, w)`` (from ``init`` when ``informed_start`` < 1; the
        labelled structures ``label_region (B, F, 1, h, w)`` from ``label_start``) on
        ``model``'s schedule (its ``alphas_cumprod``) and objective (its ``prediction_type``: a v model is always
        sampled as one)."""
        prediction_type = getattr(model, "prediction_type", "epsilon")  # every Denoiser has one; stand-ins: eps
        schedule = make_schedule(self.sampler, model.alphas_cumprod.to(x_T.device), self.steps, eta=float(self.eta),
                                 prediction_type=prediction_type)
        return sample(eps_fn, x_T, schedule, known=known, generator=generator, progress=progress,
                      clip_x0=self.clip_x0, slice_noise_correlation=self.slice_noise_correlation,
                      init=init, strength=float(self.informed_start), label_region=label_region,
                      label_strength=None if self.label_start is None else float(self.label_start))


@torch.no_grad()
def encode_slices(model, slices: torch.Tensor, progress: bool = False, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Grey slices ``(D, S, S)`` (a grey mask volume, real slices in [-1, 1]) -> latents ``(D, C, h, w)`` (chunked
    encode; posterior mean, as in training, or a posterior draw with ``sample``)."""
    x = rearrange(slices.to(model.device, torch.float32), "d h w -> d 1 h w")
    return model.first_stage.encode(x, sample=sample, generator=generator, progress=progress)


@torch.no_grad()
def decode_volume(model, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``(D, C, h, w)`` -> grey volume ``(D, S, S)`` clamped to [-1, 1], on the CPU. Decoded ``chunk_size``
    slices at a time, each chunk reduced to grey and moved off the device at once, so device memory holds one chunk's
    activations whatever D."""
    chunks = latents.split(model.first_stage.chunk_size)
    grey = [model.first_stage.decode_grey(chunk.to(model.device)).clamp(-1.0, 1.0).cpu() for chunk in chunks]
    return rearrange(torch.cat(grey), "d 1 h w -> d h w")


@dataclass(frozen=True, eq=False)
class VolumeCase:
    """What the sampler needs to know about one volume (a :class:`~gem3d.sampling.propagation.WindowJob`'s ``case``):
    ``mask_latent (D, C, h, w)``, the ``generator`` its noise comes from, ``start_latent (D, C, h, w)``
    (:func:`informed_start_latents`) or None and ``label_region (D, 1, h, w)`` (:func:`label_region_latent`, for
    ``label_start``) or None."""

    mask_latent: torch.Tensor
    generator: torch.Generator
    start_latent: torch.Tensor | None = None
    label_region: torch.Tensor | None = None


@torch.no_grad()
def informed_start_latents(model, informed_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Where ``informed_start`` begins each slice: the informed slice ``(S, S)`` in [-1, 1] on each slice's body
    tissue (``labels (D, S, S)`` 0), the informed slice's mean inside the body on the labelled structures (> 0: the
    mask, not the informed slice's pixels, says what is there), background (-1) outside the body (-1); encoded ->
    ``(D, C, h, w)`` (posterior mean). The body is the labels' (>= 0 on any slice), not the informed slice's bright
    pixels (dark tissue such as air in the lungs would count as outside)."""
    labels, informed_image = torch.as_tensor(labels), torch.as_tensor(informed_image).float()
    in_body = (labels >= 0).any(dim=0)
    grey = informed_image[in_body].mean() if in_body.any() else informed_image.new_tensor(0.0)
    images = torch.where(labels > 0, grey, torch.where(labels == 0, informed_image[None], -1.0))
    return encode_slices(model, images)


def label_region_latent(labels: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``labels (D, S, S)`` -> ``(D, 1, h, w)`` float: 1 where a latent pixel's ``S/h x S/w`` patch holds a labelled
    voxel (> 0), else 0 (for ``label_start``)."""
    labels = torch.as_tensor(np.asarray(labels))
    factor = (labels.shape[1] // latent_hw[0], labels.shape[2] // latent_hw[1])
    if labels.shape[1:] != (latent_hw[0] * factor[0], latent_hw[1] * factor[1]):
        raise ValueError(f"labels of in-plane shape {tuple(labels.shape[1:])} do not tile the latent grid {latent_hw}")
    labelled = rearrange((labels > 0).float(), "d h w -> d 1 h w")
    return F.max_pool2d(labelled, kernel_size=factor, stride=factor)


def volume_propagation(model, mask_latent: torch.Tensor, informed_latent: torch.Tensor | None, start: int | None,
                       options: SamplerOptions, generator: torch.Generator,
                       start_latent: torch.Tensor | None = None,
                       label_region: torch.Tensor | None = None) -> Propagation:
    """One volume's :func:`~gem3d.sampling.propagation.propagation`, for ``run_lockstep(partial(sample_rounds, model,
    options), ...)``. ``mask_latent (D, C, h, w)``; ``informed_latent (C, h, w)`` at slice index ``start`` (GEM-3D),
    or None with a mask-only (baseline) model, whose windows are sampled independently (the paper's baseline);
    ``start_latent (D, C, h, w)``: :func:`informed_start_latents`, used when ``options.informed_start`` < 1;
    ``label_region (D, 1, h, w)``: :func:`label_region_latent`, used with ``options.label_start``."""
    mode = "informed" if model.spec.use_informed else "base"
    return propagation(mask_latent.shape[0], start, informed_latent, options.window, options.overlap, mode=mode,
                       case=VolumeCase(mask_latent, generator, start_latent, label_region),
                       window_informed=options.window_informed)


@torch.no_grad()
def sample_rounds(model, options: SamplerOptions, rounds: list[list[WindowJob]]) -> list[list[torch.Tensor]]:
    """One round of windows of each of several volumes (of :func:`volume_propagation`) -> per volume, its windows'
    latents ``(F, C, h, w)``. Volumes share UNet calls, yet each draws its noise from its own generator in the order
    it would alone (its result does not depend on who shares its calls): so only volumes whose windows have one
    length and either all or none known frames (only those draw known-frame noise) share a call, and without
    ``batch_directions`` each volume's windows go through calls one after another."""
    calls = [[jobs] if options.batch_directions else [[job] for job in jobs] for jobs in rounds]
    outputs: list[list[torch.Tensor]] = [[] for _ in rounds]
    for k in range(max(map(len, calls))):
        groups = defaultdict(list)
        for i, volume_calls in enumerate(calls):
            if k < len(volume_calls):
                jobs = volume_calls[k]
                groups[len(jobs[0].indices), any(job.known_latents for job in jobs)].append(i)
        for ids in groups.values():
            sampled = _sample_batch(model, options, [calls[i][k] for i in ids])
            for i, out in zip(ids, sampled.split([len(calls[i][k]) for i in ids])):
                outputs[i].extend(out)
    return outputs


def _sample_batch(model, options: SamplerOptions, calls: list[list[WindowJob]]) -> torch.Tensor:
    """One sampler run over the windows of ``calls`` (one list per volume) -> ``(B, F, C, h, w)``. A job's ``case`` is
    its volume's :class:`VolumeCase`."""
    jobs = [job for call in calls for job in call]
    latent_hw = jobs[0].case.mask_latent.shape[-2:]  # the mask's condition may have other channels than the latents
    shape = (len(jobs[0].indices), int(model.first_stage.latent_channels), *latent_hw)
    x_T = torch.cat([options.noise((len(call), *shape), call[0].case.generator, model.device) for call in calls])
    masks = torch.stack([job.case.mask_latent[job.indices] for job in jobs]).to(model.device)
    informed = informed_latents_for_jobs(jobs, model.device)
    cond = model.condition(masks, informed)
    if informed is not None and float(options.informed_guidance) != 1.0:  # informed-slice guidance
        null = model.condition(masks, model.null_informed_latent(informed))
        eps_fn = model.model_fn(cond, null, float(options.informed_guidance))
    else:
        eps_fn = model.model_fn(cond)
    known = known_frames_for_jobs(jobs, shape[1:], options.known_noise, device=model.device)
    generators = [job.case.generator for job in jobs]  # one per window: each volume's noise from its own generator
    init, region = (_window_stack([getattr(job.case, name) for job in jobs], jobs, model.device)
                    for name in ("start_latent", "label_region"))
    return options.sample(eps_fn, x_T, model, known=known, generator=generators, init=init, label_region=region)


def _window_stack(per_volume: list[torch.Tensor | None], jobs: list[WindowJob], device) -> torch.Tensor | None:
    """Each job's window (its ``indices``) of its volume's ``(D, ...)`` tensor, stacked -> ``(B, F, ...)`` on
    ``device``; None when any volume has none."""
    if any(t is None for t in per_volume):
        return None
    return torch.stack([t[job.indices] for t, job in zip(per_volume, jobs)]).to(device)


@torch.no_grad()
def sample_volume_latents(model, mask_latent: torch.Tensor, informed_latent: torch.Tensor | None, start: int | None,
                          options: SamplerOptions, generator: torch.Generator,
                          start_latent: torch.Tensor | None = None,
                          label_region: torch.Tensor | None = None) -> torch.Tensor:
    """All slice latents ``(D, C, h, w)`` of one volume (arguments as :func:`volume_propagation`)."""
    steps = volume_propagation(model, mask_latent, informed_latent, start, options, generator, start_latent,
                               label_region)
    return next(run_lockstep(partial(sample_rounds, model, options), [steps]))


@torch.no_grad()
def sample_slice_latents(slice_model, positions: torch.Tensor, latent_hw: tuple[int, int], options: SamplerOptions,
                         generator: torch.Generator, batch_size: int = 16) -> torch.Tensor:
    """Latents ``(N, C, h, w)`` of slices generated by the position-conditioned slice model at relative positions
    ``positions (N,)`` in [0, 1]; ``latent_hw`` = the slice size / the first stage's factor."""
    if slice_model.spec.conditioning != "crossattn":
        raise ValueError(f"the slice model must be a position variant, got {slice_model.variant!r}")
    positions = torch.as_tensor(positions, dtype=torch.float32).reshape(-1)
    if positions.numel() and (positions.min() < 0 or positions.max() > 1):
        raise ValueError(f"positions must lie in [0, 1], got {positions.tolist()}")
    c, (h, w) = slice_model.first_stage.latent_channels, latent_hw
    outputs = []
    for chunk in positions.split(batch_size):
        x_T = options.noise((len(chunk), 1, c, h, w), generator, slice_model.device)
        cond = slice_model.condition(pos=chunk)
        out = options.sample(slice_model.model_fn(cond), x_T, slice_model, generator=generator)
        outputs.append(rearrange(out, "b 1 c h w -> b c h w"))
    return torch.cat(outputs) if outputs else torch.empty(0, c, h, w)
