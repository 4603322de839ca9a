"""The nnU-Net v2 segmenter on tiny data: plan, preprocess, train a few iterations, predict on the image's grid,
keep a finished training, resume an interrupted one. Skips where nnunetv2 is not installed (``make nnunet``)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gem3d.segmentation import SegmenterSettings, TrainingCase, get_segmenter, load_trained_segmenter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                                reason="nnunetv2 is not installed (make nnunet installs it, see the README)")

SHAPE = (32, 32, 16)  # 16 slices of 32 x 32
AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [1.2, 0.0, 0.0, -4.0], [0.0, 0.0, 2.0, 3.5], [0, 0, 0, 1]])


def make_cases(root: Path, count: int = 6) -> list[TrainingCase]:
    """Bright sphere (label 1) and a dim bar (label 2) on noise, one oblique affine."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    cases = []
    for i in range(count):
        centre = np.array([*rng.integers(10, 22, 2), 8])[:, None, None, None]
        label = np.zeros(SHAPE, np.uint8)
        label[(grid[0] > 4) & (grid[0] < 8)] = 2
        label[((grid - centre) ** 2).sum(0) < 25] = 1
        image = rng.normal(0.0, 0.1, SHAPE) + np.choose(label, [0.0, 1.0, 0.5])
        root.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), root / f"case{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), root / f"case{i}.nii.gz")
        cases.append(TrainingCase(f"case{i}", root / f"case{i}_0000.nii.gz", root / f"case{i}.nii.gz"))
    return cases


def settings(iterations=2, **options) -> SegmenterSettings:
    return SegmenterSettings(backend="nnunet", iterations=iterations, seed=0,
                             options={"configuration": "2d", "iterations_per_epoch": 2, **options})


def test_nnunet_trains_resumes_keeps_and_predicts_on_the_image_grid(tmp_path, monkeypatch):
    """One tiny run (2d, 2 epochs of 1 iteration): interrupted after epoch 0, resumed from nnU-Net's checkpoint,
    kept once finished, then predictions on each image's grid."""
    from gem3d.segmentation import nnunet_backend

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # augmentation in this process: no worker start-up in the test
    cases = make_cases(tmp_path / "data")
    segmenter = get_segmenter(settings(iterations=2, iterations_per_epoch=1), tmp_path / "work")
    assert not segmenter.is_trained()
    original = nnunet_backend.Gem3dTrainer.on_epoch_end

    def stop_after_first_epoch(trainer):
        original(trainer)  # writes checkpoint_latest.pth, then the epoch counter moves on
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(nnunet_backend.Gem3dTrainer, "on_epoch_end", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        segmenter.train(cases, progress=False)
    assert not segmenter.is_trained()
    latest = torch.load(segmenter.fold_dir / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1

    monkeypatch.setattr(nnunet_backend.Gem3dTrainer, "on_epoch_end", original)
    segmenter.train(cases, progress=False)
    assert segmenter.is_trained() and not (segmenter.fold_dir / "checkpoint_latest.pth").exists()
    final = segmenter.fold_dir / "checkpoint_final.pth"
    checkpoint = torch.load(final, map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2 and checkpoint["trainer_name"] == "Gem3dTrainer"
    assert len(checkpoint["logging"]["train_losses"]) == 2  # epoch 0 from before the interruption, epoch 1 after
    stamp = final.stat().st_mtime_ns
    segmenter.train(cases, progress=False)  # finished: kept as it is
    assert final.stat().st_mtime_ns == stamp

    outputs = segmenter.predict([cases[0].image, cases[1].image], tmp_path / "pred", progress=False)
    assert [p.name for p in outputs] == ["case0.nii.gz", "case1.nii.gz"]
    for path, case in zip(outputs, cases):
        prediction, image = nib.load(path), nib.load(case.image)
        assert prediction.shape == SHAPE and prediction.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(prediction.affine, image.affine)
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}

    reopened = load_trained_segmenter(tmp_path / "work")  # from its segmenter.json alone
    assert type(reopened) is type(segmenter) and reopened.is_trained() and reopened.settings == segmenter.settings

    other = get_segmenter(settings(iterations=4), tmp_path / "work")
    with pytest.raises(ValueError, match="holds an nnU-Net training with other settings"):
        other.train(cases, progress=False)


@pytest.mark.parametrize("options, message", [
    ({"configuration": "3d_lowres"}, re.escape("nnunet configuration '3d_lowres' is not one of ['2d', '3d_fullres']")),
    ({"iterations_per_epoch": 3}, r"iterations \(2\) must be a multiple of iterations_per_epoch \(3\)"),
    ({"fold": 7}, "nnunet fold must be 'all' or 0-4, got 7"),
    ({"epochs": 3}, r"nnunet segmenter options \['epochs'\] are unknown"),
])
def test_nnunet_rejects_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        get_segmenter(SegmenterSettings(backend="nnunet", iterations=2, options=options), tmp_path)


def test_nnunet_raw_dataset_json(tmp_path):
    cases = make_cases(tmp_path / "data", count=2)
    segmenter = get_segmenter(settings(), tmp_path / "work")
    segmenter._write_raw(cases)
    meta = json.loads((segmenter.raw_dir / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "label_1": 1, "label_2": 2} and meta["numTraining"] == 2
    assert sorted(p.name for p in (segmenter.raw_dir / "imagesTr").iterdir()) == ["case0_0000.nii.gz",
                                                                                "case1_0000.nii.gz"]
