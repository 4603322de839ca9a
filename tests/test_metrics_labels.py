"""gem3d.metrics.labels and .references: label fidelity, Dice, the nnU-Net hook, copy/counterfactual references."""
import math

import numpy as np
import pytest

from gem3d.metrics import labels as label_metrics
from gem3d.metrics.references import copy_slice_volume, counterfactual_effect


def _phantom():
    label = np.zeros((4, 10, 10), int)
    label[:, 2:8, 2:8] = 1
    label[:, 4:6, 4:6] = 2
    body = np.zeros(label.shape, bool)
    body[:, 1:9, 1:9] = True
    image = np.where(label == 1, 0.5, 0.0) + np.where(label == 2, 0.9, 0.0) + np.where(body & (label == 0), 0.2, 0.0)
    return image, label, body


def test_label_intensity_stats_and_fidelity():
    image, label, body = _phantom()
    stats = label_metrics.label_intensity_stats(image, label, body)
    assert stats["1"]["mean"] == pytest.approx(0.5) and stats["2"]["mean"] == pytest.approx(0.9)
    assert stats["0"]["mean"] == pytest.approx(0.2) and stats["outside"]["mean"] == 0.0
    assert stats["2"]["voxels"] == 16
    assert label_metrics.label_order(stats) == ["0", "1", "2"]
    fake = image + 0.1 * (label == 2) + 0.05 * ~body
    out = label_metrics.label_fidelity(fake, image, label, body, {1: "tissue", 2: "lesion"})
    assert out["mean_diff_lesion"] == pytest.approx(0.1) and out["mean_diff_tissue"] == pytest.approx(0.0)
    assert out["outside_mean"] == pytest.approx(0.05) and out["outside_mean_diff"] == pytest.approx(0.05)
    assert out["label_order_kept"] == 1.0
    inverted = np.where(label == 2, 0.1, image)  # lesion now darker than tissue and background
    assert label_metrics.label_fidelity(inverted, image, label, body)["label_order_kept"] == 0.0


def test_dice_per_label_known_values():
    ref = np.zeros((2, 4, 4), int)
    ref[:, :2] = 1  # 16 voxels
    pred = np.zeros_like(ref)
    pred[:, :1] = 1  # 8 voxels, all inside: Dice = 2*8 / (8+16)
    pred[0, 3, 3] = 2  # label 2 predicted once, absent from the reference: NaN (MONAI's ignore_empty)
    ref[1, 3, 3] = 3  # label 3 in the reference, never predicted: Dice 0
    dice = label_metrics.dice_per_label(pred, ref, num_labels=3)
    assert dice[1] == pytest.approx(16 / 24) and math.isnan(dice[2]) and dice[3] == 0.0
    assert label_metrics.dice_per_label(ref, ref)[1] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        label_metrics.dice_per_label(ref, ref[:1])


def test_segmenter_hook_reports_why_it_is_skipped(tmp_path, monkeypatch):
    assert label_metrics.segmenter_dice(None, [], [], 2) == (None, "skipped: no --segmenter model folder given")
    monkeypatch.setattr(label_metrics, "nnunet_available", lambda: False)
    result = label_metrics.segmenter_dice(tmp_path, [], [], 2)
    assert result == (None, "skipped: nnunetv2 not installed (see ENVIRONMENT.md)")


def test_copy_slice_volume():
    volume = np.arange(24.0).reshape(4, 2, 3)
    copy = copy_slice_volume(volume, 1)
    assert copy.shape == volume.shape and (copy == volume[1]).all()
    assert (copy_slice_volume(volume) == volume[2]).all()
    with pytest.raises(ValueError, match="outside"):
        copy_slice_volume(volume, 4)


def test_counterfactual_effect_follows_the_donor():
    image, label, body = _phantom()
    # donor A: lesion bright (as the phantom); donor B: inverted contrast (lesion darkest)
    donor_a = image[0]
    donor_b = np.where(label[0] == 2, 0.05, np.where(label[0] == 1, 0.3, np.where(body[0], 0.6, 0.0)))
    donor_labels = np.where(body[0], label[0], -1)
    follows_a = image
    follows_b = np.where(label == 2, 0.1, np.where(label == 1, 0.35, np.where(body, 0.55, 0.0)))
    out = counterfactual_effect(follows_a, follows_b, label, body, donor_a, donor_labels, donor_b, donor_labels)
    assert out["follows_donor"] == 1.0 and out["labels_compared"] == 3.0
    assert out["order_a_is_donor_as"] == 1.0 and out["order_b_is_donor_bs"] == 1.0
    assert out["corr_a_donor_a"] == pytest.approx(1.0) and out["corr_b_donor_b"] > 0.99
    assert out["corr_a_donor_b"] < 0 and out["corr_b_donor_a"] < 0
    assert out["mean_abs_diff"] == pytest.approx(np.abs(follows_a - follows_b)[body].mean())
    ignores = counterfactual_effect(image, image, label, body, donor_a, donor_labels, donor_b, donor_labels)
    assert ignores["mean_abs_diff"] == 0.0 and ignores["follows_donor"] == 0.0
    assert ignores["order_b_is_donor_bs"] == 0.0  # donor B's inverted order is not followed


def test_autoencoder_reference_from_an_autoencoder_run(tmp_path):
    """``--autoencoder`` takes an AutoencoderModule run (checkpoint + project config with the preprocessing)."""
    import copy

    import torch
    import yaml

    from gem3d.data.geometry import Geometry
    from gem3d.data.preprocess import PreprocessConfig
    from gem3d.training.autoencoder import AutoencoderModule
    from gem3d.metrics.references import autoencoder_reconstruction, load_first_stage
    from tests import _tiny_models

    config = copy.deepcopy(_tiny_models.FIRST_STAGE)
    config["params"]["frozen"] = False
    torch.manual_seed(0)
    module = AutoencoderModule(first_stage_config=config, kl_weight=1e-6)
    module.latent_std.fill_(0.5)
    run = tmp_path / "2026_demo_autoencoder"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
               run / "checkpoints" / "last.ckpt")
    preprocess = dict(_tiny_models.PREPROCESS, size=16)
    (run / "configs" / "x-project.yaml").write_text(yaml.safe_dump({"data": {"params": {"preprocess": preprocess}}}))
    first_stage, found = load_first_stage(run)
    assert found == preprocess and first_stage.scale_factor == pytest.approx(2.0)
    image, label, _ = _phantom()
    raw = (image * 100).astype(np.float32)
    geometry = Geometry(np.eye(4), (10, 10, 4), slice_axis=2)
    recon = autoencoder_reconstruction(first_stage, raw, label, geometry, PreprocessConfig.from_dict(preprocess))
    assert recon.shape == raw.shape and np.isfinite(recon).all()
    assert raw.min() - 1e-3 <= recon.min() and recon.max() <= raw.max() + 1e-3  # clamped to the real range
