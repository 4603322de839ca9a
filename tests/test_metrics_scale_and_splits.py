"""The evaluation's intensity scale (a CT model's training window, from the manifest or --window) and its
``--cases split:NAME`` (the splits file where inference finds it)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gem3d.data.datasets import default_splits_path, split_cases
from gem3d.data.preprocess import PreprocessConfig
from gem3d.export.manifest import Manifest, make_record
from gem3d.metrics import evaluation
from gem3d.metrics.image import to_unit_range
from gem3d.metrics.volumes import REAL_RANGE, IntensityScale, RealData, scale_from_preprocess
from gem3d.segmentation import BACKENDS
from tests._segmenters import TRAINED, blob_dataset

SHAPE = (20, 20, 12)
WINDOW = (-200.0, 300.0)
CT_PREPROCESS = dataclasses.asdict(PreprocessConfig(size=None, intensity="window", window=WINDOW, max_label=2,
                                                    body="threshold"))


def _save(array, path: Path, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype), np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def _ct_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume in HU: air -1000 around an ellipsoid body of soft tissue (40 +- 10, label 1) with a lesion
    (90, label 2) and bone (1500) outside the labels: its full range is [-1000, 1500], far wider than the window."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in SHAPE), indexing="ij")
    body = x**2 + y**2 + z**2 < 0.8
    label = np.where(body, 1, 0).astype(np.int16)
    label[(x - 0.2) ** 2 + y**2 + (z * 0.8) ** 2 < 0.12] = 2
    image = np.where(body, 40 + rng.normal(0, 10, SHAPE), -1000.0)
    image[label == 2] = 90 + rng.normal(0, 10, int((label == 2).sum()))
    bone = body & (x**2 + y**2 + z**2 > 0.6)
    image[bone], label[bone] = 1500.0, 0
    return image.astype(np.float32), label


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """A CT dataset of 3 cases and two output folders of the same ``test`` volumes (a perfect model's: the real
    volume clipped to the window, as a CT model trained in it draws it): ``windowed`` records the model's
    preprocessing in its manifest, ``unrecorded`` (an older run) does not."""
    root = tmp_path_factory.mktemp("ct")
    data = root / "dataset"
    names = [f"ct_{i:03d}" for i in range(3)]
    for i, name in enumerate(names):
        image, label = _ct_case(i)
        _save(image, data / "imagesTr" / f"{name}_0000.nii.gz")
        _save(label, data / "labelsTr" / f"{name}.nii.gz", np.int16)
        for folder, extra in (("windowed", {"preprocess": CT_PREPROCESS}), ("unrecorded", {})):
            files = {"image": f"{name}_s0_image.nii.gz", "label": f"{name}_s0_label.nii.gz",
                     "gt": f"{name}_gt.nii.gz"}
            _save(np.clip(image, *WINDOW), root / folder / files["image"])
            _save(label, root / folder / files["label"], np.int16)
            _save(image, root / folder / files["gt"])
            Manifest(root / folder / "manifest.json").add(make_record(
                name, "test", 0, 0, informed={"source": "own_middle", "case": name, "index": 6}, files=files,
                seconds=1.0, **extra))
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {
        "background": 0, "organ": 1, "lesion": 2}, "numTraining": 3, "file_ending": ".nii.gz"}))
    return root


def _evaluate(root: Path, folder: str, report: Path, *extra: str) -> tuple[dict[str, list[dict]], str]:
    assert evaluation.main(["--real", str(root / "dataset"), "--synthetic", f"gem3d={root / folder}", "--out",
                            str(report), "--body", "threshold", "--metrics", "reconstruction", "consistency",
                            "labels", *extra]) == 0
    by_row: dict[str, list[dict]] = {}
    with open(report / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            by_row.setdefault(row["row"], []).append(row)
    return by_row, (report / "summary.md").read_text()


def test_ct_is_evaluated_inside_the_models_window_recorded_in_the_manifest(ct, tmp_path):
    rows, summary = _evaluate(ct, "windowed", tmp_path / "windowed")
    for r in rows["gem3d"]:  # the perfect model's volume: identical to the real one inside the window
        assert float(r["psnr_body"]) == math.inf and float(r["ssim_axial_body"]) == pytest.approx(1.0)
        assert float(r["outside_mean_diff"]) == 0.0 and float(r["mean_diff_lesion"]) == 0.0
    assert "| gem3d | the window [-200, 300], both volumes clipped to it (the model's training window, from the " \
           "manifest) |" in summary
    assert "| reference: real volume | the window [-200, 300]" in summary  # the references on the same scale
    assert "each row's [0, 1] intensity scale" in summary
    html = (tmp_path / "windowed" / "report.html").read_text()
    assert "Intensity scale" in html and "the window [-200, 300]" in html
    # the same volumes on each real case's full HU range (the old scale): air comes out 0.32 too bright
    old, old_summary = _evaluate(ct, "unrecorded", tmp_path / "unrecorded")
    for r in old["gem3d"]:
        assert float(r["outside_mean_diff"]) == pytest.approx(800 / 2500, abs=1e-6)
        assert float(r["psnr_body"]) < 20
    assert "| gem3d | each real case's min/max (not clipped) |" in old_summary
    assert "pass --window LO HI to evaluate inside the model's window" in old_summary
    # --window puts an older run on the model's window
    given, given_summary = _evaluate(ct, "unrecorded", tmp_path / "given", "--window", "-200", "300")
    assert [float(r["psnr_body"]) for r in given["gem3d"]] == [math.inf] * 3
    assert "| gem3d | the window [-200, 300], both volumes clipped to it (--window) |" in given_summary


def test_intensity_scales():
    raw = np.array([[[-1000.0, -200.0], [50.0, 1500.0]]])
    assert np.array_equal(REAL_RANGE.to_unit(raw, (-1000.0, 1500.0)), to_unit_range(raw, raw))  # MRI: as before
    window = IntensityScale(WINDOW)
    assert window.to_unit(raw, (-1000.0, 1500.0)).tolist() == [[[0.0, 0.0], [0.5, 1.0]]]
    assert scale_from_preprocess(CT_PREPROCESS).window == WINDOW
    for intensity in ("minmax", "percentile"):
        assert scale_from_preprocess({**CT_PREPROCESS, "intensity": intensity}) is REAL_RANGE
    assert scale_from_preprocess(None) is REAL_RANGE
    with pytest.raises(ValueError, match=r"lo < hi, got \(300.0, -200.0\)"):
        IntensityScale((300.0, -200.0))


def test_a_folder_whose_records_ran_with_different_preprocessing_is_refused(ct, tmp_path):
    folder = tmp_path / "mixed"
    records = Manifest(ct / "windowed" / "manifest.json").records
    records[1]["preprocess"] = {**CT_PREPROCESS, "window": [-100.0, 200.0]}
    Manifest(folder / "manifest.json").extend(records)
    with pytest.raises(ValueError, match="records ran with different preprocessing"):
        evaluation.load_samples(folder, "mixed", RealData(ct / "dataset", body="threshold"))


def test_cases_split_reads_the_splits_file_in_the_cache_folder(tmp_path, monkeypatch):
    """A dataset without its own splits.json: training wrote it in the dataset's cache folder; the evaluation finds
    it there, as inference does, for --cases split:NAME and for the segmenter's training cases."""
    monkeypatch.setenv("GEM3D_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(BACKENDS, "threshold", "tests._segmenters:ThresholdSegmenter")
    data = blob_dataset(tmp_path / "dataset", n=4)
    real = RealData(data)
    with pytest.raises(SystemExit, match=r"--cases split:val: .*splits.json does not exist"):
        evaluation.select_cases("split:val", real)
    path = default_splits_path(data)
    assert path.parent != data and str(path).startswith(str(tmp_path / "cache"))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"train": ["case_000", "case_001"], "val": ["case_002", "case_003"], "test": []}))
    assert evaluation.select_cases("split:val", real) == {"case_002", "case_003"}
    assert split_cases(data, "val") == ["case_002", "case_003"]  # the one function inference uses
    with pytest.raises(SystemExit, match=r"splits.json has \['test', 'train', 'val'\], not 'tune'"):
        evaluation.select_cases("split:tune", real)
    report = tmp_path / "report"
    assert evaluation.main(["--real", str(data), "--cases", "split:val", "--out", str(report), "--metrics",
                            "segmenter", "--segmenter-backend", "threshold"]) == 0
    (work,) = list((report / "segmenter_cache").iterdir())
    assert json.loads((work / TRAINED).read_text())["cases"] == ["case_000", "case_001"]
    rows = list(csv.DictReader(open(report / "metrics.csv")))
    assert [r["case"] for r in rows if r["row"] == "reference: real volume"] == ["case_002", "case_003"]
    # --splits names another file
    other = tmp_path / "other_splits.json"
    other.write_text(json.dumps({"train": ["case_003"], "val": ["case_000"], "test": []}))
    assert evaluation.select_cases("split:val", real, other) == {"case_000"}
