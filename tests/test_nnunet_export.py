import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gem3d.export.nifti import save_nifti
from gem3d.files import atomic_write_json
from gem3d.export.nnunet import find_synthetic_cases, validate_nnunet_dataset, write_nnunet_dataset

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (8, 9, 10)
AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [1.25, 0.0, 0.0, -4.0], [0.0, 0.0, 2.0, 3.5], [0, 0, 0, 1]])
LABELS = {"background": 0, "edema": 1, "tumour": 2}


def label_volume(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, SHAPE).astype(np.int16)


def make_real(root: Path, ending=".nii.gz", cases=("case_000", "case_001", "case_002")) -> Path:
    for i, case in enumerate(cases):
        for channel in range(2):
            image = np.full(SHAPE, 10 * i + channel, np.float32)
            save_nifti(image, AFFINE, root / "imagesTr" / f"{case}_{channel:04d}{ending}")
        save_nifti(label_volume(i), AFFINE, root / "labelsTr" / f"{case}{ending}")
    atomic_write_json(root / "dataset.json", {
        "name": "Toy", "channel_names": {"0": "FLAIR", "1": "T1"}, "labels": LABELS,
        "numTraining": len(cases), "file_ending": ending, "licence": "test",
    })
    return root


def make_synthetic(out: Path, setting: str, samples) -> Path:
    folder = out / setting
    for case, k in samples:
        save_nifti(np.full(SHAPE, 100.0 + k, np.float32), AFFINE, folder / f"{case}_s{k}_image.nii.gz")
        save_nifti(label_volume(50 + k), AFFINE, folder / f"{case}_s{k}_label.nii.gz")
    return folder


@pytest.fixture()
def sources(tmp_path):
    real = make_real(tmp_path / "raw" / "Dataset001_Toy")
    icma = make_synthetic(tmp_path / "out", "icma", [("case_000", 0), ("case_000", 1), ("case_001", 0)])
    ic = make_synthetic(tmp_path / "out", "ic", [("case_002", 0)])
    return real, [icma, ic]


def test_export_validates_and_counts(tmp_path, sources):
    real, synthetic = sources
    out = write_nnunet_dataset(real, synthetic, tmp_path / "raw" / "Dataset101_ToyGem3d")
    assert validate_nnunet_dataset(out) == []
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 7
    assert meta["channel_names"] == {"0": "FLAIR"} and meta["labels"] == LABELS
    assert meta["file_ending"] == ".nii.gz" and meta["name"] == "Dataset101_ToyGem3d" and meta["licence"] == "test"
    names = sorted(p.name for p in (out / "labelsTr").iterdir())
    assert names == sorted(
        [f"case_00{i}.nii.gz" for i in range(3)]
        + ["case_000_icma_s0.nii.gz", "case_000_icma_s1.nii.gz", "case_001_icma_s0.nii.gz", "case_002_ic_s0.nii.gz"]
    )
    assert len(list((out / "imagesTr").glob("*_0000.nii.gz"))) == 7 == len(list((out / "imagesTr").iterdir()))
    real_image = nib.load(str(out / "imagesTr" / "case_001_0000.nii.gz"))
    assert np.all(np.asanyarray(real_image.dataobj) == 10.0)  # channel 0 of case_001
    synthetic_image = nib.load(str(out / "imagesTr" / "case_000_icma_s1_0000.nii.gz"))
    assert np.all(np.asanyarray(synthetic_image.dataobj) == 101.0)
    assert np.array_equal(synthetic_image.affine, AFFINE)
    assert np.array_equal(np.asanyarray(nib.load(str(out / "labelsTr" / "case_000_icma_s1.nii.gz")).dataobj), label_volume(51))
    recorded = json.loads((out / "gem3d_sources.json").read_text())["cases"]
    assert recorded["case_002_ic_s0"]["setting"] == "ic" and recorded["case_000"]["kind"] == "real"

    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_nnunet_dataset(real, synthetic, out)
    again = write_nnunet_dataset(real, synthetic[:1], out, overwrite=True, channel=1, dataset_name="Named")
    meta = json.loads((again / "dataset.json").read_text())
    assert meta["numTraining"] == 6 and meta["channel_names"] == {"0": "T1"} and meta["name"] == "Named"
    assert np.all(np.asanyarray(nib.load(str(again / "imagesTr" / "case_001_0000.nii.gz")).dataobj) == 11.0)
    assert validate_nnunet_dataset(again) == []


def test_symlinks_and_nii_source(tmp_path):
    real = make_real(tmp_path / "Dataset002_Nii", ending=".nii")
    synthetic = make_synthetic(tmp_path / "out", "test", [("case_000", 0)])
    out = write_nnunet_dataset(real, [synthetic], tmp_path / "Dataset102_Linked", copy=False)
    assert validate_nnunet_dataset(out) == []
    linked = out / "labelsTr" / "case_000_test_s0.nii.gz"
    assert linked.is_symlink() and linked.resolve() == (synthetic / "case_000_s0_label.nii.gz").resolve()
    converted = nib.load(str(out / "labelsTr" / "case_000.nii.gz"))
    assert np.array_equal(converted.affine, AFFINE)
    assert np.array_equal(np.asanyarray(converted.dataobj), label_volume(0))


def test_validate_catches_broken_datasets(tmp_path, sources):
    real, synthetic = sources
    out = write_nnunet_dataset(real, synthetic, tmp_path / "Dataset103_Broken")
    (out / "imagesTr" / "case_000_icma_s0_0000.nii.gz").unlink()
    (out / "imagesTr" / "stray_0000.nii.gz").write_bytes(b"")
    save_nifti(np.full(SHAPE, 5, np.int16), AFFINE, out / "labelsTr" / "case_001.nii.gz")
    save_nifti(np.zeros((8, 9, 11), np.float32), AFFINE, out / "imagesTr" / "case_002_0000.nii.gz")
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    save_nifti(np.zeros(SHAPE, np.float32), shifted, out / "imagesTr" / "case_000_0000.nii.gz")
    meta = json.loads((out / "dataset.json").read_text())
    meta["numTraining"] = 3
    atomic_write_json(out / "dataset.json", meta)
    problems = "\n".join(validate_nnunet_dataset(out))
    assert "numTraining=3 but imagesTr holds 7 cases" in problems
    assert "case_000_icma_s0_0000.nii.gz" in problems and "missing" in problems
    assert "stray_0000.nii.gz" in problems
    assert "undeclared_label: case=case_001 file=labelsTr/case_001.nii.gz value=[5] not in dataset.json" in problems
    assert "shape_mismatch: case=case_002 file=labelsTr/case_002.nii.gz value=(8, 9, 10) vs image (8, 9, 11)" \
        in problems
    assert "affine_mismatch: case=case_000 file=labelsTr/case_000.nii.gz" in problems
    assert len(validate_nnunet_dataset(out)) == 7  # the stray image: unreadable, and without a label

    renamed = tmp_path / "toy_dataset"
    (renamed / "imagesTr").mkdir(parents=True)
    atomic_write_json(renamed / "dataset.json", {"channel_names": {"0": "x"}, "labels": {"a": 1}, "numTraining": 0, "file_ending": ".nii.gz"})
    problems = validate_nnunet_dataset(renamed)
    assert any("DatasetNNN_Name" in p for p in problems)
    assert any("background = 0" in p for p in problems)
    assert any("labelsTr/ is missing" in p for p in problems)
    assert validate_nnunet_dataset(tmp_path / "nothing") == [f"{tmp_path / 'nothing'} is not a folder"]


def test_unpaired_synthetic_files_are_refused(tmp_path, sources):
    real, synthetic = sources
    (synthetic[0] / "case_001_s0_label.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case_001_s0_image.nii.gz \(no case_001_s0_label.nii.gz\)"):
        find_synthetic_cases(synthetic[0])
    with pytest.raises(ValueError, match="unpaired"):
        write_nnunet_dataset(real, synthetic, tmp_path / "Dataset104_X")
    assert not (tmp_path / "Dataset104_X" / "dataset.json").exists()


def test_cli(tmp_path, sources, capsys):
    real, synthetic = sources
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import enhance_dataset
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "Dataset105_Cli"
    code = enhance_dataset.main(["--real", str(real), "--synthetic", *map(str, synthetic), "--out", str(out)])
    assert code == 0
    assert "with 7 training cases" in capsys.readouterr().out
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 7
