"""The evaluation (gem3d.metrics.evaluation, behind scripts/evaluate.py) end to end on a tiny real dataset and
manifest-like synthetic folders written here."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from gem3d.export.manifest import Manifest, make_record
from gem3d.metrics import evaluation, features

ROOT = Path(__file__).resolve().parents[1]
CASES = ("case_000", "case_001", "case_002", "case_003")  # case_003: no synthetic sample; the segmenter trains on it
SHAPE = (20, 20, 12)  # x, y, z (RAS): 12 axial slices of 20 x 20
LABELS = {"background": 0, "tissue": 1, "lesion": 2}


def _save(array, path: Path, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype), np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def _case(seed: int, contrast: float):
    """A head-like ellipsoid (label 1) with a lesion (label 2), zero outside; ``contrast`` sets lesion brightness."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in SHAPE), indexing="ij")
    body = x**2 + y**2 + z**2 < 0.8
    label = np.where(body, 1, 0)
    label[(x - 0.2) ** 2 + y**2 + (z * 0.8) ** 2 < 0.12] = 2
    image = np.where(label == 1, 0.5, 0.0) + np.where(label == 2, contrast, 0.0)
    image = np.where(body, image + rng.normal(0, 0.03, SHAPE), 0.0)
    return image.astype(np.float32) * 100, label


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "dataset"
    real = {}
    for i, name in enumerate(CASES):
        image, label = _case(i, contrast=0.9 if i != 2 else -0.4)  # case_002: lesion darker than tissue
        _save(image, data / "imagesTr" / f"{name}_0000.nii.gz")
        _save(label, data / "labelsTr" / f"{name}.nii.gz", np.int16)
        real[name] = (image, label)
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": LABELS,
                                                   "numTraining": len(CASES), "file_ending": ".nii.gz"}))
    rng = np.random.default_rng(7)

    def write(setting_dir: Path, setting: str, case: str, volume, informed, gt=False):
        files = {"image": f"{case}_s0_image.nii.gz", "label": f"{case}_s0_label.nii.gz",
                 "preview": f"previews/{case}_s0.png"}
        _save(volume, setting_dir / files["image"])
        _save(real[case][1], setting_dir / files["label"], np.int16)
        (setting_dir / "previews").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 24, 3), 128, np.uint8)).save(setting_dir / files["preview"])
        if gt:
            files["gt"] = f"{case}_gt.nii.gz"
            _save(real[case][0], setting_dir / files["gt"])
        Manifest(setting_dir / "manifest.json").add(make_record(case, setting, 0, 0, informed=informed, files=files))

    out = root / "out"
    for case, (image, label) in list(real.items())[:3]:
        noisy = np.where(label > 0, image + rng.normal(0, 3.0, image.shape), 0.0)
        write(out / "test", "test", case, noisy, {"source": "own_middle", "case": case, "index": 6}, gt=True)
        striped = np.where(label > 0, image + rng.normal(0, 8.0, (1, 1, SHAPE[2])), 0.0)
        write(out / "stage1", "test", case, striped, {"source": "own_middle", "case": case, "index": 6}, gt=True)
    # counterfactual: case_000's mask with a bright-lesion donor and a dark-lesion donor, in two output roots
    image, label = real["case_000"]
    for donor, contrast, folder in (("case_001", 0.9, "cf_bright"), ("case_002", -0.4, "cf_dark")):
        volume = np.where(label == 1, 50.0, 0.0) + np.where(label == 2, 100 * (0.5 + contrast), 0.0)
        write(root / folder / "ic", "ic", "case_000", volume, {"source": "other_case", "case": donor, "index": 6})
    # random-weight feature networks saved in the published layouts
    resnet = features.radimagenet_resnet50()
    torch.save({f"backbone.{ {'conv1': 0, 'bn1': 1, 'layer1': 4, 'layer2': 5, 'layer3': 6, 'layer4': 7}[k.split('.')[0]] }."
                f"{k.split('.', 1)[1]}": v for k, v in resnet.state_dict().items()}, root / "ResNet50.pt")
    medicalnet = features.medicalnet_resnet(10)
    state = {f"module.{k}": v for k, v in medicalnet.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state}, root / "resnet_10.pth")
    return {"root": root, "data": data, "out": out}


def test_evaluate_writes_csv_summary_plots_and_offline_html(folders, capsys):
    report = folders["root"] / "report"
    root = folders["root"]
    code = evaluation.main([
        "--real", str(folders["data"]), "--synthetic", f"gem3d={folders['out'] / 'test'}",
        "--synthetic", f"stage1={folders['out'] / 'stage1'}", "--synthetic", f"cf_bright={root / 'cf_bright' / 'ic'}",
        "--synthetic", f"cf_dark={root / 'cf_dark' / 'ic'}", "--out", str(report),
        "--metrics", "reconstruction", "consistency", "labels", "fid", "mmd", "counterfactual", "segmenter",
        "--fid-weights-2d", str(root / "ResNet50.pt"), "--fid-weights-3d", str(root / "resnet_10.pth"),
        "--segmenter-iterations", "2",  # a MONAI segmenter trained on case_003, the one case not evaluated
        "--segmenter-options", '{"batch_size": 1, "features": [4, 4, 8, 8, 16, 4]}',
    ])
    assert code == 0
    for name in ("metrics.csv", "summary.md", "report.html", "slice_jumps.png", "profile_through_plane.png",
                 "histogram_label1.png", "histogram_label2.png", "counterfactual.csv"):
        assert (report / name).is_file(), name
    with open(report / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    assert {"row", "case", "sample", "psnr_body", "ssim_axial_body", "ms_ssim", "slice_jump_ratio",
            "mean_diff_lesion", "outside_mean"} <= columns
    by_row = {}
    for row in rows:
        by_row.setdefault(row["row"], []).append(row)
    assert set(by_row) == {"reference: copy informed slice", "gem3d", "stage1", "cf_bright", "cf_dark",
                           "reference: real volume"}
    assert len(by_row["gem3d"]) == 3 and len(by_row["reference: real volume"]) == 3
    assert {"dice_tissue", "dice_lesion", "dice_mean", "dice_ratio"} <= columns
    for name in ("gem3d", "stage1", "cf_bright", "cf_dark", "reference: real volume"):  # every scored row
        assert all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in by_row[name]), name
    assert all(r["dice_mean"] == "" for r in by_row["reference: copy informed slice"])
    reference = np.mean([float(r["dice_mean"]) for r in by_row["reference: real volume"]])
    for r in by_row["gem3d"]:
        assert float(r["dice_ratio"]) == pytest.approx(float(r["dice_mean"]) / reference, rel=1e-4)
    assert sorted(p.name for p in (report / "segmentations" / "gem3d").glob("*.nii.gz")) == [
        f"case_00{i}_s0.nii.gz" for i in range(3)]
    cache = list((report / "segmenter_cache").iterdir())
    held = json.loads((cache[0] / "segmenter.json").read_text())
    assert len(cache) == 1 and held["cases"] == ["case_003"]
    assert held["settings"]["options"] == {"num_labels": 2, "batch_size": 1, "features": [4, 4, 8, 8, 16, 4]}
    assert "batch_size 1, features [4, 4, 8, 8, 16, 4])" in (report / "summary.md").read_text()
    # the striped volume jumps more between slices than the noisy one; the real one has ratio 1
    mean = lambda r, m: np.mean([float(x[m]) for x in by_row[r]])  # noqa: E731
    assert mean("stage1", "slice_jump_ratio") > mean("gem3d", "slice_jump_ratio")
    assert mean("reference: real volume", "slice_jump_ratio") == pytest.approx(1.0)
    assert mean("gem3d", "psnr_body") > mean("reference: copy informed slice", "psnr_body")
    summary = (report / "summary.md").read_text()
    assert "| gem3d | 3 |" in summary and "fid_25d" in summary and "fid_3d" in summary
    assert "| reference: real volume | 3 |" in summary and "dice_mean" in summary and "dice_lesion" in summary
    assert "trained on the 1 real training cases ['case_003']" in summary
    assert "autoencoder" in summary  # its row is named as skipped
    html = (report / "report.html").read_text()
    assert not re.search(r"https?://", html)
    assert html.count("data:image/png;base64,") >= 5 + 8 + 3  # plots, synthetic previews, reference previews
    assert len(list((report / "previews").glob("reference_copy_informed_slice_case_00*.png"))) == 3
    with open(report / "counterfactual.csv") as handle:
        cf = list(csv.DictReader(handle))
    assert len(cf) == 1 and float(cf[0]["follows_donor"]) == 1.0
    assert "gem3d" in capsys.readouterr().out


def test_evaluate_with_autoencoder_reference_row(folders, tmp_path):
    from tests import _tiny_models

    model = _tiny_models.build_model_dir(tmp_path / "model", "volume_stage",
                                         preprocess=dict(_tiny_models.PREPROCESS, size=16))
    report = tmp_path / "report"
    code = evaluation.main(["--real", str(folders["data"]), "--synthetic", f"gem3d={folders['out'] / 'test'}",
                             "--out", str(report), "--metrics", "reconstruction", "consistency",
                             "--autoencoder", str(model), "--link-images", "--cases", "case_000,case_002"])
    assert code == 0
    with open(report / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["row"] == "reference: autoencoder"]
    assert sorted(r["case"] for r in rows) == ["case_000", "case_002"]
    assert all(np.isfinite(float(r["psnr_body"])) for r in rows)
    assert "data:image" not in (report / "report.html").read_text()


def test_synthetic_folder_without_manifest_and_unknown_cases_are_named(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        evaluation.main(["--real", str(folders["data"]), "--synthetic", str(tmp_path), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match=r"unknown case\(s\) \['nope'\]"):
        evaluation.main(["--real", str(folders["data"]), "--cases", "nope", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="splits.json"):
        evaluation.main(["--real", str(folders["data"]), "--cases", "split:val", "--out", str(tmp_path / "r")])


def test_reconstruction_quality_for_the_demo_table_matches_the_report(folders, tmp_path):
    from gem3d.metrics.volumes import reconstruction_quality

    setting_dir = folders["out"] / "test"
    records = Manifest(setting_dir / "manifest.json").records
    quality = reconstruction_quality(setting_dir, records)
    assert reconstruction_quality(setting_dir, [dict(r, files={"image": r["files"]["image"]}) for r in records]) is None
    report = tmp_path / "report"
    evaluation.main(["--real", str(folders["data"]), "--synthetic", f"gem3d={setting_dir}", "--out", str(report),
                      "--metrics", "reconstruction"])
    with open(report / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["row"] == "gem3d"]
    for key in ("psnr_body", "ssim_axial_body", "ms_ssim"):
        assert quality[key] == pytest.approx(np.mean([float(r[key]) for r in rows]), rel=1e-4), key


@pytest.mark.parametrize("text, message", [("[32, 48, 48]", "must be a JSON object"), ("{patch: 1}", "not JSON")])
def test_segmenter_options_must_be_a_json_object(text, message, capsys):
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--real", "data", "--synthetic", "a=b", "--segmenter-options", text])
    err = capsys.readouterr().err
    assert "--segmenter-options" in err and message in err and text in err


def test_the_script_is_a_thin_entry_point_to_the_package():
    script = ROOT / "scripts" / "evaluate.py"
    assert len(script.read_text().splitlines()) <= 30
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    for flag in ("--segmenter-backend", "--segmenter-iterations", "--segmenter-seed", "--segmenter-device",
                 "--segmenter-cache", "--segmenter-options", "--segmenter TRAINED_FOLDER"):
        assert flag in done.stdout, flag
