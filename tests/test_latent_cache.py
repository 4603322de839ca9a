"""The first-stage latent cache (gem3d.data.datasets.LatentCache) and its use in training: cached vs on-the-fly
latents, reuse and invalidation, the data module hand-over; informed-slice dropout and guidance."""
from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch

from gem3d.data.datasets import ClipDataset, LatentCache, SliceDataset, VolumeCache
from gem3d.data.module import Gem3dDataModule
from gem3d.data.preprocess import PreprocessConfig, label_to_grey
from gem3d.training.ldm import FirstStageLatentEncoder
from test_datasets import write_raw_dataset
from test_diffusion import S, make_model, perturb

CFG = PreprocessConfig(size=S, max_label=3)


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "Dataset001_Tiny"
    write_raw_dataset(root, n_cases=3)
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = make_model("slice_stage")
    perturb(model.first_stage, seed=3)  # a first stage whose posterior std is not constant
    perturb(model.unet, seed=4)  # non-zero output layers
    return model.eval()


def test_cached_means_equal_the_first_stage_and_samples_follow_the_posterior(dataset, model):
    volumes = VolumeCache(dataset, CFG)
    latents = LatentCache(volumes, FirstStageLatentEncoder(model.first_stage))
    prepared = volumes.get("case_001")
    image = torch.from_numpy(np.array(prepared.image))[:, None]
    grey_mask = torch.from_numpy(label_to_grey(np.array(prepared.label), 3))[:, None]
    with torch.no_grad():
        expected_image = model.first_stage.encode(image, sample=False)
        expected_mask = model.first_stage.encode_mask(grey_mask)
        std = model.first_stage.posterior(image).std * model.first_stage.scale_factor
    torch.testing.assert_close(latents.mean("case_001", "image_mean", 0, 20), expected_image, rtol=0, atol=1e-6)
    torch.testing.assert_close(latents.mean("case_001", "mask_mean", 0, 20), expected_mask, rtol=0, atol=1e-6)
    # posterior samples: (z - mean) / std is standard normal, and fresh for every draw
    draws = torch.stack([latents.sample("case_001", 0, 20, np.random.default_rng(i)) for i in range(20)])
    unit = (draws - expected_image) / std
    assert abs(float(unit.mean())) < 0.02 and abs(float(unit.std()) - 1) < 0.02
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(latents.sample("case_001", 3, 7, np.random.default_rng(5)),
                               latents.sample("case_001", 3, 7, np.random.default_rng(5)))



def test_a_contrast_variant_is_encoded_from_its_own_image(dataset, model):
    volumes = VolumeCache(dataset, CFG)
    latents = LatentCache(volumes, FirstStageLatentEncoder(model.first_stage))
    variant = volumes.get("case_001~inv-g0.7")
    with torch.no_grad():
        expected = model.first_stage.encode(torch.from_numpy(np.array(variant.image))[:, None], sample=False)
    torch.testing.assert_close(latents.mean(variant.name, "image_mean", 0, 20), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(latents.mean("case_001", "image_mean", 0, 20), expected, atol=1e-3)
    torch.testing.assert_close(latents.mean(variant.name, "mask_mean", 0, 20),
                               latents.mean("case_001", "mask_mean", 0, 20))  # the same anatomy, the same mask

def test_cache_is_reused_and_invalidated(dataset, model):
    encoder = FirstStageLatentEncoder(model.first_stage)
    first = LatentCache(VolumeCache(dataset, CFG), encoder)
    first.encode_all()
    assert first.encoded_count == 3 and first.cache_dir.parent == VolumeCache(dataset, CFG).cache_dir
    again = LatentCache(VolumeCache(dataset, CFG), FirstStageLatentEncoder(model.first_stage))
    again.encode_all()
    assert again.encoded_count == 0 and again.cache_dir == first.cache_dir
    assert isinstance(again.get("case_000")["image_mean"], np.memmap)
    # another first stage (other weights): another key, another cache
    other = make_model("slice_stage").first_stage
    perturb(other, seed=9)
    changed = LatentCache(VolumeCache(dataset, CFG), FirstStageLatentEncoder(other))
    changed.encode_all()
    assert changed.cache_dir != first.cache_dir and changed.encoded_count == 3
    # other preprocessing: the volume cache's hash folder changes, so does the latent cache's
    other_cfg = PreprocessConfig(size=S, max_label=3, intensity="percentile")
    assert LatentCache(VolumeCache(dataset, other_cfg), encoder).cache_dir != first.cache_dir
    # a changed source file: that case alone is encoded again
    path = dataset / "imagesTr" / "case_002_0000.nii.gz"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    refreshed = LatentCache(VolumeCache(dataset, CFG), encoder)
    refreshed.encode_all()
    assert refreshed.encoded_count == 1


def test_bad_keys_and_workers_without_an_encoder(dataset, model):
    encoder = FirstStageLatentEncoder(model.first_stage)
    encoder.key = "../x"
    with pytest.raises(ValueError, match="key"):
        LatentCache(VolumeCache(dataset, CFG), encoder)
    import pickle

    latents = LatentCache(VolumeCache(dataset, CFG), FirstStageLatentEncoder(model.first_stage))
    copy = pickle.loads(pickle.dumps(latents))
    with pytest.raises(RuntimeError, match="encode_all"):
        copy.get("case_000")


def test_datasets_carry_latents_and_the_model_uses_them(dataset, model):
    volumes = VolumeCache(dataset, CFG)
    latents = LatentCache(volumes, FirstStageLatentEncoder(model.first_stage))
    clips = ClipDataset(volumes, volumes.names, clip_len=4, seed=1)
    plain = clips[2]
    clips.use_latents(latents)
    item = clips[2]
    torch.testing.assert_close(item["image"], plain["image"])  # the images do not change
    assert item["latent"].shape == (4, 4, 8, 8) and item["mask_latent"].shape == (4, 4, 8, 8)
    batch = {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in item.items()}
    image_only = {k: batch[k] for k in ("image", "mask", "informed")}
    z_cached, cond_cached = model.encode_batch(batch)
    z_plain, cond_plain = model.encode_batch(image_only, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cond_cached["concat"], cond_plain["concat"], rtol=0, atol=1e-6)
    assert torch.equal(z_cached, batch["latent"]) and z_cached.shape == z_plain.shape
    slices = SliceDataset(volumes, volumes.names, seed=1)
    slices.use_latents(latents)
    assert slices[0]["latent"].shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="another volume cache"):
        ClipDataset(VolumeCache(dataset, CFG), volumes.names, clip_len=4).use_latents(latents)


@pytest.mark.parametrize("latent_cache", [True, False])
def test_training_hands_the_first_stage_to_the_data_module(dataset, tmp_path, latent_cache):
    torch.manual_seed(0)
    model = make_model("slice_stage", use_ema=False)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sorted(batch))

    data = Gem3dDataModule(dataset, kind="clip", preprocess={"size": S, "max_label": 3}, clip_len=4,
                           samples_per_epoch=2, latent_cache=latent_cache)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[Spy()], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert ("latent" in seen[0]) is latent_cache and (data.latents is not None) is latent_cache
    if latent_cache:
        assert data.latents.encoded_count == 3  # train + val cases, once


def test_informed_dropout_replaces_whole_clips_in_training_only():
    model = make_model("slice_stage", informed_dropout=0.5)
    informed = torch.randn(64, 4, 8, 8) + 3
    model.train()
    dropped = model.drop_informed(informed, torch.Generator().manual_seed(0))
    zero = (dropped == 0).flatten(1).all(1)
    kept = (dropped == informed).flatten(1).all(1)
    assert bool((zero | kept).all()) and 16 < int(zero.sum()) < 48
    model.eval()
    assert torch.equal(model.drop_informed(informed), informed)
    with pytest.raises(ValueError, match="informed_dropout"):
        make_model("slice_stage", informed_dropout=1.0)
    with pytest.raises(ValueError, match="no informed slice|none"):
        make_model("baseline_slice", informed_dropout=0.1)


def test_informed_guidance_mixes_null_and_informed_eps(model):
    g = torch.Generator().manual_seed(0)
    mask, informed = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x, t = torch.randn(2, 3, 4, 8, 8, generator=g), torch.tensor([500, 20])
    cond = model.condition(mask, informed)
    null = model.condition(mask, model.null_informed_latent(informed))
    with torch.no_grad():
        eps_c, eps_n = model.eps(x, t, cond), model.eps(x, t, null)
        torch.testing.assert_close(model.model_fn(cond, null, guidance=1.0)(x, t), eps_c)
        guided = model.model_fn(cond, null, guidance=3.0)(x, t)
    torch.testing.assert_close(guided, eps_n + 3.0 * (eps_c - eps_n), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, eps_c)


KEY_SCRIPT = """
import torch
from gem3d.models.autoencoder import FirstStage
from gem3d.training.ldm import FirstStageLatentEncoder
torch.manual_seed(0)
stage = FirstStage.from_diffusers_config(in_channels=1, out_channels=1, block_out_channels=[32], latent_channels=4,
                                         sample_size=16, scale_factor=float(__import__("sys").argv[1]))
print(FirstStageLatentEncoder(stage).key)
"""


def test_the_cache_key_is_the_same_in_every_process_and_for_any_scale_factor():
    keys = set()
    for hash_seed, scale in (("1", "0.5"), ("2", "0.5"), ("3", "0.25")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        run = subprocess.run([sys.executable, "-c", KEY_SCRIPT, scale], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        keys.add(run.stdout.strip().splitlines()[-1])
    assert len(keys) == 1 and len(next(iter(keys))) == 16
