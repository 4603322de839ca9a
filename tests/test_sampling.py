"""Tests for gem3d.sampling.schedule and gem3d.sampling.samplers."""

from __future__ import annotations

import inspect
from dataclasses import fields

import numpy as np
import pytest
import torch
from conftest import ORIGINAL_CLIP_LEN
from diffusers import DDIMScheduler, DDPMScheduler

from gem3d.sampling.samplers import SPACINGS, KnownFrames, make_schedule, sample, slice_correlated_noise
from gem3d.sampling.schedule import alphas_cumprod_tensor, original_ddim_timesteps, trained_betas

SHAPE = (2, 5, 4, 8, 8)  # (B, F, C, h, w)


def sample_ddim(eps_fn, x_T, alphas_cumprod, *, steps, eta=1.0, spacing="original", **options):
    """GEM-3D's DDIM (eta 1 by default) through the shared schedule factory and loop."""
    return sample(eps_fn, x_T, make_schedule("ddim", alphas_cumprod, steps, eta=eta, spacing=spacing), **options)


def sample_dpmpp(eps_fn, x_T, alphas_cumprod, *, steps, **options):
    return sample(eps_fn, x_T, make_schedule("dpmpp", alphas_cumprod, steps), **options)


def ddim_timesteps(steps, spacing):
    return make_schedule("ddim", alphas_cumprod_tensor(), steps, spacing=spacing).timesteps


def formula_betas() -> torch.Tensor:
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return torch.from_numpy(betas).float()


def formula_alphas_cumprod() -> torch.Tensor:
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas)).float()


def analytic_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, timestep- and frame-dependent eps that couples the frames of a clip (through their mean)."""
    assert t.dtype == torch.long and t.shape == (x.shape[0],)
    frame = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1, 1)
    scale = (t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1, 1)
    return 0.6 * torch.tanh(x) + 0.2 * torch.sin(3 * x + frame) * scale + 0.1 * scale + 0.2 * x.mean(1, keepdim=True)


def hand_ddim(eps_fn, x_T, alphas_cumprod, timesteps_ascending, eta=0.0, noises=None):
    """DDIM written from the formulas (docs/method.md, "Sampling a volume"), independent of diffusers."""
    ac = alphas_cumprod.double()
    ts = [int(t) for t in timesteps_ascending]
    prev = [ac[0]] + [ac[t] for t in ts[:-1]]
    x = x_T.double()
    for i in reversed(range(len(ts))):
        t, a_t, a_prev = ts[i], ac[ts[i]], prev[i]
        eps = eps_fn(x.float(), torch.full((x.shape[0],), t, dtype=torch.long)).double()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        if eta > 0:
            x = x + sigma * noises[i]
    return x.float()


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_equals_formula_float64_stored_float32():
    assert torch.equal(alphas_cumprod_tensor(), formula_alphas_cumprod())
    # diffusers' own scaled_linear is the same formula in float32: equal up to float32 rounding only
    plain = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(plain.betas, formula_betas(), rtol=0, atol=1e-8)
    assert torch.allclose(plain.alphas_cumprod, formula_alphas_cumprod(), rtol=0, atol=1e-6)


def test_schedule_equals_original_checkpoint_buffers(original_fixtures):
    sd = torch.load(original_fixtures / "stage1" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(sd["betas"], formula_betas())
    assert torch.equal(sd["alphas_cumprod"], alphas_cumprod_tensor())


def test_original_ddim_timesteps():
    assert original_ddim_timesteps(10).tolist() == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    t200 = original_ddim_timesteps(200)
    assert len(t200) == 200 and t200[0] == 1 and t200[-1] == 996 and t200.dtype == torch.long
    assert original_ddim_timesteps(30).tolist() == [1 + 33 * k for k in range(31)]  # as the original: 31 entries
    with pytest.raises(ValueError, match="steps"):
        original_ddim_timesteps(0)
    with pytest.raises(ValueError, match="beyond the last training timestep"):
        original_ddim_timesteps(3)  # 0, 333, 666, 999 -> 1000


def test_ddim_timesteps_spacings():
    # diffusers DDIMScheduler(leading, steps_offset=1) gives exactly the original's timesteps
    assert ddim_timesteps(10, "original").tolist() == list(range(901, 0, -100))
    assert ddim_timesteps(10, "leading").tolist() == list(range(901, 0, -100))
    assert ddim_timesteps(200, "original").tolist() == original_ddim_timesteps(200).flip(0).tolist()
    assert ddim_timesteps(10, "diffusers").tolist() == list(range(999, 0, -100))
    with pytest.raises(ValueError, match="spacing must be one of"):
        ddim_timesteps(10, "uniform")


# ---------------------------------------------------------------------------------------------- DDIM


def test_one_shared_sampler_signature_and_schedule_factory():
    params = inspect.signature(sample).parameters
    assert list(params)[:3] == ["eps_fn", "x", "schedule"]
    for name in ("known", "generator", "progress", "clip_x0", "slice_noise_correlation"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert SPACINGS["ddim"][0] == "original" and SPACINGS["dpmpp"][0] == "linspace"
    with pytest.raises(ValueError, match=r"sampler='euler' is not one of \['ddim', 'dpmpp'\]"):
        make_schedule("euler", alphas_cumprod_tensor(), 10)
    with pytest.raises(ValueError, match=r"spacing must be one of \('linspace', 'leading', 'trailing'\).*'original'"):
        make_schedule("dpmpp", alphas_cumprod_tensor(), 10, spacing="original")
    with pytest.raises(ValueError, match="order must be one of"):
        make_schedule("dpmpp", alphas_cumprod_tensor(), 10, order=4)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_schedule_gives_diffusers_the_exact_alphas_cumprod_through_its_config(sampler):
    for ac in (alphas_cumprod_tensor(), alphas_cumprod_tensor(500, 0.0001, 0.02)):
        schedule = make_schedule(sampler, ac, 10)
        assert torch.equal(schedule.scheduler.alphas_cumprod, ac)
        assert np.array_equal(np.asarray(schedule.scheduler.config.trained_betas, np.float32), trained_betas(ac))
    assert np.abs(trained_betas(alphas_cumprod_tensor()) - formula_betas().numpy()).max() < 3e-7  # a few float32 steps


def test_a_schedule_can_be_reused():
    ac, x_T = alphas_cumprod_tensor(), torch.randn(SHAPE)
    for schedule in (make_schedule("dpmpp", ac, 6), make_schedule("ddim", ac, 6, eta=1.0)):
        runs = [sample(analytic_eps, x_T, schedule, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
        assert torch.equal(*runs)


def test_ddim_eta0_matches_hand_written_loop():
    ac = alphas_cumprod_tensor()
    x_T = torch.randn(SHAPE)
    for steps in (10, 25, 30):  # 30: the original spacing has 31 timesteps (1000 // 30 = 33 apart)
        out = sample_ddim(analytic_eps, x_T, ac, steps=steps, eta=0.0, progress=steps == 10)
        ref = hand_ddim(analytic_eps, x_T, ac, original_ddim_timesteps(steps))
        assert out.shape == x_T.shape
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_ddim_calls_model_with_original_timesteps():
    seen = []

    def eps_fn(x, t):
        seen.append(t.clone())
        return analytic_eps(x, t)

    sample_ddim(eps_fn, torch.randn(SHAPE), alphas_cumprod_tensor(), steps=10, eta=0.0)
    assert [int(t[0]) for t in seen] == list(range(901, 0, -100))
    assert all(t.shape == (SHAPE[0],) and torch.all(t == t[0]) for t in seen)


def test_ddim_eta1_matches_hand_written_loop_with_same_noise():
    ac = alphas_cumprod_tensor()
    x_T = torch.randn(SHAPE)
    out = sample_ddim(analytic_eps, x_T, ac, steps=10, eta=1.0, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    noises_in_step_order = [torch.randn(SHAPE, generator=gen).double() for _ in range(10)]
    ref = hand_ddim(analytic_eps, x_T, ac, original_ddim_timesteps(10), eta=1.0, noises=noises_in_step_order[::-1])
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


def test_ddim_eta1_seeded_determinism():
    ac, x_T = alphas_cumprod_tensor(), torch.randn(SHAPE)
    a = sample_ddim(analytic_eps, x_T, ac, steps=10, generator=torch.Generator().manual_seed(3))
    b = sample_ddim(analytic_eps, x_T, ac, steps=10, generator=torch.Generator().manual_seed(3))
    c = sample_ddim(analytic_eps, x_T, ac, steps=10, generator=torch.Generator().manual_seed(4))
    d = sample_ddim(analytic_eps, x_T, ac, steps=10, eta=0.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)


def test_ddim_validation_messages():
    ac, x_T = alphas_cumprod_tensor(), torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"x_T must be a tensor \(B,F,C,h,w\)"):
        sample_ddim(analytic_eps, x_T[0], ac, steps=10)
    with pytest.raises(ValueError, match="steps must be an int in"):
        sample_ddim(analytic_eps, x_T, ac, steps=0)
    with pytest.raises(ValueError, match="eta must be"):
        sample_ddim(analytic_eps, x_T, ac, steps=10, eta=-1.0)
    with pytest.raises(ValueError, match="noise_level must be one of"):
        KnownFrames(torch.zeros(2, 5, dtype=torch.bool), torch.zeros(SHAPE), noise_level="index")
    with pytest.raises(ValueError, match="eps_fn returned shape"):
        sample_ddim(lambda x, t: x[:, :1], x_T, ac, steps=2)


# ---------------------------------------------------------------------------------------------- known frames


def make_known():
    mask = torch.zeros(SHAPE[:2], dtype=torch.bool)
    mask[0, 0] = True  # upward window: the first frame is known
    mask[1, -2:] = True  # downward window: the last two frames are known
    return mask, torch.randn(SHAPE)


@pytest.mark.parametrize("noise_level", ["timestep", "original"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_known_frames_are_returned_exactly(sampler, noise_level):
    mask, latents = make_known()
    known = KnownFrames(mask, latents, noise_level)
    x_T = torch.randn(SHAPE)
    kwargs = dict(steps=8, known=known, generator=torch.Generator().manual_seed(0))
    fn = sample_ddim if sampler == "ddim" else sample_dpmpp
    out = fn(analytic_eps, x_T, alphas_cumprod_tensor(), **kwargs)
    assert torch.equal(out[mask], latents[mask])
    free = fn(analytic_eps, x_T, alphas_cumprod_tensor(), steps=8, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out[~mask], free[~mask])  # the known frames steer the others
    again = fn(analytic_eps, x_T, alphas_cumprod_tensor(), **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert torch.equal(out, again)


@pytest.mark.parametrize("noise_level", ["timestep", "original"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_known_frames_noise_level_seen_by_the_model(sampler, noise_level):
    """The model sees the known frames at the clip's timestep ("timestep") or at alphas_cumprod[step index], with
    either sampler."""
    ac = alphas_cumprod_tensor()
    steps = 10
    mask = torch.zeros(1, 3, dtype=torch.bool)
    mask[0, 0] = True
    # a huge constant latent makes the noise negligible: the known frame / z0 ~ sqrt(alpha)
    latents = torch.full((1, 3, 1, 4, 4), 1.0e4)
    seen = []

    def eps_fn(x, t):
        seen.append((int(t[0]), float(x[0, 0].mean()) / 1.0e4))
        return torch.zeros_like(x)

    known = KnownFrames(mask, latents, noise_level)
    if sampler == "ddim":
        sample_ddim(eps_fn, torch.randn(1, 3, 1, 4, 4), ac, steps=steps, eta=0.0, known=known)
        expected_timesteps = list(range(901, 0, -100))
    else:
        sample_dpmpp(eps_fn, torch.randn(1, 3, 1, 4, 4), ac, steps=steps, known=known)
        expected_timesteps = [int(t) for t in make_schedule("dpmpp", ac, steps).timesteps]
        assert expected_timesteps[0] == 999 and len(set(expected_timesteps)) == steps  # linspace from the end
    timesteps = [t for t, _ in seen]
    assert timesteps == expected_timesteps
    for k, (t, ratio) in enumerate(seen):
        if noise_level == "timestep":
            expected = float(ac[t]) ** 0.5
        else:
            expected = float(ac[-1]) ** 0.5 if k == 0 else float(ac[steps - k]) ** 0.5  # after step index steps-k
        assert abs(ratio - expected) < 1e-3, (k, t, ratio, expected)


def test_dpmpp_runs_deterministically_and_denoises_a_fixed_point():
    ac = alphas_cumprod_tensor()
    z0 = torch.randn(SHAPE)
    noise = torch.randn(SHAPE)

    def oracle_eps(x, t):  # the exact eps for data concentrated at z0
        a = ac[t].view(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * z0) / (1 - a).sqrt()

    x_T = ac[999].sqrt() * z0 + (1 - ac[999]).sqrt() * noise
    out = sample_dpmpp(oracle_eps, x_T, ac, steps=10)
    assert torch.allclose(out, z0, atol=1e-4)
    assert torch.equal(out, sample_dpmpp(oracle_eps, x_T, ac, steps=10))


# ---------------------------------------------------------------------------------------------- fixtures (the UNet)


def _original_config(model_dir):
    from omegaconf import OmegaConf

    return OmegaConf.load(next((model_dir / "configs").glob("*.yaml")))


def _build_original_unet(model_dir):
    from omegaconf import OmegaConf

    from gem3d.models.unet import UNetConfig, UNetModel

    unet_config = _original_config(model_dir).model.params.unet_config
    params = OmegaConf.to_container(unet_config.params)
    accepted = {f.name for f in fields(UNetConfig)}
    kwargs = {k: v for k, v in params.items() if k in accepted}
    # the original builds attention only at the rates its levels reach (1, 2, 4, ...); others are inert
    reachable = [2**level for level in range(len(kwargs["channel_mult"]))]
    kwargs["attention_resolutions"] = [r for r in kwargs["attention_resolutions"] if r in reachable]
    volumetric = unet_config.target.endswith("openaimodel_pseudo3D.UNetModel")
    unet = UNetModel(**kwargs, volumetric=volumetric)
    sd = torch.load(model_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    prefix = "model.diffusion_model."
    unet.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return unet.eval(), volumetric


@pytest.fixture
def one_thread():
    """The shared 2-core machine: 2 intra-op threads under load run this test ~15x slower than 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ddim_reproduces_original_fixture(original_fixtures, one_thread):
    folders = [p for p in sorted(original_fixtures.iterdir()) if (p / "vectors.pt").is_file()]
    concat = [p for p in folders if _original_config(p).model.params.get("conditioning_key") == "concat"]
    assert [p.name for p in concat] == ["base_stage2", "stage1", "stage2"]
    for model_dir in concat:
        unet, volumetric = _build_original_unet(model_dir)
        v = torch.load(model_dir / "vectors.pt", weights_only=True)
        alphas_cumprod = torch.load(model_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"][
            "alphas_cumprod"]
        rows = v["ddim_xT"].shape[0]
        assert torch.equal(original_ddim_timesteps(int(v["ddim_steps"]), len(alphas_cumprod)), v["ddim_timesteps"])
        # stage 2 / base: clip-major clips of the original's 16 slices; stage 1: independent slices (clips of 1)
        assert not volumetric or rows % ORIGINAL_CLIP_LEN == 0, rows
        clip = (rows // ORIGINAL_CLIP_LEN, ORIGINAL_CLIP_LEN) if volumetric else (rows, 1)
        cond = v["cond"].reshape(*clip, *v["cond"].shape[1:])

        def eps_fn(x, t):
            b, f = x.shape[:2]
            inp = torch.cat([x, cond], dim=2).reshape(b * f, -1, *x.shape[3:])
            out = unet(inp, t.repeat_interleave(f), num_frames=f if volumetric else None)
            return out.reshape(b, f, *out.shape[1:])

        x_T = v["ddim_xT"].reshape(*clip, *v["ddim_xT"].shape[1:])
        with torch.no_grad():
            out = sample_ddim(eps_fn, x_T, alphas_cumprod, steps=int(v["ddim_steps"]), eta=0.0)
        out = out.reshape(rows, *out.shape[2:])
        err = (out - v["ddim_out"]).abs().max().item()
        print(f"{model_dir.name}: max |ddim_out - ours| = {err:.2e}")
        assert err < 1e-4, (model_dir.name, err)


# ---------------------------------------------------------------------------------------------- clip_x0


def large_x0_eps(x, t):
    """An eps whose x0 estimate is far outside [-1, 1] (about 3 x)."""
    return -0.5 * x


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_clip_x0_changes_the_sample_when_active_and_is_a_no_op_when_huge(sampler):
    ac, x_T = alphas_cumprod_tensor(), 3 * torch.randn(SHAPE)
    schedule = make_schedule(sampler, ac, 8, eta=1.0)
    run = lambda **kw: sample(large_x0_eps, x_T, schedule, generator=torch.Generator().manual_seed(1), **kw)  # noqa: E731
    free, clipped = run(), run(clip_x0=1.0)
    assert torch.equal(run(clip_x0=1e30), free)
    assert free.abs().max() > 5 and (clipped - free).abs().max() > 1
    if sampler == "dpmpp":  # DPM-Solver++ ends on its (clipped) data prediction
        assert clipped.abs().max() <= 1.0 + 1e-5


def test_clip_x0_is_diffusers_ddim_clip_sample_with_the_clipped_model_output():
    ac, x_T, steps, bound = alphas_cumprod_tensor(), 3 * torch.randn(SHAPE), 10, 1.5
    out = sample(large_x0_eps, x_T, make_schedule("ddim", ac, steps, eta=0.0), clip_x0=bound)
    reference = DDIMScheduler(num_train_timesteps=1000, trained_betas=trained_betas(ac), clip_sample=True,
                              clip_sample_range=bound, set_alpha_to_one=False, steps_offset=1)
    reference.set_timesteps(steps)
    x = x_T
    for t in reference.timesteps:
        x = reference.step(large_x0_eps(x, t), t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    assert torch.allclose(out, x, atol=1e-5), (out - x).abs().max()
    assert not torch.allclose(out, sample(large_x0_eps, x_T, make_schedule("ddim", ac, steps)), atol=1e-2)



@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_init_with_strength_runs_only_the_last_steps_from_the_noised_init(sampler):
    ac, init = alphas_cumprod_tensor(), torch.randn(SHAPE)
    schedule = make_schedule(sampler, ac, 10, eta=0.0)
    calls = []

    def zero_eps(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    out = sample(zero_eps, torch.zeros(SHAPE), schedule, init=init, strength=0.35)
    assert calls == [int(t) for t in schedule.timesteps[-4:]]  # ceil(0.35 * 10) = 4 steps, the last four
    # no noise and eps = 0: every step rescales, so the result is init at the final level (alphas_cumprod[0] for
    # DDIM without set_alpha_to_one; sigma 0 for DPM-Solver++)
    final = ac[0].sqrt() if sampler == "ddim" else torch.tensor(1.0)
    torch.testing.assert_close(out, final * init, atol=1e-4, rtol=1e-4)
    calls.clear()
    x_T = torch.randn(SHAPE)
    assert torch.equal(sample(zero_eps, x_T, schedule, init=init, strength=1.0), sample(zero_eps, x_T, schedule))
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\] \(1: from pure noise\), got 0"):
        sample(zero_eps, x_T, schedule, init=init, strength=0)

@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_label_strength_starts_the_labelled_region_earlier_and_keeps_the_rest_on_the_noised_init(sampler):
    """label_strength 0.75 with strength 0.35 (10 steps): the last 8 steps run; in the first 4 of them the result
    outside the labelled region is replaced by init noised to the next timestep, so the SDEdit start (the 5th call)
    sees outside exactly init at that level with the 4th noise draw; inside, a run from init at 0.75."""
    ac, init = alphas_cumprod_tensor(), torch.randn(SHAPE)
    schedule = make_schedule(sampler, ac, 10, eta=0.0)
    region = torch.zeros(SHAPE[0], SHAPE[1], 1, *SHAPE[3:])
    region[..., : SHAPE[-1] // 2] = 1.0
    inside = region.expand(SHAPE).bool()
    calls, inputs = [], []

    def zero_eps(x, t):
        calls.append(int(t[0]))
        inputs.append(x.clone())
        return torch.zeros_like(x)

    sample(zero_eps, torch.zeros(SHAPE), schedule, init=init, strength=0.35, label_region=region, label_strength=0.75,
           generator=torch.Generator().manual_seed(3))
    assert calls == [int(t) for t in schedule.timesteps[-8:]]  # ceil(0.75 * 10) = 8
    if sampler == "ddim":  # eta 0 and eps 0: no other noise is drawn, the replacement draws are the generator's
        generator = torch.Generator().manual_seed(3)
        draws = [slice_correlated_noise(SHAPE, 0.0, generator=generator) for _ in range(4)]
        a = ac[calls[4]]
        torch.testing.assert_close(inputs[4][~inside], (a.sqrt() * init + (1 - a).sqrt() * draws[3])[~inside])
        torch.testing.assert_close(inputs[4][inside], (a.sqrt() * init)[inside])  # x_T = 0: init rescaled, no noise
    x_T = torch.randn(SHAPE)
    plain = sample(zero_eps, x_T, schedule, init=init, strength=0.35)
    assert torch.equal(sample(zero_eps, x_T, schedule, init=init, strength=0.35, label_region=region,
                              label_strength=0.35), plain)  # not earlier: plain SDEdit
    assert torch.equal(sample(zero_eps, x_T, schedule, init=init, strength=0.35, label_strength=0.75), plain)
    with pytest.raises(ValueError, match=r"label_strength must lie in \(strength, 1\] \(1: from pure noise\), "
                                         r"got 1.5"):
        sample(zero_eps, x_T, schedule, init=init, strength=0.35, label_region=region, label_strength=1.5)


def test_label_strength_1_starts_the_labelled_region_from_pure_noise():
    ac, init, x_T = alphas_cumprod_tensor(), torch.randn(SHAPE), torch.randn(SHAPE)
    schedule = make_schedule("ddim", ac, 10, eta=0.0)
    region = torch.ones(SHAPE[0], SHAPE[1], 1, *SHAPE[3:])
    inputs = []

    def zero_eps(x, t):
        inputs.append(x.clone())
        return torch.zeros_like(x)

    sample(zero_eps, x_T, schedule, init=init, strength=0.35, label_region=region, label_strength=1.0)
    assert len(inputs) == 10 and torch.equal(inputs[0], x_T)  # every step, from the noise itself


def test_sample_options_are_validated():
    x_T, schedule = torch.randn(SHAPE), make_schedule("ddim", alphas_cumprod_tensor(), 2)
    with pytest.raises(ValueError, match=r"clip_x0 must be None \(off\) or a float > 0, got 0"):
        sample(analytic_eps, x_T, schedule, clip_x0=0)
    with pytest.raises(ValueError, match=r"slice_noise_correlation must be a float in \[0, 1\), got 1.0"):
        sample(analytic_eps, x_T, schedule, slice_noise_correlation=1.0)
    with pytest.raises(ValueError, match=r"known must be None or KnownFrames with latents of x_T's shape"):
        sample(analytic_eps, x_T, schedule, known=KnownFrames(torch.zeros(1, 5, dtype=torch.bool), torch.zeros(1, 5, 4, 8, 8)))


# ---------------------------------------------------------------------------------------------- slice-correlated noise


def lag_correlation(noise, lag):
    a, b = noise[:, :-lag].flatten(), noise[:, lag:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_slice_correlated_noise_is_standard_normal_with_ar1_correlation():
    shape = (64, 8, 4, 16, 16)  # 8192 values per slice and clip
    for rho in (0.0, 0.5, 0.9):
        noise = slice_correlated_noise(shape, rho, generator=torch.Generator().manual_seed(0))
        assert noise.shape == shape
        assert torch.allclose(noise.var(dim=(0, 2, 3, 4)), torch.ones(8), atol=0.03)  # every slice N(0, 1)
        assert abs(float(noise.mean())) < 0.02
        assert abs(lag_correlation(noise, 1) - rho) < 0.02 and abs(lag_correlation(noise, 2) - rho**2) < 0.02
    independent = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(slice_correlated_noise(shape, 0.0, generator=torch.Generator().manual_seed(3)), independent)
    with pytest.raises(ValueError, match=r"slice_noise_correlation must be a float in \[0, 1\), got -0.1"):
        slice_correlated_noise(shape, -0.1)


def test_ddim_step_noise_is_slice_correlated():
    """With eps = 0 and x_T = 0, DDIM (eta 1) returns a sum of its step noises: AR(1) across slices with rho."""
    ac, shape = alphas_cumprod_tensor(), (8, 6, 4, 16, 16)
    schedule = make_schedule("ddim", ac, 10, eta=1.0)
    zero_eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for rho in (0.0, 0.8):
        out = sample(zero_eps, torch.zeros(shape), schedule, generator=torch.Generator().manual_seed(0),
                     slice_noise_correlation=rho)
        assert abs(lag_correlation(out, 1) - rho) < 0.03
    plain = sample(zero_eps, torch.zeros(shape), schedule, generator=torch.Generator().manual_seed(0))
    again = sample(zero_eps, torch.zeros(shape), schedule, generator=torch.Generator().manual_seed(0),
                   slice_noise_correlation=0.0)
    assert torch.equal(plain, again)
