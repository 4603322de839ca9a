"""Gem3dLDM, AutoencoderModule and EMA on tiny models (16x16 grey slices, f = 2, 4x8x8 latents)."""

from __future__ import annotations

import copy

import pytest
import torch

from gem3d.denoiser import VARIANTS
from gem3d.model_dirs import load_model_dir
from gem3d.models.autoencoder import FirstStage
from gem3d.training import AutoencoderModule, Gem3dLDM
from gem3d.ema import EMA, shadow_key
from gem3d.models.conditioning import position_embedding
from gem3d.models.unet import is_volumetric_parameter_name

S = 16  # slice side in pixels; latents are 4 x 8 x 8


def first_stage_config() -> dict:
    return {
        "target": "gem3d.models.autoencoder.FirstStage.from_diffusers_config",
        "params": {"in_channels": 1, "out_channels": 1, "block_out_channels": [32, 32], "layers_per_block": 1,
                   "latent_channels": 4, "norm_num_groups": 32, "sample_size": S},
    }


def unet_config(in_channels: int, volumetric: bool = False, context_dim: int | None = None) -> dict:
    params = {"in_channels": in_channels, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2],
              "num_res_blocks": 1, "attention_resolutions": [2], "num_head_channels": 32, "volumetric": volumetric}
    if context_dim is not None:
        params.update(use_spatial_transformer=True, context_dim=context_dim)
    return {"target": "gem3d.models.unet.UNetModel", "params": params}


IN_CHANNELS = {"slice_stage": 12, "volume_stage": 12, "position": 4, "baseline_slice": 8, "baseline_volume": 8}


def make_model(variant: str = "slice_stage", **kwargs) -> Gem3dLDM:
    spec = VARIANTS[variant]
    unet = unet_config(IN_CHANNELS[variant], spec.volumetric, 16 if variant == "position" else None)
    kwargs.setdefault("use_ema", not spec.volumetric)
    return Gem3dLDM(unet_config=unet, first_stage_config=first_stage_config(), variant=variant, **kwargs)


def clip_batch(b: int = 2, f: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, f, 1, S, S, generator=g) * 2 - 1,
        "mask": torch.randint(0, 4, (b, f, 1, S, S), generator=g).float() * (2 / 3) - 1,
        "informed": torch.rand(b, 1, S, S, generator=g) * 2 - 1,
    }


def slice_batch(b: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 1, S, S, generator=g) * 2 - 1,
            "mask": torch.rand(b, 1, S, S, generator=g) * 2 - 1,
            "pos": torch.tensor([0.0, 0.5, 1.0])[:b]}


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Random non-zero values everywhere (zero-initialised layers would hide the conditioning)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------- validation


def test_unknown_variant_lists_allowed_values():
    with pytest.raises(ValueError, match=r"variant='stage3'.*allowed: \['baseline_slice', 'baseline_volume', 'position', 'slice_stage', 'volume_stage'\]"):
        Gem3dLDM(unet_config(12), first_stage_config(), variant="stage3")


def test_in_channels_must_fit_variant():
    with pytest.raises(ValueError, match=r"in_channels=8 does not fit variant='slice_stage': expected 12"):
        Gem3dLDM(unet_config(8), first_stage_config(), variant="slice_stage")
    with pytest.raises(ValueError, match=r"volumetric=False does not fit variant='volume_stage'"):
        Gem3dLDM(unet_config(12), first_stage_config(), variant="volume_stage")


@pytest.mark.parametrize("value, error", [("path-to-stage1-ckpt", ValueError), ("/nonexistent/stage1/last.ckpt", FileNotFoundError)])
def test_bad_stage1_ckpt_path_names_key_and_value(value, error):
    with pytest.raises(error, match=rf"model\.params\.ckpt_path={value!r}"):
        make_model("volume_stage", ckpt_path=value)


def test_ckpt_path_is_only_for_volume_stages(tmp_path):
    with pytest.raises(ValueError, match="only used by the volume stages"):
        make_model("slice_stage", ckpt_path=str(tmp_path))


# ---------------------------------------------------------------------------------------------- conditioning


def test_concat_layout_noisy_mask_informed():
    model = make_model("slice_stage").eval()
    batch = clip_batch(b=2, f=3)
    seen = {}
    model.unet.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(x=args[0], t=args[1]), with_kwargs=True)
    with torch.no_grad():
        z, cond = model.encode_batch(batch)
        mask_latent = model.first_stage.encode_mask(batch["mask"])
        informed_latent = model.first_stage.encode(batch["informed"], sample=False)
        t = torch.tensor([[1, 2, 3], [4, 5, 6]])
        out = model.eps(z, t, cond)
    assert z.shape == out.shape == (2, 3, 4, 8, 8)
    x = seen["x"].reshape(2, 3, 12, 8, 8)
    torch.testing.assert_close(x[:, :, :4], z)
    torch.testing.assert_close(x[:, :, 4:8], mask_latent)
    for f in range(3):  # the same informed slice latent for every slice of the clip
        torch.testing.assert_close(x[:, f, 8:], informed_latent)
    assert seen["t"].tolist() == [1, 2, 3, 4, 5, 6]  # per slice, clip-major


def test_baseline_is_mask_only():
    model = make_model("baseline_slice")
    z, cond = model.encode_batch(clip_batch())
    assert cond["concat"].shape == (2, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="mask-only"):
        model.condition(cond["concat"], torch.zeros(2, 4, 8, 8))


def test_training_latents_sample_posterior_conditions_use_mean():
    model = make_model("slice_stage")
    batch = clip_batch()
    z1, c1 = model.encode_batch(batch, generator=torch.Generator().manual_seed(1))
    z2, c2 = model.encode_batch(batch, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(z1, z2)  # posterior sample
    torch.testing.assert_close(c1["concat"], c2["concat"])  # posterior mean
    assert not z1.requires_grad and not c1["concat"].requires_grad
    first_stage = model.first_stage
    assert first_stage.scale_factor != 1  # so that a missing or doubled scale shows below
    # the target: scale x (posterior mean + posterior std x the generator's first normal draw), exactly
    mean, std = first_stage.moments(batch["image"].flatten(0, 1))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z1.flatten(0, 1), first_stage.scale_factor * (mean + std * noise))
    assert (std > 0).all()
    # the conditions: the scaled posterior means of the mask and the informed slice, exactly
    torch.testing.assert_close(c1["concat"][:, :, :4], first_stage.scale_factor * first_stage.moments(
        batch["mask"].flatten(0, 1))[0].unflatten(0, (2, 4)))
    informed_mean = first_stage.scale_factor * first_stage.moments(batch["informed"])[0]
    for frame in range(4):
        torch.testing.assert_close(c1["concat"][:, frame, 4:], informed_mean)


def test_condition_latent_factor_scales_conditions():
    model = make_model("slice_stage", condition_latent_factor=2.0)
    mask, informed = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    concat = model.condition(mask, informed)["concat"]
    torch.testing.assert_close(concat[:, :, :4], 2 * mask)
    torch.testing.assert_close(concat[:, 1, 4:], 2 * informed)


def test_position_variant_context_and_loss():
    model = make_model("position")
    perturb(model.unet)
    batch = slice_batch()
    z, cond = model.encode_batch(batch)
    assert z.shape == (3, 1, 4, 8, 8) and cond["concat"] is None
    torch.testing.assert_close(cond["context"], position_embedding(batch["pos"], 16))
    t = torch.full((3,), 500)
    with torch.no_grad():
        other = model.eps(z, t, model.condition(pos=torch.tensor([0.3, 0.9, 0.1])))
        same = model.eps(z, t, cond)
    assert not torch.allclose(other, same)  # the position matters
    assert torch.isfinite(model.loss(batch))


def test_timesteps_per_slice_or_per_clip():
    g = torch.Generator().manual_seed(0)
    t_slice = make_model("slice_stage").sample_timesteps(2, 8, g)
    t_volume = make_model("volume_stage").sample_timesteps(2, 8, g)
    assert t_slice.shape == t_volume.shape == (2, 8)
    assert all(len(set(row.tolist())) > 1 for row in t_slice)
    assert all(len(set(row.tolist())) == 1 for row in t_volume)
    assert int(t_slice.min()) >= 0 and int(t_slice.max()) < 1000


def test_q_sample_uses_the_scaled_linear_schedule():
    model = make_model("slice_stage")
    ac = model.alphas_cumprod
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(ac, torch.cumprod(1 - betas, 0).float())
    z0, noise, t = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 2, 4, 8, 8), torch.tensor([[0, 999]])
    x = model.q_sample(z0, t, noise)
    torch.testing.assert_close(x[0, 1], ac[999].sqrt() * z0[0, 1] + (1 - ac[999]).sqrt() * noise[0, 1])


# ---------------------------------------------------------------------------------------------- stage 2


def stage1_checkpoint(tmp_path, variant="slice_stage"):
    stage1 = make_model(variant)
    perturb(stage1.unet)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "global_step": 3}, path)
    return stage1, path


def test_volume_stage_loads_stage1_and_reproduces_it(tmp_path):
    stage1, path = stage1_checkpoint(tmp_path)
    stage2 = make_model("volume_stage", ckpt_path=str(path))
    for name, value in stage1.unet.state_dict().items():
        torch.testing.assert_close(stage2.unet.state_dict()[name], value)
    batch = clip_batch(b=1, f=4)
    z, cond = stage1.encode_batch(batch, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([321])
    with torch.no_grad():
        torch.testing.assert_close(stage2.eps(z, t, cond), stage1.eps(z, t, cond), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one timestep per clip"):
        stage2.eps(z, torch.tensor([[1, 2, 3, 4]]), cond)


def test_volume_stage_trains_only_volumetric_parameters(tmp_path):
    _, path = stage1_checkpoint(tmp_path)
    model = make_model("volume_stage", ckpt_path=str(path))
    model.set_learning_rate(ngpu=1, batch_size=1)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True  # gem3d.optim
    volumetric = {n for n, _ in model.unet.named_parameters() if is_volumetric_parameter_name(n)}
    assert volumetric and {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in model.unet.named_parameters() if n in volumetric
    }
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    model.train()
    model.loss(clip_batch(b=1, f=4)).backward()
    optimizer.step()
    for name, param in model.unet.named_parameters():
        if name in volumetric:
            assert not torch.equal(param, before[name]), f"volumetric {name} did not change"
        else:
            assert torch.equal(param, before[name]), f"2D {name} changed"
            assert param.grad is None
    assert all(not p.requires_grad for p in model.first_stage.parameters())


def test_volume_stage_can_start_from_stage1_ema(tmp_path):
    stage1, path = stage1_checkpoint(tmp_path)
    perturb(stage1.unet, seed=5)
    stage1.ema.update(stage1.unet)  # shadow != raw now
    torch.save({"state_dict": stage1.state_dict()}, path)
    stage2 = make_model("volume_stage", ckpt_path=str(path), ckpt_use_ema=True)
    name = "input_blocks.0.0.weight"
    torch.testing.assert_close(stage2.unet.state_dict()[name], stage1.ema.get_buffer(shadow_key(name)))


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_warmup_update_and_swap():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.999)
    assert ema.current_decay() == pytest.approx(1 / 10)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for name, p in net.named_parameters():  # shadow <- shadow - (1 - 0.1) (shadow - p)
        torch.testing.assert_close(ema.get_buffer(shadow_key(name)), start[name] + 0.9)
    assert int(ema.num_updates) == 1 and ema.current_decay() == pytest.approx(2 / 11)
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    with ema.swapped_in(net):
        torch.testing.assert_close(net.weight, start["weight"] + 0.9)
    torch.testing.assert_close(net.weight, raw["weight"])
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(net, decay=1.0)


def test_ema_lives_in_the_checkpoint_state_dict():
    model = make_model("slice_stage", ema_decay=0.99)
    perturb(model.unet)
    model.ema.update(model.unet)
    state = model.state_dict()
    assert int(state["ema.num_updates"]) == 1 and "ema.input_blocks__0__0__weight" in state
    fresh = make_model("slice_stage", ema_decay=0.99)
    fresh.load_state_dict(state)
    assert int(fresh.ema.num_updates) == 1
    torch.testing.assert_close(fresh.ema.out__2__weight, model.ema.out__2__weight)
    with model.ema_scope():
        torch.testing.assert_close(model.unet.out[2].weight, model.ema.out__2__weight)


def test_load_ldm_from_run_raw_and_ema(tmp_path):
    model = make_model("slice_stage")
    perturb(model.unet)
    model.ema.update(model.unet)
    perturb(model.unet, seed=7)
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "first_stage_scale_factor": 0.5}, run / "last.ckpt")
    raw = load_model_dir(tmp_path / "run", ema=False).model
    loaded_ema = load_model_dir(str(run / "last.ckpt"))  # default: sample_with_ema
    ema = loaded_ema.model
    assert not raw.training and raw.first_stage.scale_factor == 0.5 and loaded_ema.ema
    x, t = torch.randn(1, 2, 4, 8, 8), torch.tensor([10])
    cond = model.condition(torch.randn(1, 2, 4, 8, 8), torch.randn(1, 4, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(raw.model_fn(cond)(x, t), model.eval().eps(x, t, cond))
        with model.ema_scope():
            torch.testing.assert_close(ema.eps(x, t, cond), model.eps(x, t, cond))


def test_log_images_grids():
    model = make_model("slice_stage", sample_steps_for_logging=2)
    grids = model.log_images(clip_batch(b=2, f=3))
    assert set(grids) == {"real", "mask", "sample", "informed", "real_vs_sample"}
    assert grids["real"].shape == (1, S, 3 * S) and grids["real_vs_sample"].shape == (1, 2 * S, 3 * S)
    assert grids["informed"].shape == (1, S, S)
    assert all(float(g.min()) >= 0 and float(g.max()) <= 1 for g in grids.values())


# ---------------------------------------------------------------------------------------------- learning rate


def test_learning_rate_scaling(capsys):
    small = make_model("slice_stage", base_learning_rate=5e-6)
    assert small.set_learning_rate(ngpu=8, batch_size=1, accumulate=2) == pytest.approx(8e-5)
    model = make_model("slice_stage", base_learning_rate=1e-4)
    assert model.set_learning_rate(ngpu=2, batch_size=3, accumulate=1) == pytest.approx(6e-4)
    out = capsys.readouterr().out
    assert "Setting learning rate to 6.00e-04 = 1 (accumulate_grad_batches) * 2 (num_gpus) * 3 (batchsize) * 1.00e-04 (base_lr)" in out
    assert model.configure_optimizers().param_groups[0]["lr"] == pytest.approx(6e-4)
    unscaled = make_model("slice_stage", base_learning_rate=1e-4, scale_lr=False)
    assert unscaled.set_learning_rate(ngpu=2, batch_size=3) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        model.set_learning_rate(1, 0)


# ---------------------------------------------------------------------------------------------- autoencoder



def test_autoencoder_module_adam_betas():
    config = copy.deepcopy(first_stage_config())
    config["params"]["frozen"] = False
    default = AutoencoderModule(first_stage_config=config).configure_optimizers()
    assert default.param_groups[0]["betas"] == (0.5, 0.9)  # latent-diffusion's
    assert isinstance(default, torch.optim.Adam) and default.defaults["fused"] is True  # gem3d.optim
    plain = AutoencoderModule(first_stage_config=config, betas=[0.9, 0.999]).configure_optimizers()
    assert plain.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"):
        AutoencoderModule(first_stage_config=config, betas=(0.9, 1.0))

def test_autoencoder_module_loss_and_reload(tmp_path):
    config = copy.deepcopy(first_stage_config())
    config["params"]["frozen"] = False
    module = AutoencoderModule(first_stage_config=config, kl_weight=1e-6, include_masks=True)
    batch = slice_batch()
    loss, parts = module.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and parts["kl"] > 0
    assert all(p.grad is not None for p in module.first_stage.parameters())
    module.latent_std.fill_(0.25)
    ckpt = tmp_path / "ae" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    loaded = FirstStage.from_run(str(tmp_path / "a*"))  # glob -> newest run folder
    assert loaded.scale_factor == pytest.approx(4.0) and loaded.frozen
    with torch.no_grad():
        expected = module.first_stage.encode(batch["image"]) / module.first_stage.scale_factor * 4.0
        torch.testing.assert_close(loaded.encode(batch["image"]), expected)
    ldm = Gem3dLDM(unet_config(12), {"target": "gem3d.models.autoencoder.FirstStage.from_run", "params": {"ckpt_path": str(ckpt)}})
    assert ldm.first_stage.scale_factor == pytest.approx(4.0)
    # a run folder is self-contained: it loads after the autoencoder run is gone
    run = tmp_path / "ldm" / "checkpoints"
    run.mkdir(parents=True)
    saved = {"state_dict": ldm.state_dict(), "hyper_parameters": dict(ldm.hparams)}
    ldm.on_save_checkpoint(saved)
    torch.save(saved, run / "last.ckpt")
    ckpt.unlink()
    reloaded = load_model_dir(tmp_path / "ldm").model
    assert reloaded.first_stage.scale_factor == pytest.approx(4.0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.first_stage.encode(batch["image"]), loaded.encode(batch["image"]))
