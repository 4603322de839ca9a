"""gem3d.inference.volume: sampling whole volumes with a model (fake denoisers and tiny models)."""
from __future__ import annotations

from functools import partial
from itertools import compress
from types import SimpleNamespace

import pytest
import torch

from gem3d.denoiser import VARIANTS
from gem3d.inference.volume import (
    SamplerOptions,
    decode_volume,
    encode_slices,
    sample_rounds,
    sample_slice_latents,
    sample_volume_latents,
    volume_propagation,
)
from gem3d.sampling.propagation import plan_windows, run_lockstep
from gem3d.sampling.schedule import alphas_cumprod_tensor
from tests import _tiny_models

C, H, W = 4, 3, 3


class FakeModel:
    """A stand-in for Gem3dLDM whose denoiser predicts ``x0 = mask latent (+ informed latent)`` exactly.

    DPM-Solver++ ends on sigma 0, so a sampled slice is exactly that target, whatever the noise: the result does not
    depend on the order of random draws, and the propagation can be checked value by value.
    """

    device = torch.device("cpu")
    first_stage = SimpleNamespace(latent_channels=C)  # the sampled latents' channels (the masks' here too)

    def __init__(self, variant: str):
        self.variant = variant
        self.spec = VARIANTS[variant]
        self.alphas_cumprod = alphas_cumprod_tensor()
        self.batch_sizes: list[int] = []

    def condition(self, mask_latent, informed_latent=None):
        assert mask_latent.ndim == 5
        target = mask_latent if informed_latent is None else mask_latent + informed_latent[:, None]
        return {"target": target}

    def model_fn(self, cond):
        target = cond["target"]

        def eps_fn(x, t):
            self.batch_sizes.append(x.shape[0])
            a = self.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1).to(x.dtype)
            return (x - a.sqrt() * target) / (1 - a).sqrt()

        return eps_fn


def _mask_latent(num_slices: int) -> torch.Tensor:
    """Distinct per-slice values so a slice in the wrong place is caught."""
    values = torch.arange(num_slices, dtype=torch.float32)
    return values.reshape(-1, 1, 1, 1).expand(num_slices, C, H, W).clone()


def _sample(model, num_slices, start, informed, batch_directions=True, window=4, overlap=1, seed=0):
    options = SamplerOptions(sampler="dpmpp", steps=3, window=window, overlap=overlap, batch_directions=batch_directions)
    return sample_volume_latents(model, _mask_latent(num_slices), informed, start, options, torch.Generator().manual_seed(seed))


def _expected_informed(num_slices: int, start: int, informed: float, window: int, overlap: int) -> torch.Tensor:
    """What FakeModel must produce: each window's new slices = their mask + the window's informed latent, which is
    the real informed slice for the first window and the generated slice at the window's informed index otherwise."""
    mask = _mask_latent(num_slices)
    out: list[torch.Tensor | None] = [None] * num_slices
    up, down = plan_windows(num_slices, start, window, overlap)
    for win in up + down:  # upward windows depend on earlier upward ones, downward ones on the first and earlier ones
        inf = torch.full((C, H, W), informed) if win.informed_index is None else out[win.informed_index]
        for index in compress(win.indices, win.write):
            out[index] = mask[index] + inf
    return torch.stack(out)


@pytest.mark.parametrize(
    "num_slices,start,window,overlap",
    [(24, 0, 4, 1), (24, 23, 4, 1), (24, 10, 16, 1), (5, 2, 16, 1), (17, 8, 6, 2), (1, 0, 4, 0)],
)
def test_informed_windows_cover_every_slice_once_with_the_right_condition(num_slices, start, window, overlap):
    model = FakeModel("volume_stage")
    informed = torch.full((C, H, W), 100.0)
    latents = _sample(model, num_slices, start, informed, window=window, overlap=overlap)
    assert latents.shape == (num_slices, C, H, W)
    expected = _expected_informed(num_slices, start, 100.0, window, overlap)
    torch.testing.assert_close(latents, expected, atol=1e-3, rtol=1e-4)
    # the informed slice's own index comes from the first window: its mask + the real informed latent
    torch.testing.assert_close(latents[start], _mask_latent(num_slices)[start] + 100.0, atol=1e-3, rtol=1e-4)


class NoiseDependentModel(FakeModel):
    """FakeModel whose x0 prediction also depends on its input, ``x0 = target + sin(x)``: every sampled slice then
    depends on the noise it was drawn from, so noise given to the wrong window (or in another order) shows."""

    def model_fn(self, cond):
        target = cond["target"]

        def eps_fn(x, t):
            self.batch_sizes.append(x.shape[0])
            a = self.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1).to(x.dtype)
            return (x - a.sqrt() * (target + torch.sin(x))) / (1 - a).sqrt()

        return eps_fn


def _noise_dependent_volume(batch_directions: bool, seed: int, overlap: int) -> tuple[torch.Tensor, list[int]]:
    model = NoiseDependentModel("volume_stage")
    options = SamplerOptions(sampler="ddim", steps=4, eta=0.0, window=4, overlap=overlap,
                             batch_directions=batch_directions)
    latents = sample_volume_latents(model, _mask_latent(24), torch.full((C, H, W), 7.0), 12, options,
                                    torch.Generator().manual_seed(seed))
    return latents, model.batch_sizes


def test_batching_directions_on_and_off_give_the_same_volume_when_only_the_start_noise_is_random():
    """DDIM with eta 0 and windows that tile the volume exactly (24 slices from 12, window 4, overlap 0: no known
    frames) draw nothing but each window's starting noise, in the same order whether the directions share calls or
    not: the volumes agree, with a model whose output depends on that noise."""
    up, down = plan_windows(24, 12, 4, 0)
    assert not any(any(window.known) for window in up + down)
    on, on_batches = _noise_dependent_volume(True, seed=0, overlap=0)
    off, off_batches = _noise_dependent_volume(False, seed=0, overlap=0)
    other_seed, _ = _noise_dependent_volume(True, seed=1, overlap=0)
    assert (on - other_seed).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # every slice depends on the noise
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)
    assert max(on_batches) == 2  # the upward and downward windows went into one batch
    assert max(off_batches) == 1
    assert len(on_batches) < len(off_batches)


def test_batching_directions_with_known_frames_is_seeded_in_both_modes():
    """With known frames every step draws their noise, and sharing a call interleaves the two directions' draws: the
    volume is then another sample with batching than without, but each mode repeats itself for a seed."""
    for batch_directions in (True, False):
        first, _ = _noise_dependent_volume(batch_directions, seed=0, overlap=1)
        again, _ = _noise_dependent_volume(batch_directions, seed=0, overlap=1)
        other, _ = _noise_dependent_volume(batch_directions, seed=1, overlap=1)
        assert torch.equal(first, again)
        assert not torch.allclose(first, other)


def test_baseline_mode_samples_each_slice_from_its_own_mask_without_informed_slice():
    model = FakeModel("baseline_volume")
    latents = _sample(model, 10, None, None, window=4)
    assert latents.shape == (10, C, H, W)
    torch.testing.assert_close(latents, _mask_latent(10), atol=1e-3, rtol=1e-4)


def test_informed_slice_presence_must_match_the_variant():
    with pytest.raises(ValueError, match="needs informed_latent as a tensor"):
        _sample(FakeModel("volume_stage"), 8, 0, None)
    with pytest.raises(ValueError, match="without an informed slice"):
        _sample(FakeModel("baseline_volume"), 8, 0, torch.zeros(C, H, W))


def test_ddim_with_noise_is_seeded():
    model = FakeModel("volume_stage")
    informed = torch.zeros(C, H, W)
    options = SamplerOptions(sampler="ddim", steps=2, eta=1.0, window=4)
    runs = [sample_volume_latents(model, _mask_latent(9), informed, 4, options, torch.Generator().manual_seed(s))
            for s in (0, 0, 1)]
    assert runs[0].shape == (9, C, H, W)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    "kwargs,match",
    [({"sampler": "euler"}, "sampler='euler'"), ({"steps": 0}, "steps"), ({"steps": 3}, "steps=3"), ({"known_noise": "x"}, "known_noise"),
     ({"eta": -1.0}, "eta"), ({"window": 4, "overlap": 4}, "overlap"), ({"clip_x0": -1.0}, "clip_x0"),
     ({"slice_noise_correlation": 1.0}, r"slice_noise_correlation must be a float in \[0, 1\), got 1.0")],
)
def test_sampler_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerOptions(**kwargs)


def test_sampler_options_noise_is_the_former_seeded_draw_and_correlated_on_request():
    shape = (2, 6, C, 8, 8)
    plain = SamplerOptions().noise(shape, torch.Generator().manual_seed(4), "cpu")
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(4)))
    correlated = SamplerOptions(slice_noise_correlation=0.7).noise(shape, torch.Generator().manual_seed(4), "cpu")
    assert torch.equal(correlated[:, 0], plain[:, 0]) and not torch.allclose(correlated[:, 1:], plain[:, 1:])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_clip_x0_reaches_the_sampler(sampler):
    """The fake denoiser's x0 is the mask latent (slice index 0..8): clipping at 2.5 changes the high slices."""
    model, informed = FakeModel("volume_stage"), torch.zeros(C, H, W)
    runs = [sample_volume_latents(model, _mask_latent(9), informed, 4,
                                  SamplerOptions(sampler=sampler, steps=4, window=4, clip_x0=clip),
                                  torch.Generator().manual_seed(0)) for clip in (None, 1e30, 2.5)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - runs[2]).abs().max() > 1


# ---------------------------------------------------------------------------------------------- tiny real models


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return _tiny_models.tiny_setup(tmp_path_factory)


def test_tiny_models_encode_sample_and_decode_a_volume(tiny):
    from gem3d.model_dirs import load_model_dir

    volume = load_model_dir(tiny["volume_stage"]).model
    slice_model = load_model_dir(tiny["position"]).model
    grey_mask = torch.rand(7, 32, 32) * 2 - 1
    mask_latent = encode_slices(volume, grey_mask)
    assert mask_latent.shape == (7, 4, 8, 8)
    informed = encode_slices(volume, grey_mask[3:4])[0]
    assert informed.shape == (4, 8, 8)
    options = SamplerOptions(steps=2, window=4)
    latents = sample_volume_latents(volume, mask_latent, informed, 3, options, torch.Generator().manual_seed(0))
    assert latents.shape == (7, 4, 8, 8) and torch.isfinite(latents).all()
    decoded = decode_volume(volume, latents)
    assert decoded.shape == (7, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1

    # informed-slice guidance: W = 1 is the plain model; another W changes the volume; a bad W is refused
    plain_again = sample_volume_latents(volume, mask_latent, informed, 3, SamplerOptions(steps=2, window=4, informed_guidance=1.0),
                                        torch.Generator().manual_seed(0))
    guided = sample_volume_latents(volume, mask_latent, informed, 3, SamplerOptions(steps=2, window=4, informed_guidance=4.0),
                                   torch.Generator().manual_seed(0))
    assert torch.equal(plain_again, latents) and guided.shape == latents.shape and not torch.allclose(guided, latents)
    with pytest.raises(ValueError, match="informed_guidance"):
        SamplerOptions(informed_guidance=-1.0)

    slices = sample_slice_latents(slice_model, torch.tensor([0.0, 0.5, 1.0]), (8, 8), options,
                                  torch.Generator().manual_seed(0), batch_size=2)
    assert slices.shape == (3, 4, 8, 8) and torch.isfinite(slices).all()
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 1\]"):
        sample_slice_latents(slice_model, torch.tensor([1.5]), (8, 8), options, torch.Generator())
    with pytest.raises(ValueError, match="position variant"):
        sample_slice_latents(volume, torch.tensor([0.5]), (8, 8), options, torch.Generator())


@pytest.mark.parametrize("overlap,batch_directions", [(1, True), (0, True), (1, False)])
def test_volumes_sampled_together_match_each_volume_sampled_alone(tiny, overlap, batch_directions):
    """batch_windows: the windows of several volumes (different lengths, starts, seeds) share UNet calls, and each
    volume draws its noise (DDIM eta 1) from its own generator: the same volume whichever share its calls."""
    from gem3d.model_dirs import load_model_dir

    model = load_model_dir(tiny["volume_stage"]).model
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    conditions = torch.Generator().manual_seed(5)
    volumes = [(torch.randn(n, 4, 8, 8, generator=conditions), torch.randn(4, 8, 8, generator=conditions), start)
               for n, start in ((7, 3), (12, 0), (9, 8))]
    options = SamplerOptions(steps=2, eta=1.0, window=4, overlap=overlap, batch_directions=batch_directions)
    rounds = partial(sample_rounds, model, options)

    def steppers():
        return [volume_propagation(model, mask, informed, start, options, torch.Generator().manual_seed(seed))
                for seed, (mask, informed, start) in enumerate(volumes)]

    alone = [next(run_lockstep(rounds, [stepper])) for stepper in steppers()]
    (calls_alone, widest_alone), calls[:] = (len(calls), max(calls)), []
    assert torch.equal(alone[0], sample_volume_latents(model, *volumes[0], options, torch.Generator().manual_seed(0)))
    for batch in (2, 3):
        calls.clear()
        together = sorted(run_lockstep(rounds, steppers(), batch), key=len)
        for volume, expected in zip(together, sorted(alone, key=len)):
            torch.testing.assert_close(volume, expected, atol=1e-5, rtol=1e-5)
        assert len(calls) < calls_alone and max(calls) > widest_alone  # fewer, wider UNet calls
    hook.remove()
