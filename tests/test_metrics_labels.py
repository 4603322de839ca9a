"""gem3d.metrics.labels and .references: label fidelity, Dice, the segmenter's Dice with known answers (in the
evaluation and in enhance_dataset's --min-dice filter), copy/counterfactual references."""
import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gem3d.export import enhance as enhance_dataset
from gem3d.export.manifest import Manifest, make_record
from gem3d.export.nifti import save_nifti
from gem3d.metrics import evaluation, labels as label_metrics
from gem3d.metrics.references import copy_slice_volume, counterfactual_effect
from gem3d.segmentation import BACKENDS, SegmenterSettings, get_segmenter
from tests._segmenters import AFFINE, TRAINED, blob_case, blob_dataset


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


@pytest.fixture()
def threshold_backend(monkeypatch):
    """The ``threshold`` backend: :class:`tests._segmenters.ThresholdSegmenter`, exact on blob volumes."""
    monkeypatch.setitem(BACKENDS, "threshold", "tests._segmenters:ThresholdSegmenter")
    return SegmenterSettings(backend="threshold", iterations=1)


def test_segmenter_dice_known_answers(tmp_path, threshold_backend):
    """A segmenter that is exact on real volumes scores 1 on a real-like volume and 0 where the labels were moved."""
    segmenter = get_segmenter(threshold_backend, tmp_path / "work")
    image, label = blob_case(3)
    swapped, _ = blob_case(3, swap=True)
    save_nifti(image, AFFINE, tmp_path / "real_0000.nii.gz")
    save_nifti(swapped, AFFINE, tmp_path / "moved_0000.nii.gz")
    save_nifti(label, AFFINE, tmp_path / "label.nii.gz")
    from gem3d.data.case import load_case

    canonical = load_case(tmp_path / "real_0000.nii.gz", tmp_path / "label.nii.gz").label
    images = [tmp_path / "real_0000.nii.gz", tmp_path / "moved_0000.nii.gz", tmp_path / "real_0000.nii.gz"]
    masks = [tmp_path / "label.nii.gz", tmp_path / "label.nii.gz", canonical]  # a file or a canonical array
    dice = label_metrics.segmenter_dice(segmenter, images, masks, 2, tmp_path / "predicted")
    assert dice == [{1: 1.0, 2: 1.0}, {1: 0.0, 2: 0.0}, {1: 1.0, 2: 1.0}]
    written = nib.load(str(tmp_path / "predicted" / "moved.nii.gz"))
    assert np.array_equal(written.affine, AFFINE) and written.shape == image.shape  # on the image's own grid
    with pytest.raises(ValueError, match="one mask per image, got 3 images and 1 masks"):
        label_metrics.segmenter_dice(segmenter, images, masks[:1], 2, tmp_path / "predicted")
    with pytest.raises(ValueError, match=r"has shape \(20, 24, 24\), the mask of .* \(2, 2, 2\)"):
        label_metrics.segmenter_dice(segmenter, images[:1], [np.zeros((2, 2, 2), int)], 2, tmp_path / "predicted")


def test_dice_columns_use_the_label_names_and_average_the_labels_the_mask_holds():
    columns = label_metrics.dice_columns({1: 0.5, 2: float("nan"), 3: 1.0}, {1: "bright blob", 2: "core", 3: "ring"})
    assert columns["dice_bright_blob"] == 0.5 and columns["dice_ring"] == 1.0 and math.isnan(columns["dice_core"])
    assert columns["dice_mean"] == 0.75  # the NaN label (absent from the mask) is left out
    assert math.isnan(label_metrics.dice_columns({1: float("nan")}, {})["dice_mean"])


def _blob_outputs(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A blob dataset (cases 0-1 train, 2-3 val) and two setting folders of the val cases: ``faithful`` (the real
    volume, noisier) and ``moved`` (each blob drawn where the mask has the other)."""
    data = blob_dataset(tmp_path / "dataset", n=4)
    (data / "splits.json").write_text(json.dumps({"train": ["case_000", "case_001"], "val": ["case_002", "case_003"],
                                                  "test": []}))
    folders = {}
    for setting, swap in (("faithful", False), ("moved", True)):
        folder = folders[setting] = tmp_path / "out" / setting
        for i in (2, 3):
            image, label = blob_case(i, swap=swap)
            files = {"image": f"case_{i:03d}_s0_image.nii.gz", "label": f"case_{i:03d}_s0_label.nii.gz"}
            save_nifti(image + np.where(image > 0, 1.0, 0.0), AFFINE, folder / files["image"])
            save_nifti(label, AFFINE, folder / files["label"])
            Manifest(folder / "manifest.json").add(make_record(f"case_{i:03d}", "ic", 0, 0, files=files))
    return data, folders


def test_evaluation_label_fidelity_known_answers_and_cache(tmp_path, threshold_backend):
    data, folders = _blob_outputs(tmp_path)
    report = tmp_path / "report"
    argv = ["--real", str(data), "--cases", "split:val", "--out", str(report), "--metrics", "labels", "segmenter",
            "--segmenter-backend", "threshold", "--synthetic", f"faithful={folders['faithful']}",
            "--synthetic", f"moved={folders['moved']}"]
    assert evaluation.main(argv) == 0
    with open(report / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    by_row = {}
    for row in rows:
        by_row.setdefault(row["row"], []).append(row)
    assert sorted(by_row) == ["faithful", "moved", "reference: copy informed slice", "reference: real volume"]
    for name, expected in (("reference: real volume", 1.0), ("faithful", 1.0), ("moved", 0.0)):
        assert [r["case"] for r in by_row[name]] == ["case_002", "case_003"]
        for r in by_row[name]:
            assert (float(r["dice_bright_blob"]), float(r["dice_dark_blob"])) == (expected, expected), name
            assert float(r["dice_mean"]) == expected and float(r["dice_ratio"]) == expected, name
    summary = (report / "summary.md").read_text()
    assert "| reference: real volume | 2 |" in summary and "| moved | 2 |" in summary
    header = next(line for line in summary.splitlines() if line.startswith("| row |"))
    assert {"dice_mean", "dice_ratio"} <= set(header.replace(" ", "").split("|"))  # the headline's label fidelity
    html = (report / "report.html").read_text()  # the per-label Dice: metrics.csv (above) and the report's details
    assert "dice_bright_blob" in html and "dice_dark_blob" in html
    # trained on splits.json's train cases only, once; the second evaluation reuses it
    (work,) = list((report / "segmenter_cache").iterdir())
    assert json.loads((work / TRAINED).read_text())["cases"] == ["case_000", "case_001"]
    (work / TRAINED).write_text(json.dumps({"cases": "kept"}))
    assert evaluation.main(argv) == 0
    assert json.loads((work / TRAINED).read_text()) == {"cases": "kept"} and len(list(work.parent.iterdir())) == 1
    # a new seed is another segmenter
    assert evaluation.main(argv + ["--segmenter-seed", "1"]) == 0
    assert len(list((report / "segmenter_cache").iterdir())) == 2


def test_evaluation_uses_a_trained_segmenter_folder(tmp_path, threshold_backend):
    data, folders = _blob_outputs(tmp_path)
    trained = get_segmenter(threshold_backend, tmp_path / "trained")
    trained.save_settings()
    trained.train([])
    report = tmp_path / "report"
    assert evaluation.main(["--real", str(data), "--cases", "split:val", "--out", str(report), "--metrics",
                            "segmenter", "--segmenter", str(tmp_path / "trained"),
                            "--synthetic", f"moved={folders['moved']}"]) == 0
    rows = list(csv.DictReader(open(report / "metrics.csv")))
    assert [float(r["dice_mean"]) for r in rows if r["row"] == "moved"] == [0.0, 0.0]
    assert not (report / "segmenter_cache").exists()
    with pytest.raises(ValueError, match="neither a gem3d segmenter folder"):
        evaluation.main(["--real", str(data), "--out", str(report), "--metrics", "segmenter",
                         "--segmenter", str(tmp_path)])


def _enhance(argv):
    return enhance_dataset.main(argv)


@pytest.mark.parametrize("regions", [False, True])
def test_min_dice_filter_keeps_faithful_cases_with_plain_and_region_labels(tmp_path, threshold_backend, regions,
                                                                           capsys):
    """BraTS-style region labels (lists in dataset.json) once made every Dice NaN, so every case was dropped."""
    labels = {"background": 0, "whole": [1, 2], "dark blob": [2]} if regions else None
    real = blob_dataset(tmp_path / "raw" / "Dataset001_Blobs", n=2, labels=labels,
                        regions_class_order=[1, 2] if regions else None)
    folder = tmp_path / "out" / "icma"
    for i, swap in ((0, False), (1, True)):
        image, label = blob_case(i, swap=swap)
        save_nifti(image, AFFINE, folder / f"case_{i:03d}_s0_image.nii.gz")
        save_nifti(label, AFFINE, folder / f"case_{i:03d}_s0_label.nii.gz")
    out = tmp_path / "raw" / "Dataset101_Enhanced"
    code = _enhance(["--real", str(real), "--synthetic", str(folder), "--out", str(out), "--min-dice", "0.5",
                     "--segmenter-backend", "threshold", "--segmenter-device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "quality_filter.json").read_text())
    assert report["dice"] == {"case_000_icma_s0": 1.0, "case_001_icma_s0": 0.0}
    assert report["dropped"] == ["case_001_icma_s0"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["case_000.nii.gz", "case_000_icma_s0.nii.gz",
                                                                     "case_001.nii.gz"]
    assert "dropped 1 of 2" in capsys.readouterr().out
    assert len(list((tmp_path / "raw" / "gem3d_segmenter_cache").iterdir())) == 1  # outside the datasets
    assert _enhance(["--real", str(real), "--synthetic", str(folder), "--out", str(tmp_path / "x"),
                     "--min-dice", "1.5", "--segmenter-backend", "threshold"]) == 2
    assert "--min-dice must lie in [0, 1], got 1.5" in capsys.readouterr().err


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
