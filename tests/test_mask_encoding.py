"""The mask's condition: the paper's grey mask through the autoencoder, or each label's share of every latent pixel
(``mask_encoding: label_fractions``, docs/mask-true.md)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from gem3d.data.preprocess import label_to_grey
from gem3d.export.manifest import Manifest
from gem3d.inference.engine import run_inference
from gem3d.metrics import labels as label_metrics
from gem3d.models.conditioning import label_fractions
from gem3d.training import Gem3dLDM
from tests import _tiny_models
from tests.test_diffusion import clip_batch, first_stage_config, make_model, unet_config

FRACTIONS = {"mask_encoding": "label_fractions", "max_label": 3}


def grey(label) -> torch.Tensor:
    """Labels (N, S, S) -> grey masks (N, 1, S, S)."""
    return torch.from_numpy(label_to_grey(np.asarray(label, dtype=np.int16), 3))[:, None]


def test_label_fractions_hold_each_levels_share_of_every_latent_pixel():
    label = np.array([[[3, 0, -1, -1],
                       [0, 0, -1, -1],
                       [-1, -1, 2, 2],
                       [-1, -1, 2, 1]]])
    shares = (label_fractions(grey(label), max_label=3, factor=2) + 1) / 2
    assert shares.shape == (1, 5, 2, 2)  # outside, tissue, labels 1-3
    expected = torch.zeros(5, 2, 2)
    expected[:, 0, 0] = torch.tensor([0, 0.75, 0, 0, 0.25])
    expected[0, 0, 1] = expected[0, 1, 0] = 1.0
    expected[:, 1, 1] = torch.tensor([0, 0, 0.25, 0.75, 0])
    torch.testing.assert_close(shares[0], expected)
    clips = label_fractions(grey(label).reshape(1, 1, 1, 4, 4).repeat(2, 3, 1, 1, 1), 3, 2)
    assert clips.shape == (2, 3, 5, 2, 2) and torch.equal(clips[1, 2], shares[0] * 2 - 1)


def test_label_fractions_keep_a_one_voxel_label_that_the_grey_levels_blur_away():
    rng = np.random.default_rng(0)
    label = np.zeros((6, 64, 64), dtype=np.int16)
    spots = rng.integers(0, 64, size=(6, 2))
    for k, (y, x) in enumerate(spots):
        label[k, y, x] = 1 + k % 3
    shares = (label_fractions(grey(label), 3, 4) + 1) / 2
    for k, (y, x) in enumerate(spots):
        assert shares[k, 1 + (1 + k % 3), y // 4, x // 4] == pytest.approx(1 / 16)
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(6, 16, 16))


@pytest.mark.parametrize("shape, max_label, factor, match", [
    ((2, 8, 8), 3, 2, r"grey masks must be \(\.\.\., 1, S, S\), got shape \(2, 8, 8\)"),
    ((2, 1, 8, 8), 0, 2, "max_label must be a positive integer, got 0"),
    ((2, 1, 8, 6), 3, 4, r"mask slices \(8, 6\) are not divisible by the first stage's factor 4"),
])
def test_label_fractions_name_a_bad_input(shape, max_label, factor, match):
    with pytest.raises(ValueError, match=match):
        label_fractions(torch.zeros(shape), max_label, factor)


def test_the_unet_sees_the_label_fractions_after_the_noisy_latent_and_before_the_informed_slice():
    model = Gem3dLDM(unet_config(13), first_stage_config(), **FRACTIONS).eval()
    batch = clip_batch(b=2, f=3)
    batch["mask_latent"] = torch.zeros(2, 3, 4, 8, 8)  # an autoencoder latent from a cache: not this model's
    batch["latent"] = torch.zeros(2, 3, 4, 8, 8)
    batch["informed_latent"] = torch.zeros(2, 4, 8, 8)
    seen = {}
    model.unet.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad():
        z, cond = model.encode_batch(batch)
        model.eps(z, torch.zeros(2, 3, dtype=torch.long), cond)
    x = seen["x"].reshape(2, 3, 13, 8, 8)
    torch.testing.assert_close(x[:, :, 4:9], label_fractions(batch["mask"], 3, 2))
    assert model.mask_channels == 5 and model.architecture()["mask_encoding"] == "label_fractions"


def test_the_mask_encoding_is_checked_eagerly():
    with pytest.raises(ValueError, match=r"mask_encoding='onehot' is not supported; allowed: \['autoencoder', "
                                         r"'label_fractions'\]"):
        Gem3dLDM(unet_config(13), first_stage_config(), mask_encoding="onehot")
    with pytest.raises(ValueError, match=r"needs max_label.*got max_label=None"):
        Gem3dLDM(unet_config(13), first_stage_config(), mask_encoding="label_fractions")
    with pytest.raises(ValueError, match=r"in_channels=12 does not fit variant='slice_stage': expected 13 \(noisy 4 "
                                         r"\+ mask 5 \(label_fractions\) \+ informed 4 channels\)"):
        Gem3dLDM(unet_config(12), first_stage_config(), **FRACTIONS)
    model = Gem3dLDM(unet_config(13), first_stage_config(), **FRACTIONS)
    with pytest.raises(ValueError, match=r"mask_latent has 4 channels; mask_encoding='label_fractions' gives 5"):
        model.condition(torch.zeros(1, 2, 4, 8, 8), torch.zeros(1, 4, 8, 8))


def test_a_volume_stage_refuses_a_stage1_with_another_mask_encoding(tmp_path):
    stage1 = Gem3dLDM(unet_config(13), first_stage_config(), **FRACTIONS)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}, path)
    with pytest.raises(ValueError, match=r"was trained with mask_encoding='label_fractions', max_label=3; this stage "
                                         r"has mask_encoding='autoencoder', max_label=None"):
        make_model("volume_stage", ckpt_path=str(path))
    stage2 = Gem3dLDM(unet_config(13, volumetric=True), first_stage_config(), variant="volume_stage",
                      ckpt_path=str(path), use_ema=False, **FRACTIONS)
    assert stage2.mask_encoding == "label_fractions"
    torch.testing.assert_close(stage2.unet.input_blocks[0][0].weight, stage1.unet.input_blocks[0][0].weight)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_models.tiny_setup(tmp_path_factory)


def test_the_engine_samples_with_a_label_fraction_model_and_refuses_another_max_label(tiny, tmp_path):
    from tests.test_inference_engine import make_config

    name = [n for n in tiny["names"] if n != tiny["oblique"]][0]
    model = _tiny_models.build_model_dir(tmp_path / "fractions", "volume_stage", seed=3, **FRACTIONS)
    manifest = run_inference(make_config(tiny, "test", tmp_path / "out", model=model, cases=name))
    (record,) = Manifest(manifest).records
    image = np.asarray(nib.load(str(tmp_path / "out" / "test" / record["files"]["image"])).dataobj)
    assert np.isfinite(image).all() and image.std() > 0
    other = _tiny_models.build_model_dir(tmp_path / "max4", "volume_stage", seed=3, mask_encoding="label_fractions",
                                         max_label=4)
    with pytest.raises(ValueError, match=r"encodes masks with max_label=4, but the preprocessing has max_label=3"):
        run_inference(make_config(tiny, "test", tmp_path / "out4", model=other, cases=name))


class PoolingFirstStage:
    """A stand-in first stage: encoding averages each 4 x 4 patch, decoding repeats it (a blurring autoencoder)."""
    device = torch.device("cpu")

    def encode_mask(self, grey: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(grey, 4)

    def decode_grey(self, z: torch.Tensor) -> torch.Tensor:
        return z.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)


def test_the_autoencoder_roundtrip_keeps_a_patch_sized_label_and_loses_a_one_voxel_one():
    label = np.zeros((2, 16, 16), dtype=np.int16)
    label[:, 4:8, 8:12] = 3    # one whole 4 x 4 patch: kept exactly
    label[:, 13, 1] = 2        # one voxel: averaged with 15 tissue voxels, it decodes as tissue
    label[:, :, 15] = -1       # outside the body on the right: a quarter of each right patch
    scores = label_metrics.autoencoder_mask_dice(PoolingFirstStage(), label, max_label=3)
    assert scores[3] == pytest.approx(1.0) and scores[2] == pytest.approx(0.0) and np.isnan(scores[1])


def test_training_refuses_a_max_label_other_than_the_datas():
    from types import SimpleNamespace

    from gem3d.data.preprocess import PreprocessConfig

    model = Gem3dLDM(unet_config(13), first_stage_config(), **FRACTIONS)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(preprocess=PreprocessConfig.from_dict({"max_label": 4})))
    with pytest.raises(ValueError, match=r"model.params.max_label=3 differs from data.params.preprocess.max_label=4"):
        model.setup("fit")


def test_the_demo_draws_gem3d_from_label_fractions_and_its_baseline_from_the_autoencoder():
    from omegaconf import OmegaConf

    from tests.test_configs import ROOT

    seen = {}
    for name in ("demo_stage1", "demo_stage2", "demo_base_stage1", "demo_base_stage2"):
        config = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / f"{name}.yaml")
        params = config.model.params
        seen[name] = (params.get("mask_encoding", "autoencoder"), params.get("max_label"),
                      params.unet_config.params.in_channels, params.get("label_loss_weight", 0))
        if params.get("max_label") is not None:
            assert params.max_label == config.data.params.preprocess.max_label  # one value, interpolated
    # GEM-3D's stages also weight their loss inside the labels (bench/mask_true.py --only label-weight); the baseline
    # is the peer as published
    assert seen == {"demo_stage1": ("label_fractions", 3, 13, 4), "demo_stage2": ("label_fractions", 3, 13, 4),
                    "demo_base_stage1": ("autoencoder", None, 8, 0), "demo_base_stage2": ("autoencoder", None, 8, 0)}
