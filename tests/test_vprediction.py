"""v-prediction with a zero-terminal-SNR schedule (issue 21, item 6): the training target, the conversions, the
rescaled schedule against diffusers, known-answer sampling, training and reloading a tiny v model."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from omegaconf import OmegaConf

from gem3d.config import instantiate_from_config
from gem3d.convert import convert_model_dir
from gem3d.inference.volume import SamplerOptions
from gem3d.model_dirs import load_model_dir
from gem3d.sampling.samplers import KnownFrames, _clip_x0, make_schedule, sample
from gem3d.sampling.schedule import (
    TERMINAL_ALPHA_CUMPROD,
    alphas_cumprod_tensor,
    eps_from_output,
    model_target,
    output_from_x0,
    x0_from_output,
)
from tests.test_diffusion import clip_batch, make_model, perturb

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
V = "v_prediction"
SHAPE = (2, 3, 4, 5, 5)  # (B, F, C, h, w)


def diffusers_zero_snr(cls=DDIMScheduler, **kwargs):
    """diffusers' own zero-terminal-SNR version of GEM-3D's schedule (float32 throughout)."""
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               rescale_betas_zero_snr=True, prediction_type=V, **kwargs)


# ---------------------------------------------------------------------------------------------- the schedule


def test_default_schedule_is_unchanged_bit_for_bit():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.equal(alphas_cumprod_tensor(), torch.cumprod(1 - betas, 0).float())
    assert torch.equal(make_model().alphas_cumprod, alphas_cumprod_tensor())


def test_zero_terminal_snr_schedule_ends_at_zero_and_matches_diffusers():
    ours, plain = alphas_cumprod_tensor(zero_terminal_snr=True), alphas_cumprod_tensor()
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    assert float(ours[-1]) == 0.0 and float(ours[-2]) > 0.0
    assert bool((ours[1:] < ours[:-1]).all())  # strictly decreasing
    torch.testing.assert_close(ours[0], plain[0], rtol=0, atol=1e-7)  # the first step keeps its noise level
    torch.testing.assert_close(ours, diffusers_zero_snr().alphas_cumprod, rtol=0, atol=1e-6)


def test_samplers_run_on_the_models_schedule_and_dpmpp_on_diffusers_finite_stand_in():
    ac = alphas_cumprod_tensor(zero_terminal_snr=True)
    ddim = make_schedule("ddim", ac, 10, prediction_type=V)
    # the training schedule, 0 at the end; a few large-beta entries one float32 step off (no float32 beta hits them)
    assert float(ddim.scheduler.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(ddim.scheduler.alphas_cumprod, ac, rtol=1.2e-7, atol=0)
    assert int((ddim.scheduler.alphas_cumprod != ac).sum()) <= 3
    assert ddim.scheduler.config.prediction_type == V and ddim.prediction_type == V
    dpm = make_schedule("dpmpp", ac, 10, prediction_type=V)
    assert TERMINAL_ALPHA_CUMPROD == 2.0**-24  # one float32 step off at most, as every large-beta entry
    assert float(dpm.scheduler.alphas_cumprod[-1]) == pytest.approx(TERMINAL_ALPHA_CUMPROD, rel=1.2e-7, abs=0)
    torch.testing.assert_close(dpm.scheduler.alphas_cumprod[:-1], ac[:-1], rtol=1.2e-7, atol=0)
    reference = diffusers_zero_snr(DPMSolverMultistepScheduler)
    assert float(reference.alphas_cumprod[-1]) == TERMINAL_ALPHA_CUMPROD
    torch.testing.assert_close(dpm.scheduler.alphas_cumprod, reference.alphas_cumprod, rtol=0, atol=1e-6)
    assert torch.isfinite(dpm.scheduler.lambda_t).all() and torch.isfinite(dpm.scheduler.sigmas).all()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_zero_terminal_snr_defaults_to_trailing_spacing(sampler):
    ac = alphas_cumprod_tensor(zero_terminal_snr=True)
    schedule = make_schedule(sampler, ac, 25, prediction_type=V)
    assert int(schedule.timesteps[0]) == 999 and schedule.scheduler.config.timestep_spacing == "trailing"
    assert [int(t) for t in schedule.timesteps[:3]] == [999, 959, 919]
    assert int(make_schedule(sampler, ac, 25, prediction_type=V, spacing="linspace").timesteps[0]) == 999
    # the eps schedule keeps its defaults (the original's spacing for DDIM)
    assert int(make_schedule("ddim", alphas_cumprod_tensor(), 25).timesteps[0]) == 961


@pytest.mark.parametrize("sampler, spacing, first", [("ddim", "original", 961), ("ddim", "leading", 961),
                                                      ("dpmpp", "leading", 951)])
def test_zero_terminal_snr_refuses_spacings_that_skip_the_pure_noise_step(sampler, spacing, first):
    ac = alphas_cumprod_tensor(zero_terminal_snr=True)
    with pytest.raises(ValueError, match=rf"spacing='{spacing}' starts {sampler} at timestep {first}, not at the "
                                         rf"last training timestep 999.*use one of \["):
        make_schedule(sampler, ac, 25, prediction_type=V, spacing=spacing)


def test_make_schedule_validates_the_prediction_type():
    with pytest.raises(ValueError, match=r"prediction_type='x0' is not supported; allowed: \['epsilon', "
                                         r"'v_prediction'\]"):
        make_schedule("ddim", alphas_cumprod_tensor(), 10, prediction_type="x0")
    with pytest.raises(ValueError, match=r"zero terminal SNR.*needs prediction_type='v_prediction', got 'epsilon'"):
        make_schedule("dpmpp", alphas_cumprod_tensor(zero_terminal_snr=True), 10)


# ---------------------------------------------------------------------------------------------- target, conversions


def test_v_target_equals_diffusers_get_velocity():
    model = make_model(prediction_type=V, zero_terminal_snr=True)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 4, 8, 8, generator=g)
    t = torch.tensor([[0, 500, 999], [17, 998, 250]])
    reference = diffusers_zero_snr()
    reference.alphas_cumprod = model.alphas_cumprod.clone()  # the same float32 buffer: compare the formula
    expected = reference.get_velocity(z0.flatten(0, 1), noise.flatten(0, 1), t.flatten()).unflatten(0, (2, 3))
    torch.testing.assert_close(model.target(z0, t, noise), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.target(z0, t, noise)[0, 2], -z0[0, 2])  # zero SNR: v = -x0
    eps_model = make_model()
    assert eps_model.target(z0, t, noise) is noise  # eps models: the noise itself, as before


@pytest.mark.parametrize("prediction_type", ["epsilon", V])
def test_eps_v_x0_conversions_round_trip(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0, noise = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    a = torch.tensor([0.9991, 0.3], dtype=torch.float64)  # per clip (B,)
    x = a.sqrt().view(-1, 1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1, 1) * noise
    output = model_target(x0, noise, a, prediction_type)
    if prediction_type == V:
        expected = a.sqrt().view(-1, 1, 1, 1, 1) * noise - (1 - a).sqrt().view(-1, 1, 1, 1, 1) * x0
        torch.testing.assert_close(output, expected)
    torch.testing.assert_close(x0_from_output(output, x, a, prediction_type), x0)
    torch.testing.assert_close(eps_from_output(output, x, a, prediction_type), noise)
    torch.testing.assert_close(output_from_x0(x0, x, a, prediction_type), output)
    per_slice = a.view(-1, 1).expand(2, 3)  # (B, F) reads the same
    torch.testing.assert_close(x0_from_output(output, x, per_slice, prediction_type), x0)


def test_v_conversions_hold_at_zero_snr():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    v = model_target(x0, noise, 0.0, V)  # x = noise at a = 0
    torch.testing.assert_close(v, -x0)
    torch.testing.assert_close(x0_from_output(v, noise, 0.0, V), x0)
    torch.testing.assert_close(eps_from_output(v, noise, 0.0, V), noise)


def test_clip_x0_clips_the_v_estimate_and_keeps_v_inside_the_bound():
    g = torch.Generator().manual_seed(3)
    x0, noise = 3 * torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    a = torch.tensor(0.4)
    x = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = model_target(x0, noise, a, V)
    clipped = _clip_x0(v, x, a, 1.0, V)
    torch.testing.assert_close(x0_from_output(clipped, x, a, V), x0.clamp(-1, 1), rtol=0, atol=1e-5)
    inside = x0.abs() <= 1.0
    assert inside.any() and torch.equal(clipped[inside], v[inside])


# ---------------------------------------------------------------------------------------------- sampling


def oracle_v(x0: torch.Tensor, alphas_cumprod: torch.Tensor):
    """A model that knows x0: its exact v at every input, ``(sqrt(a) x - x0) / sqrt(1 - a)`` in float64."""
    def v_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas_cumprod.double()[t].view(-1, 1, 1, 1, 1)
        return ((a.sqrt() * x.double() - x0.double()) / (1 - a).sqrt()).to(x.dtype)
    return v_fn


def known_answer_case(seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def test_ddim_from_pure_noise_with_an_exact_v_model_follows_the_known_trajectory():
    """Eta 0: x_T = n at a = 0, each step's eps estimate is n again, so the result is sqrt(a0) x0 + sqrt(1 - a0) n
    (DDIM's last step goes to alphas_cumprod[0], set_alpha_to_one=False)."""
    ac = alphas_cumprod_tensor(zero_terminal_snr=True)
    x0, n = known_answer_case()
    out = sample(oracle_v(x0, ac), n, make_schedule("ddim", ac, 20, eta=0.0, prediction_type=V))
    torch.testing.assert_close(out, ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * n, rtol=0, atol=2e-5)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmpp_from_pure_noise_with_an_exact_v_model_recovers_x0(order):
    ac = alphas_cumprod_tensor(zero_terminal_snr=True)
    x0, n = known_answer_case()
    out = sample(oracle_v(x0, ac), n, make_schedule("dpmpp", ac, 12, order=order, prediction_type=V))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_known_frames_stay_exact_and_the_rest_follows_the_known_answer(sampler):
    ac = alphas_cumprod_tensor(zero_terminal_snr=True)
    x0, n = known_answer_case(5)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    known = KnownFrames(mask=mask, latents=x0)
    schedule = make_schedule(sampler, ac, 10, eta=0.0, prediction_type=V)
    out = sample(oracle_v(x0, ac), n, schedule, known=known, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[mask], x0[mask])
    expected = x0 if sampler == "dpmpp" else ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * n
    torch.testing.assert_close(out[~mask], expected[~mask], rtol=0, atol=1e-3)


def test_dpmpp_with_clip_x0_and_a_v_model_lands_on_the_clipped_x0():
    ac = alphas_cumprod_tensor(zero_terminal_snr=True)
    x0, n = known_answer_case(6)
    x0 = 3 * x0
    schedule = make_schedule("dpmpp", ac, 10, prediction_type=V)
    out = sample(oracle_v(x0, ac), n, schedule, clip_x0=1.0)
    torch.testing.assert_close(out, x0.clamp(-1, 1), rtol=0, atol=1e-3)
    assert torch.equal(sample(oracle_v(x0, ac), n, schedule, clip_x0=1e30), sample(oracle_v(x0, ac), n, schedule))


def test_sampling_a_v_model_as_eps_goes_wrong_so_sampler_options_read_the_models_type():
    """SamplerOptions take the prediction type from the model: the v model is sampled as v (the known answer, to
    1e-3); the same outputs read as eps on the ordinary schedule land 0.23 from x0 on average."""
    x0, n = known_answer_case(7)
    model = make_model(prediction_type=V, zero_terminal_snr=True)
    options = SamplerOptions(sampler="dpmpp", steps=10)
    out = options.sample(oracle_v(x0, model.alphas_cumprod), n, model)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-3)
    plain = alphas_cumprod_tensor()
    as_eps = sample(oracle_v(x0, plain), n, make_schedule("dpmpp", plain, 10))
    assert (as_eps - x0).abs().mean() > 0.1


# ---------------------------------------------------------------------------------------------- models


def test_prediction_type_and_zero_terminal_snr_are_validated_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"prediction_type='sample' is not supported; allowed: \['epsilon', "
                                         r"'v_prediction'\]"):
        make_model(prediction_type="sample")
    with pytest.raises(ValueError, match=r"zero_terminal_snr=True needs prediction_type='v_prediction', got "
                                         r"prediction_type='epsilon'"):
        make_model(zero_terminal_snr=True)
    with pytest.raises(ValueError, match=r"zero_terminal_snr must be true or false, got 'yes'"):
        make_model(prediction_type=V, zero_terminal_snr="yes")


def test_the_demo_trains_gem3d_with_v_and_its_baseline_with_eps():
    objectives = {}
    for name in ("demo_stage1", "demo_stage2", "demo_slice", "demo_base_stage1", "demo_base_stage2"):
        params = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / f"{name}.yaml").model.params
        objectives[name] = (params.get("prediction_type", "epsilon"), params.get("zero_terminal_snr", False))
    assert objectives == {"demo_stage1": (V, True), "demo_stage2": (V, True), "demo_slice": (V, True),
                          "demo_base_stage1": ("epsilon", False), "demo_base_stage2": ("epsilon", False)}


def test_a_demo_config_with_an_unknown_prediction_type_fails_before_loading_anything():
    config = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / "demo_stage1.yaml")
    assert OmegaConf.select(config, "model.params.prediction_type") == V  # the demo's GEM-3D models predict v
    config.model.params.prediction_type = "velocity"
    with pytest.raises(ValueError, match=r"prediction_type='velocity' is not supported; allowed: \['epsilon', "
                                         r"'v_prediction'\]"):
        instantiate_from_config(config.model)  # fails before the (absent) autoencoder run is looked up


def test_v_loss_is_the_l2_to_the_velocity():
    model = make_model(prediction_type=V, zero_terminal_snr=True)
    perturb(model.unet)
    batch = clip_batch(b=2, f=3)
    loss = model.loss(batch, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)  # the same draws, in loss()'s order
    z0, cond = model.encode_batch(batch, generator=g)
    t = model.sample_timesteps(2, 3, g)
    noise = torch.randn(z0.shape, generator=g)
    a = model.alphas_cumprod[t].view(2, 3, 1, 1, 1)
    x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        expected = ((model.eps(x_t, t, cond) - (a.sqrt() * noise - (1 - a).sqrt() * z0)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_a_tiny_v_model_trains_a_step_and_its_run_and_converted_folders_reload_as_v(tmp_path):
    model = make_model(prediction_type=V, zero_terminal_snr=True)
    perturb(model.unet)
    model.set_learning_rate(ngpu=1, batch_size=1)
    optimizer = model.configure_optimizers()
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    model.train()
    loss = model.loss(clip_batch(b=1, f=3))
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.unet.named_parameters())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)},
               run / "checkpoints" / "last.ckpt")
    for folder in (run, convert_model_dir(run, tmp_path / "converted")):
        loaded = load_model_dir(folder).model
        assert (loaded.prediction_type, loaded.zero_terminal_snr) == (V, True)
        assert float(loaded.alphas_cumprod[-1]) == 0.0
        x, t = torch.randn(1, 3, 4, 8, 8), torch.tensor([999])
        cond = model.condition(torch.randn(1, 3, 4, 8, 8), torch.randn(1, 4, 8, 8))
        with torch.no_grad(), model.ema_scope():
            torch.testing.assert_close(loaded.eps(x, t, cond), model.eval().eps(x, t, cond))


def test_eps_models_record_their_objective_and_older_folders_read_as_eps(tmp_path):
    model = make_model()
    assert (model.prediction_type, model.zero_terminal_snr) == ("epsilon", False)
    assert {k: model.architecture()[k] for k in ("prediction_type", "zero_terminal_snr")} == {
        "prediction_type": "epsilon", "zero_terminal_snr": False}
    hparams = {k: v for k, v in model.hparams.items() if k not in ("prediction_type", "zero_terminal_snr")}
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp_path / "checkpoints" / "last.ckpt")
    loaded = load_model_dir(tmp_path).model  # a run from before the option: eps on the original schedule
    assert loaded.prediction_type == "epsilon" and torch.equal(loaded.alphas_cumprod, alphas_cumprod_tensor())


def test_a_volume_stage_refuses_a_stage1_with_another_objective(tmp_path):
    stage1 = make_model(prediction_type=V, zero_terminal_snr=True)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}, path)
    with pytest.raises(ValueError, match=r"was trained with prediction_type='v_prediction', zero_terminal_snr=True; "
                                         r"this stage has prediction_type='epsilon', zero_terminal_snr=False"):
        make_model("volume_stage", ckpt_path=str(path))
    stage2 = make_model("volume_stage", ckpt_path=str(path), prediction_type=V, zero_terminal_snr=True)
    assert stage2.prediction_type == V


def test_log_images_of_a_v_model_sample_on_its_schedule():
    model = make_model(prediction_type=V, zero_terminal_snr=True, sample_steps_for_logging=2)
    grids = model.log_images(clip_batch(b=1, f=2))
    assert all(torch.isfinite(g).all() and float(g.min()) >= 0 and float(g.max()) <= 1 for g in grids.values())


@pytest.mark.parametrize("steps", [1, 2, 25])
def test_ddim_eta_1_from_zero_snr_stays_finite_and_lands_near_x0(steps):
    """At a_t = 0 and eta = 1 diffusers' DDIM takes the square root of a rounding error (-6e-8 for 2 and 25 steps):
    the sampler caps that step's eta just below 1. With the exact v model every step's x0 estimate is x0, so the
    result is sqrt(a0) x0 + sqrt(1 - a0) (unit noise)."""
    ac = alphas_cumprod_tensor(zero_terminal_snr=True)
    x0, n = known_answer_case(8)
    schedule = make_schedule("ddim", ac, steps, eta=1.0, prediction_type=V)
    out = sample(oracle_v(x0, ac), n, schedule, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert float((out - ac[0].sqrt() * x0).abs().max()) < 6 * float((1 - ac[0]).sqrt())


def test_a_converted_original_model_keeps_eps(tmp_path):
    model = make_model()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)},
               tmp_path / "run" / "checkpoints" / "last.ckpt")
    converted = convert_model_dir(tmp_path / "run", tmp_path / "converted")
    config_path = converted / "configs" / "model.yaml"
    config = OmegaConf.load(config_path)
    assert config.model.params.prediction_type == "epsilon" and config.model.params.zero_terminal_snr is False
    config.source.kind = "original"
    config.model.params.prediction_type, config.model.params.zero_terminal_snr = V, True
    OmegaConf.save(config, config_path)
    with pytest.raises(ValueError, match=r"prediction_type='v_prediction', zero_terminal_snr=True; allowed for a model "
                                         r"converted from an original GEM-3D folder: 'epsilon' and false"):
        load_model_dir(converted)
