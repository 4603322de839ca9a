"""gem3d.models.unet: equivalence with the original GEM-3D UNets, volumetric identity, slice count, checkpointing."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import gem3d.models.unet as unet_module
from conftest import ORIGINAL_CLIP_LEN
from gem3d.denoiser import VARIANTS
from gem3d.model_dirs import is_original_model_dir, read_original_model_dir
from gem3d.models.conditioning import position_embedding
from gem3d.models.unet import UNetModel, is_volumetric_parameter_name


def model_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and is_original_model_dir(p))
    assert dirs, f"no original model folders under {root}"
    return dirs


def run_on_vectors(unet: UNetModel, original, vectors: dict) -> torch.Tensor:
    """The original's UNet call for a fixture's vectors: concat models see cat([x, cond]); crossattn models get
    cond as context (one token); volumetric models see clips of 16 slices."""
    x, t, cond = vectors["x"], vectors["t"], vectors["cond"]
    spec = VARIANTS[original.denoiser_kwargs["variant"]]
    with torch.no_grad():
        if spec.conditioning == "crossattn":
            return unet(x, t, context=cond)
        assert cond.shape[1] == x.shape[1] * (1 + spec.use_informed)
        inputs = torch.cat([x, cond], dim=1)
        if spec.volumetric:
            assert inputs.shape[0] % ORIGINAL_CLIP_LEN == 0
            return unet(inputs, t, num_frames=ORIGINAL_CLIP_LEN)
        return unet(inputs, t)


def tiny_config(**overrides) -> dict:
    config = dict(in_channels=12, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                  attention_resolutions=[2], num_head_channels=16)
    config.update(overrides)
    return config


def randomise_(module: torch.nn.Module, scale: float = 0.2, predicate=lambda name: True) -> None:
    """Seeded non-zero values in every parameter selected by ``predicate`` (zero-initialised convs included)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if predicate(name):
                if name.endswith("weight") and param.ndim == 1:  # norms: around 1
                    param.copy_(1 + scale * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(scale * torch.randn(param.shape, generator=generator) / max(1, param[0].numel()) ** 0.5)


# ----------------------------------------------------------------------------------------------------------------
# the original checkpoints


def test_every_fixture_model_reproduces_original_eps(original_fixtures):
    seen = set()
    for folder in model_dirs(original_fixtures):
        original = read_original_model_dir(folder)
        unet = UNetModel(**original.unet_params).eval()
        unet.load_state_dict(original.unet_state_dict, strict=True)  # identity key mapping
        vectors = torch.load(folder / "vectors.pt", weights_only=True)
        eps = run_on_vectors(unet, original, vectors)
        assert eps.shape == vectors["eps"].shape, folder.name
        error = (eps - vectors["eps"]).abs().max().item()
        assert error < 1e-4, f"{folder.name}: max |eps - original| = {error:.3g}"
        seen.add(folder.name)
    assert {"stage1", "stage2", "base_stage2", "slice"} <= seen, seen


def test_volumetric_layers_matter_in_stage2_fixture(original_fixtures):
    original = read_original_model_dir(original_fixtures / "stage2")
    vectors = torch.load(original_fixtures / "stage2" / "vectors.pt", weights_only=True)
    unet = UNetModel(**original.unet_params).eval()
    unet.load_slice_weights(original.unet_state_dict)  # identity temporal layers: no longer the original's output
    error = (run_on_vectors(unet, original, vectors) - vectors["eps"]).abs().max().item()
    assert error > 1e-3


def test_five_d_input_matches_flat_input():
    unet = UNetModel(**tiny_config(volumetric=True)).eval()
    randomise_(unet)
    flat = torch.randn(2 * 5, 12, 8, 8)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        clips = unet(flat.reshape(2, 5, 12, 8, 8), t)  # (B, F, C, h, w), one timestep per clip
        rows = unet(flat, t.repeat_interleave(5), num_frames=5)
    assert clips.shape == (2, 5, 4, 8, 8)
    assert torch.allclose(clips.reshape(10, 4, 8, 8), rows, atol=1e-6)
    assert (clips[0] - clips[1]).abs().max() > 1e-3  # the two clips are not the same computation


# ----------------------------------------------------------------------------------------------------------------
# volumetric layers


def test_volumetric_identity_with_randomised_zero_convs():
    slice_unet = UNetModel(**tiny_config()).eval()
    randomise_(slice_unet)
    assert all(p.abs().sum() > 0 for p in slice_unet.parameters())
    volume_unet = UNetModel(**tiny_config(volumetric=True)).eval()
    volume_unet.load_slice_weights(slice_unet.state_dict())
    x = torch.randn(2 * 5, 12, 8, 8)
    t = torch.randint(0, 1000, (2,)).repeat_interleave(5)
    with torch.no_grad():
        reference = slice_unet(x, t)
        out = volume_unet(x, t, num_frames=5)
    assert (out - reference).abs().max().item() < 1e-5
    assert reference.abs().max().item() > 1e-2  # the comparison is not between zeros


def test_slice_count_comes_from_the_input():
    unet = UNetModel(**tiny_config(volumetric=True)).eval()
    randomise_(unet)  # temporal layers away from identity: slices interact
    for frames in (5, 16):
        x = torch.randn(2, frames, 12, 8, 8)
        t = torch.tensor([10, 700])
        with torch.no_grad():
            out = unet(x, t)
            flat = unet(x.flatten(0, 1), t.repeat_interleave(frames), num_frames=frames)
            alone = unet(x[:1], t[:1])
            changed = x.clone()
            changed[0, 2] += 1.0
            out_changed = unet(changed, t)
        assert out.shape == (2, frames, 4, 8, 8)
        assert torch.allclose(out.flatten(0, 1), flat, atol=1e-6)
        assert torch.allclose(alone[0], out[0], atol=1e-5)  # clips are independent (clip-major rows)
        assert (out_changed[0, 0] - out[0, 0]).abs().max() > 1e-4  # slice 2 reaches slice 0 (temporal mixing)
        assert torch.allclose(out_changed[1], out[1], atol=1e-6)  # ... but not the other clip


def test_volumetric_requires_whole_clips():
    unet = UNetModel(**tiny_config(volumetric=True)).eval()
    x = torch.randn(6, 12, 8, 8)
    with pytest.raises(ValueError, match="num_frames"):
        unet(x, torch.zeros(6))
    with pytest.raises(ValueError, match="whole number of clips"):
        unet(x, torch.zeros(6), num_frames=4)
    with pytest.raises(ValueError, match="disagrees"):
        unet(x.reshape(2, 3, 12, 8, 8), torch.zeros(2), num_frames=4)


def test_volumetric_parameters_are_the_extra_layers():
    flat = UNetModel(**tiny_config())
    volume = UNetModel(**tiny_config(volumetric=True))
    names = set(volume.state_dict()) - set(flat.state_dict())
    assert names and all(is_volumetric_parameter_name(n) for n in names)
    assert not any(is_volumetric_parameter_name(n) for n in flat.state_dict())
    assert sum(p.numel() for p in volume.volumetric_parameters()) == (
        sum(p.numel() for p in volume.parameters()) - sum(p.numel() for p in flat.parameters())
    )
    volume.freeze_non_volumetric()
    assert {n for n, p in volume.named_parameters() if p.requires_grad} == names
    for name, param in volume.named_parameters():  # identity initialisation
        if name.endswith("temporal_conv.bias") or ".proj_out_tem." in name:
            assert param.abs().sum() == 0, name
        if name.endswith("temporal_conv.weight"):
            assert torch.equal(param[:, :, 1], torch.eye(param.shape[0])) and param[:, :, [0, 2]].abs().sum() == 0


def test_load_slice_weights_ignores_other_keys_and_refuses_missing_ones():
    volume = UNetModel(**tiny_config(volumetric=True))
    state = UNetModel(**tiny_config()).state_dict()
    volume.load_slice_weights({**state, "extra.weight": torch.zeros(1)})  # other keys are ignored
    assert all(torch.equal(volume.state_dict()[k], v) for k, v in state.items())
    del state["middle_block.0.in_layers.2.weight"]
    with pytest.raises(KeyError, match="middle_block.0.in_layers.2.weight"):
        volume.load_slice_weights(state)
    wrong = UNetModel(**tiny_config(in_channels=8)).state_dict()
    with pytest.raises(ValueError, match="input_blocks.0.0.weight"):
        volume.load_slice_weights(wrong)


# ----------------------------------------------------------------------------------------------------------------
# spatial transformer, context


def test_context_as_one_token_equals_2d_context():
    unet = UNetModel(**tiny_config(in_channels=4, use_spatial_transformer=True, context_dim=32)).eval()
    randomise_(unet)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([1, 300, 600, 900])
    context = position_embedding(torch.tensor([0.0, 0.3, 0.6, 1.0]), 32)
    with torch.no_grad():
        two_d = unet(x, t, context=context)
        tokens = unet(x, t, context=context[:, None])
        other = unet(x, t, context=context.flip(0))
    assert torch.allclose(two_d, tokens, atol=1e-6)
    assert (two_d - other).abs().max() > 1e-4  # the position context matters
    with pytest.raises(ValueError, match="context"):
        unet(x, t)
    with pytest.raises(ValueError, match="32"):
        unet(x, t, context=torch.zeros(4, 16))


def test_two_d_model_accepts_clips_slice_by_slice():
    unet = UNetModel(**tiny_config()).eval()
    randomise_(unet)
    x = torch.randn(2, 3, 12, 8, 8)
    with torch.no_grad():
        clips = unet(x, torch.tensor([5, 600]))
        rows = unet(x.flatten(0, 1), torch.tensor([5, 600]).repeat_interleave(3))
    assert torch.allclose(clips.flatten(0, 1), rows, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# checkpointing, validation


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []
    real_checkpoint = unet_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)
    small = dict(in_channels=4, channel_mult=[1], attention_resolutions=[1], volumetric=True)
    plain = UNetModel(**tiny_config(**small))
    randomise_(plain)
    checkpointed = UNetModel(**tiny_config(**small, use_checkpoint=True))
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 2, 4, 4, 4)
    t = torch.tensor([3, 900])
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model.zero_grad()
        model(x, t).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls and set(calls) == {False}
    assert len(calls) == len(checkpointed.input_blocks) + 1 + len(checkpointed.output_blocks)
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-5), name
    calls.clear()
    with torch.no_grad():
        checkpointed.eval()(x, t)
    assert calls == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_channels=48), "divisible by the 32 GroupNorm groups"),
        (dict(num_head_channels=24), "num_head_channels=24"),
        (dict(num_head_channels=-1, num_heads=0), "num_heads must be a positive integer"),
        (dict(attention_resolutions=[8]), r"\[8\] is not one of the rates \[1, 2\]"),
        (dict(use_spatial_transformer=True), "needs context_dim"),
        (dict(context_dim=32), "only used by the spatial transformer"),
        (dict(use_spatial_transformer=True, context_dim=32, volumetric=True), "AttentionBlock UNets only"),
        (dict(channel_mult=[]), "channel_mult"),
        (dict(dropout=1.5), "dropout"),
        (dict(in_channels=0), "in_channels must be a positive integer"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(**tiny_config(**overrides))


def test_input_validation():
    unet = UNetModel(**tiny_config()).eval()
    with pytest.raises(ValueError, match="in_channels=12"):
        unet(torch.zeros(1, 4, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.zeros(1, 12, 7, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="timesteps"):
        unet(torch.zeros(2, 12, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="no spatial transformer"):
        unet(torch.zeros(1, 12, 8, 8), torch.zeros(1), context=torch.zeros(1, 32))


def test_bfloat16_model_runs_with_float32_norms():
    unet = UNetModel(**tiny_config(volumetric=True)).eval()
    randomise_(unet)
    inputs, t = torch.randn(2 * 5, 12, 8, 8), torch.tensor([10, 700]).repeat_interleave(5)
    with torch.no_grad():
        reference = unet(inputs, t, num_frames=5)
        eps = unet.to(torch.bfloat16)(inputs.to(torch.bfloat16), t, num_frames=5)
    assert eps.dtype == torch.bfloat16
    assert (eps.float() - reference).abs().max().item() < 2e-2 * max(1.0, reference.abs().max().item())


def test_hyperparameters_live_in_one_validated_config():
    unet = UNetModel(**tiny_config(channel_mult=[1, 2]))
    config = unet.config
    assert isinstance(config, unet_module.UNetConfig)
    assert config.channel_mult == (1, 2) and unet.channel_mult is config.channel_mult  # attributes read the config
    assert unet.model_channels == 32 and unet.volumetric is False
    rebuilt = UNetModel(**asdict(config))  # the config's fields are the constructor's keywords
    assert rebuilt.config == config
    with pytest.raises(Exception):
        config.model_channels = 64  # frozen
    with pytest.raises(ValueError, match=r"unknown key 'model_channel' in UNetModel's hyperparameters; did you mean 'model_channels'"):
        UNetModel(**tiny_config(model_channel=64))
