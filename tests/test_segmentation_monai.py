"""gem3d.segmentation: the MONAI backend (geometry, seeding, resume, sliding window), the cache, settings files, and a
known answer: a tiny segmenter trained on blobs finds them in a held-out volume and not where they were moved."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gem3d.data.case import load_case
from gem3d.export.nifti import save_nifti
from gem3d.metrics.labels import segmenter_dice
from gem3d.segmentation import (SegmenterSettings, TrainingCase, dataset_training_cases, get_segmenter,
                                load_trained_segmenter, read_settings, trained_segmenter)
from gem3d.segmentation import monai_backend
from gem3d.segmentation.monai_backend import CHECKPOINT, FINAL, MonaiSegmenter
from tests._segmenters import AFFINE, blob_case, blob_dataset

TINY = {"features": [4, 4, 8, 8, 16, 4], "checkpoint_every": 2, "batch_size": 1}


def _settings(iterations=2, seed=0, **options):
    return SegmenterSettings(backend="monai", iterations=iterations, seed=seed, options={**TINY, **options})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return blob_dataset(tmp_path_factory.mktemp("blobs") / "Dataset001_Blobs", n=4)


@pytest.fixture(scope="module")
def cases(data):
    return dataset_training_cases(data, ["case_000", "case_001", "case_002"])


def _weights(work_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(work_dir / FINAL, weights_only=True)["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_options_are_checked_with_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match=r"options \['depth'\] are unknown; allowed: \['batch_size'"):
        get_segmenter(SegmenterSettings(options={"depth": 3}), tmp_path)
    with pytest.raises(ValueError, match=r"patch must be three multiples of 16 >= 32 .* got \[48, 40, 64\]"):
        get_segmenter(SegmenterSettings(options={"patch": [48, 40, 64]}), tmp_path)
    with pytest.raises(ValueError, match=r"sw_batch_size must be an int >= 1, got 0"):
        get_segmenter(SegmenterSettings(options={"sw_batch_size": 0}), tmp_path)
    with pytest.raises(ValueError, match=r"features must be six ints > 0, got \[8, 8\]"):
        get_segmenter(SegmenterSettings(options={"features": [8, 8]}), tmp_path)
    with pytest.raises(ValueError, match="at least one training case"):
        get_segmenter(_settings(), tmp_path).train([])
    assert monai_backend.padded_shape((20, 24, 33)) == (32, 32, 48)


def test_same_seed_same_weights_and_predictions_on_the_input_grid(tmp_path, data, cases):
    first, again, other = (get_segmenter(_settings(seed=s), tmp_path / name)
                           for name, s in (("a", 0), ("b", 0), ("c", 1)))
    for segmenter in (first, again, other):
        assert not segmenter.is_trained()
        segmenter.train(cases, progress=False)
        assert segmenter.is_trained() and not (segmenter.work_dir / CHECKPOINT).exists()
    assert _same(_weights(first.work_dir), _weights(again.work_dir))
    assert not _same(_weights(first.work_dir), _weights(other.work_dir))
    assert read_settings(first.work_dir) == first.settings
    # the prediction is written on the image's grid (AFFINE swaps and flips axes) and matches the canonical one
    image_path = data / "imagesTr" / "case_003_0000.nii.gz"
    (written,) = first.predict([image_path], tmp_path / "predicted", progress=False)
    assert written == tmp_path / "predicted" / "case_003.nii.gz"
    source = nib.load(str(image_path))
    out = nib.load(str(written))
    assert np.array_equal(out.affine, source.affine) and out.shape == source.shape
    assert out.get_data_dtype() == np.int16
    case = load_case(image_path)
    canonical = first.predict_array(case.image)
    assert canonical.shape == case.image.shape == (20, 24, 24)
    assert np.array_equal(np.asarray(out.dataobj), case.geometry.to_source(canonical))
    assert set(np.unique(canonical)) <= {0, 1, 2}


def test_volumes_larger_than_the_patch_train_on_patches_and_predict_by_sliding_window(tmp_path):
    image, label = blob_case(0, shape=(40, 24, 20))
    save_nifti(image, np.eye(4), tmp_path / "big_0000.nii.gz")
    save_nifti(label, np.eye(4), tmp_path / "big.nii.gz")
    segmenter = get_segmenter(_settings(iterations=1, patch=[32, 32, 32], batch_size=2), tmp_path / "work")
    segmenter.train([TrainingCase("big", tmp_path / "big_0000.nii.gz", tmp_path / "big.nii.gz")], progress=False)
    batch = segmenter._batch(torch.zeros(1, 1, 32, 48, 32), torch.zeros(1, 1, 32, 48, 32, dtype=torch.long),
                             segmenter._augment(whole=False), seed=0)
    assert batch["image"].shape == batch["label"].shape == (2, 1, 32, 32, 32)
    (written,) = segmenter.predict([tmp_path / "big_0000.nii.gz"], tmp_path / "predicted", progress=False)
    assert nib.load(str(written)).shape == (40, 24, 20)
    # several windows per forward pass (the default, 4) predict what one window at a time does
    assert segmenter.options["sw_batch_size"] == 4
    one_at_a_time = MonaiSegmenter(_settings(iterations=1, patch=[32, 32, 32], batch_size=2, sw_batch_size=1),
                                   tmp_path / "work")
    volume = image + 0.05 * np.random.default_rng(0).standard_normal(image.shape).astype(np.float32)
    assert np.array_equal(segmenter.predict_array(volume), one_at_a_time.predict_array(volume))


def test_an_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, cases, monkeypatch):
    whole = get_segmenter(_settings(iterations=4), tmp_path / "whole")
    whole.train(cases, progress=False)
    original = MonaiSegmenter._batch
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # the fourth iteration never runs: the last checkpoint is the second's
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MonaiSegmenter, "_batch", interrupted)
    resumed = get_segmenter(_settings(iterations=4), tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        resumed.train(cases, progress=False)
    assert not resumed.is_trained()
    state = torch.load(resumed.work_dir / CHECKPOINT, weights_only=True)
    assert state["iteration"] == 2 and "optimiser" in state and "torch_rng" in state
    monkeypatch.setattr(MonaiSegmenter, "_batch", original)
    resumed.train(cases, progress=False)
    assert _same(_weights(whole.work_dir), _weights(resumed.work_dir))
    # a checkpoint of other settings or cases is refused, with both keys
    other = get_segmenter(_settings(iterations=4, seed=5), tmp_path / "other")
    other.work_dir.mkdir()
    torch.save(dict(state, meta={"key": "0123abcd", "num_labels": 2}), other.work_dir / CHECKPOINT)
    with pytest.raises(ValueError, match=r"belongs to another training \(key 0123abcd, these settings and cases "
                                         r"have [0-9a-f]{16}\)"):
        other.train(cases, progress=False)


def test_the_cache_trains_once_per_settings_and_cases(tmp_path, cases, monkeypatch):
    first = trained_segmenter(_settings(iterations=2), cases, tmp_path / "cache", progress=False)
    assert first.work_dir == tmp_path / "cache" / _settings(iterations=2).key(cases) and first.is_trained()
    saved = json.loads((first.work_dir / "segmenter.json").read_text())
    assert saved["cases"] == ["case_000", "case_001", "case_002"] and saved["key"] == first.work_dir.name

    def no_training(self, *args, **kwargs):
        raise AssertionError("the cached segmenter was trained again")

    monkeypatch.setattr(MonaiSegmenter, "train", no_training)
    again = trained_segmenter(_settings(iterations=2), cases, tmp_path / "cache", progress=False)
    assert again.work_dir == first.work_dir and _same(_weights(again.work_dir), _weights(first.work_dir))
    with pytest.raises(AssertionError, match="trained again"):  # other cases: another folder, trained
        trained_segmenter(_settings(iterations=2), cases[:2], tmp_path / "cache", progress=False)
    loaded = load_trained_segmenter(first.work_dir, device="cpu")
    assert isinstance(loaded, MonaiSegmenter) and loaded.settings == first.settings
    with pytest.raises(ValueError, match="a fold applies to nnU-Net segmenters; .* holds a monai segmenter"):
        load_trained_segmenter(first.work_dir, fold="all")
    with pytest.raises(ValueError, match="holds no finished training"):
        (tmp_path / "unfinished").mkdir()
        get_segmenter(_settings(), tmp_path / "unfinished").save_settings(cases)
        load_trained_segmenter(tmp_path / "unfinished")


def test_known_answer_blobs_found_where_they_are_and_not_where_they_were_moved(tmp_path):
    """Trained on blob cases (bright sphere = 1, dark sphere = 2), the segmenter labels a held-out real-like volume
    almost exactly, and scores low on a volume whose blobs were swapped (the labels no longer match)."""
    data = blob_dataset(tmp_path / "data", n=6)
    cases = dataset_training_cases(data, [f"case_{i:03d}" for i in range(5)])
    settings = SegmenterSettings(iterations=60, options={"features": [4, 4, 8, 8, 16, 4], "learning_rate": 0.01})
    segmenter = trained_segmenter(settings, cases, tmp_path / "cache", progress=False)
    moved, _ = blob_case(5, swap=True)
    save_nifti(moved, AFFINE, tmp_path / "moved_0000.nii.gz")
    label = data / "labelsTr" / "case_005.nii.gz"
    real, shuffled = segmenter_dice(segmenter, [data / "imagesTr" / "case_005_0000.nii.gz",
                                                tmp_path / "moved_0000.nii.gz"], [label, label], 2, tmp_path / "out")
    assert min(real.values()) > 0.7, real
    assert max(shuffled.values()) < 0.2, shuffled
