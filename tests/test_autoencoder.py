"""Tests for gem3d.models.autoencoder.FirstStage and gem3d.models.ldm_vae."""

import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gem3d.models import ldm_vae
from gem3d.models.autoencoder import KL_F8_CONFIG, FirstStage

TINY_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1], num_res_blocks=1,
    attn_resolutions=[], dropout=0.0,
)  # fmt: skip


class NotAWeight:
    """A pickled object outside torch's weights-only allowlist."""

    def __init__(self, value=3):
        self.value = value


def tiny_first_stage(seed: int = 0, **kwargs) -> FirstStage:
    torch.manual_seed(seed)
    model = FirstStage.from_ldm_ddconfig(TINY_DDCONFIG, embed_dim=4, **kwargs)
    with torch.no_grad():  # non-trivial GroupNorm affines and biases so every weight matters
        for name, p in model.vae.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def images(n=5, c=3, size=16, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def fixture_folders(root: Path):
    """(folder, config, vectors) for every fixture folder with a first stage and encoder test vectors."""
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        configs = sorted((folder / "configs").glob("*.yaml"))
        vectors_path = folder / "vectors.pt"
        if not configs or not vectors_path.is_file():
            continue
        config = OmegaConf.load(configs[0])
        if OmegaConf.select(config, "model.params.first_stage_config") is None:
            continue
        vectors = torch.load(vectors_path, map_location="cpu", weights_only=True)
        if "latent_mean_scaled" in vectors:
            found.append((folder, config, vectors))
    return found


# ----------------------------------------------------------------------------------------------- fixtures
def test_original_fixture_equivalence(original_fixtures):
    folders = fixture_folders(original_fixtures)
    assert folders, f"no fixture folder with first_stage_config and latent_mean_scaled under {original_fixtures}"
    for folder, config, vectors in folders:
        start = time.perf_counter()
        params = config.model.params.first_stage_config.params
        scale_factor = float(config.model.params.scale_factor)
        assert scale_factor == pytest.approx(float(vectors["scale_factor"]))
        model = FirstStage.from_ldm_ddconfig(OmegaConf.to_container(params.ddconfig), int(params.embed_dim), scale_factor)
        checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        model.load_ldm_state_dict(checkpoint["state_dict"])

        latent = model.encode(vectors["image"])
        torch.testing.assert_close(latent, vectors["latent_mean_scaled"], atol=1e-4, rtol=0)
        decoded = model.decode(vectors["latent_mean_scaled"])
        torch.testing.assert_close(decoded, vectors["decoded"], atol=1e-4, rtol=0)

        # the inverse conversion gives back the original LDM weights exactly
        original = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("first_stage_model.")}
        exported = model.to_ldm_state_dict(prefix="first_stage_model.")
        assert sorted(exported) == sorted(original)
        assert all(torch.equal(exported[k], original[k]) for k in original)
        print(
            f"{folder.name}: encode max err {(latent - vectors['latent_mean_scaled']).abs().max():.2e}, "
            f"decode max err {(decoded - vectors['decoded']).abs().max():.2e}, {time.perf_counter() - start:.2f} s"
        )


def test_fixture_config_file_layout_loads_with_from_ldm_checkpoint(original_fixtures):
    folder, config, vectors = fixture_folders(original_fixtures)[0]
    config_path = sorted((folder / "configs").glob("*.yaml"))[0]
    model = FirstStage.from_ldm_checkpoint(folder / "checkpoints" / "last.ckpt", config_path)
    assert model.scale_factor == pytest.approx(float(config.model.params.scale_factor))
    torch.testing.assert_close(model.encode(vectors["image"][:2]), vectors["latent_mean_scaled"][:2], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------- encode/decode
def test_chunked_equals_unchunked():
    model = tiny_first_stage()
    x = images(n=7)
    whole = tiny_first_stage(chunk_size=16)
    whole.load_state_dict(model.state_dict())
    model.chunk_size = 3
    torch.testing.assert_close(model.encode(x, progress=True), whole.encode(x), atol=1e-5, rtol=0)
    sample_chunked = model.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    sample_whole = whole.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample_chunked, sample_whole, atol=1e-5, rtol=0)
    assert not torch.allclose(sample_whole, whole.encode(x))  # a sample is not the mean
    z = whole.encode(x)
    torch.testing.assert_close(model.decode(z, progress=True), whole.decode(z), atol=2e-5, rtol=0)


def test_latent_shapes_scaling_and_clips():
    model = tiny_first_stage(scale_factor=0.5)
    x = images(n=6)
    z = model.encode(x)
    assert z.shape == (6, *model.latent_shape(16, 16)) == (6, 4, 8, 8)
    assert model.downsample_factor == 2 and model.latent_channels == 4
    mean = model.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, 0.5 * mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decode(z), model.vae.decode(mean).sample, atol=1e-6, rtol=0)
    clip = x.reshape(2, 3, 3, 16, 16)
    z_clip = model.encode(clip)
    assert z_clip.shape == (2, 3, 4, 8, 8)
    torch.testing.assert_close(z_clip.reshape(6, 4, 8, 8), z, atol=1e-6, rtol=0)
    assert model.decode(z_clip).shape == (2, 3, 3, 16, 16)
    grey = model.decode_grey(z)
    torch.testing.assert_close(grey, model.decode(z).mean(dim=1, keepdim=True))


def test_grey_input_equals_repeated_rgb():
    model = tiny_first_stage()
    grey = images(n=4, c=1)
    rgb = grey.repeat(1, 3, 1, 1)
    torch.testing.assert_close(model.encode(grey), model.encode(rgb), atol=0, rtol=0)


def test_encode_mask_keeps_levels_below_minus_one():
    model = tiny_first_stage()
    max_label = 3
    label = torch.randint(-1, max_label + 1, (3, 1, 16, 16))
    grey = torch.where(label < 0, torch.tensor(-1 - 2 / max_label), 2 * label / max_label - 1).float()
    assert grey.min() < -1
    z = model.encode_mask(grey)
    torch.testing.assert_close(z, model.encode(grey.repeat(1, 3, 1, 1)))
    clamped = model.encode_mask(grey.clamp(-1, 1))
    assert not torch.allclose(z, clamped)  # the outside-the-body level is not clamped away
    assert model.encode_mask(grey.reshape(1, 3, 1, 16, 16)).shape == (1, 3, 4, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model.encode_mask(grey.repeat(1, 3, 1, 1))


def test_input_validation_messages():
    model = tiny_first_stage()
    with pytest.raises(ValueError, match="2 channels; allowed: 1 .* or 3"):
        model.encode(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="15x16 must be divisible by the downsample factor 2"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"latents must be \(N, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        tiny_first_stage(chunk_size=0)


# ----------------------------------------------------------------------------------------- freezing
def test_frozen_by_default_and_unfreeze_for_training():
    model = tiny_first_stage()
    assert model.frozen and not model.training and not model.vae.training
    assert not any(p.requires_grad for p in model.parameters())
    parent = torch.nn.ModuleDict({"first_stage": model}).train()
    assert parent.training and not model.vae.training  # stays in eval while frozen

    model.unfreeze()
    assert model.vae.training and all(p.requires_grad for p in model.parameters())
    x = images(n=2)
    recon, posterior = model(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape
    loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    assert model.vae.encoder.conv_in.weight.grad is not None
    model.freeze()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------- loading
def _write_full_model_config(path: Path, scale_factor: float) -> Path:
    config = {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "scale_factor": scale_factor,
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": 4, "ddconfig": TINY_DDCONFIG, "lossconfig": {"target": "torch.nn.Identity"}},
                },
            },
        }
    }
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def _write_autoencoder_config(path: Path) -> Path:
    config = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": TINY_DDCONFIG}}}
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def test_from_ldm_checkpoint_offline(tmp_path):
    import huggingface_hub.constants

    assert os.environ.get("HF_HUB_OFFLINE") == "1" and huggingface_hub.constants.HF_HUB_OFFLINE
    source = tiny_first_stage(seed=3)
    x = images(n=2)
    expected = source.encode(x)
    ldm = source.to_ldm_state_dict()

    # (a) a LatentDiffusion checkpoint: first_stage_model.* inside state_dict, next to a UNet and a cond_stage copy
    full = {"first_stage_model." + k: v for k, v in ldm.items()}
    full.update({"cond_stage_model." + k: torch.zeros_like(v) for k, v in ldm.items()})
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 12, 3, 3)
    torch.save({"state_dict": full, "epoch": 1, "global_step": 10}, tmp_path / "full.ckpt")
    config = _write_full_model_config(tmp_path / "full.yaml", scale_factor=0.3)
    model = FirstStage.from_ldm_checkpoint(tmp_path / "full.ckpt", config)
    assert model.scale_factor == pytest.approx(0.3)
    torch.testing.assert_close(model.encode(x), expected / source.scale_factor * 0.3, atol=1e-6, rtol=0)

    # (b) an autoencoder-only checkpoint (bare LDM keys plus loss weights), autoencoder-only config
    bare = dict(ldm, **{"loss.logvar": torch.zeros(())})
    torch.save({"state_dict": bare}, tmp_path / "model.ckpt")
    model = FirstStage.from_ldm_checkpoint(tmp_path / "model.ckpt", _write_autoencoder_config(tmp_path / "ae.yaml"))
    assert model.scale_factor == pytest.approx(0.18215)
    torch.testing.assert_close(model.encode(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decode(expected), source.decode(expected), atol=1e-6, rtol=0)

    # a checkpoint that does not fit the config names the problem
    with pytest.raises(ValueError, match="do not fit the model"):
        FirstStage.from_ldm_checkpoint(tmp_path / "model.ckpt", KL_F8_CONFIG.parent / "demo-f8.yaml")
    with pytest.raises(FileNotFoundError, match="no_such.ckpt"):
        FirstStage.from_ldm_checkpoint(tmp_path / "no_such.ckpt", config)


def test_shipped_kl_f8_config_matches_latent_diffusion():
    assert KL_F8_CONFIG.is_file()
    params = ldm_vae.find_autoencoder_params(KL_F8_CONFIG)
    config = ldm_vae.diffusers_config_from_ddconfig(params["ddconfig"], params["embed_dim"])
    assert config["block_out_channels"] == [128, 256, 512, 512]
    assert config["layers_per_block"] == 2 and config["latent_channels"] == 4
    assert config["sample_size"] == 256 and config["in_channels"] == config["out_channels"] == 3
    assert config["scaling_factor"] == pytest.approx(0.18215)
    demo = FirstStage.from_ldm_config(KL_F8_CONFIG.parent / "demo-f8.yaml")
    assert demo.downsample_factor == 8 and demo.latent_shape(64, 64) == (4, 8, 8)


def test_gem3d_state_dict_and_checkpoint_files(tmp_path):
    source = tiny_first_stage(seed=5)
    x = images(n=2)
    expected = source.encode(x)
    # FirstStage's own state dict
    target = tiny_first_stage(seed=6)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.encode(x), expected, atol=0, rtol=0)
    # a Lightning checkpoint holding it as `first_stage.vae.*`, detected by load_checkpoint
    lightning = {"first_stage." + k: v for k, v in source.state_dict().items()}
    lightning["unet.out.weight"] = torch.zeros(3)
    torch.save({"state_dict": lightning, "epoch": 0}, tmp_path / "last.ckpt")
    target = tiny_first_stage(seed=6).load_checkpoint(tmp_path / "last.ckpt")
    torch.testing.assert_close(target.encode(x), expected, atol=0, rtol=0)
    # safetensors in the LDM layout
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.to_ldm_state_dict().items()}, str(tmp_path / "vae.safetensors"))
    target = tiny_first_stage(seed=6).load_checkpoint(tmp_path / "vae.safetensors")
    torch.testing.assert_close(target.encode(x), expected, atol=0, rtol=0)


def test_bad_config_values_give_clear_errors():
    def bad(**changes):
        return dict(TINY_DDCONFIG, **changes)

    with pytest.raises(ValueError, match=r"ddconfig.attn_resolutions=\[16\] is not supported.*allowed: \[\]"):
        FirstStage.from_ldm_ddconfig(bad(attn_resolutions=[16]), embed_dim=4)
    with pytest.raises(ValueError, match=r"ddconfig.ch_mult must be a non-empty list of positive ints, got \[1, 0\]"):
        FirstStage.from_ldm_ddconfig(bad(ch_mult=[1, 0]), embed_dim=4)
    with pytest.raises(ValueError, match=r"not divisible by the 32 GroupNorm groups; got ch=24"):
        FirstStage.from_ldm_ddconfig(bad(ch=24), embed_dim=4)
    with pytest.raises(ValueError, match=r"ddconfig.double_z=False is not supported"):
        FirstStage.from_ldm_ddconfig(bad(double_z=False), embed_dim=4)
    with pytest.raises(ValueError, match=r"embed_dim=3 must equal ddconfig.z_channels=4"):
        FirstStage.from_ldm_ddconfig(TINY_DDCONFIG, embed_dim=3)
    with pytest.raises(ValueError, match=r"unknown ddconfig key\(s\) \['channels'\]; allowed keys"):
        FirstStage.from_ldm_ddconfig(bad(channels=3), embed_dim=4)
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['ch'\]"):
        FirstStage.from_ldm_ddconfig({k: v for k, v in TINY_DDCONFIG.items() if k != "ch"}, embed_dim=4)
    with pytest.raises(ValueError, match=r"unknown AutoencoderKL option\(s\) \['layers'\]; allowed: .*layers_per_block"):
        FirstStage.from_diffusers_config(block_out_channels=[32], layers=2)
    with pytest.raises(ValueError, match=r"divisible by norm_num_groups=32"):
        FirstStage.from_diffusers_config(block_out_channels=[32, 48])
    with pytest.raises(KeyError, match="no autoencoder 'ddconfig' found"):
        FirstStage.from_ldm_config({"model": {"params": {"unet_config": {}}}})


def test_untrusted_pickle_names_the_trust_option(tmp_path):
    source = tiny_first_stage(seed=8)
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": source.to_ldm_state_dict(), "extra": NotAWeight()}, path)
    with pytest.raises(pickle.UnpicklingError, match="NotAWeight.*trust=True"):
        FirstStage.from_ldm_checkpoint(path, _write_autoencoder_config(tmp_path / "ae.yaml"))
    with pytest.raises(pickle.UnpicklingError, match="weights_only=True"):
        tiny_first_stage().load_checkpoint(path)
    model = FirstStage.from_ldm_checkpoint(path, tmp_path / "ae.yaml", trust=True)
    x = images(n=1)
    torch.testing.assert_close(model.encode(x), source.encode(x), atol=1e-6, rtol=0)
    # numpy scalars (common in old Lightning checkpoints) are on the allowlist
    import numpy as np

    torch.save({"state_dict": source.to_ldm_state_dict(), "best_score": np.float64(0.5)}, tmp_path / "numpy.ckpt")
    model = FirstStage.from_ldm_checkpoint(tmp_path / "numpy.ckpt", tmp_path / "ae.yaml")
    torch.testing.assert_close(model.encode(x), source.encode(x), atol=1e-6, rtol=0)
