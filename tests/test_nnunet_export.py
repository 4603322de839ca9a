import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gem3d.export import enhance as enhance_dataset
from gem3d.export.nifti import save_nifti
from gem3d.files import atomic_write_json
from gem3d.export.nnunet import (crossval_folds, find_synthetic_cases, leak_free_splits, validate_nnunet_dataset,
                                 write_nnunet_dataset)

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
    out = write_nnunet_dataset(real, synthetic, tmp_path / "raw" / "Dataset101_ToyGem3d", channel="FLAIR")
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
        write_nnunet_dataset(real, synthetic, out, channel=0)
    again = write_nnunet_dataset(real, synthetic[:1], out, overwrite=True, channel=1, dataset_name="Named")
    meta = json.loads((again / "dataset.json").read_text())
    assert meta["numTraining"] == 6 and meta["channel_names"] == {"0": "T1"} and meta["name"] == "Named"
    assert np.all(np.asanyarray(nib.load(str(again / "imagesTr" / "case_001_0000.nii.gz")).dataobj) == 11.0)
    assert validate_nnunet_dataset(again) == []


def test_symlinks_and_nii_source(tmp_path):
    real = make_real(tmp_path / "Dataset002_Nii", ending=".nii")
    synthetic = make_synthetic(tmp_path / "out", "test", [("case_000", 0)])
    out = write_nnunet_dataset(real, [synthetic], tmp_path / "Dataset102_Linked", copy=False, channel=0)
    assert validate_nnunet_dataset(out) == []
    linked = out / "labelsTr" / "case_000_test_s0.nii.gz"
    assert linked.is_symlink() and linked.resolve() == (synthetic / "case_000_s0_label.nii.gz").resolve()
    converted = nib.load(str(out / "labelsTr" / "case_000.nii.gz"))
    assert np.array_equal(converted.affine, AFFINE)
    assert np.array_equal(np.asanyarray(converted.dataobj), label_volume(0))


def test_validate_catches_broken_datasets(tmp_path, sources):
    real, synthetic = sources
    out = write_nnunet_dataset(real, synthetic, tmp_path / "Dataset103_Broken", channel=0)
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
        write_nnunet_dataset(real, synthetic, tmp_path / "Dataset104_X", channel=0)
    assert not (tmp_path / "Dataset104_X" / "dataset.json").exists()


def test_cli(tmp_path, sources, capsys):
    real, synthetic = sources
    out = tmp_path / "Dataset105_Cli"
    code = enhance_dataset.main(["--real", str(real), "--synthetic", *map(str, synthetic), "--out", str(out),
                                 "--channel", "FLAIR"])
    assert code == 0
    assert "with 7 training cases" in capsys.readouterr().out
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 7


def test_a_multichannel_real_dataset_needs_the_channel_named(tmp_path, sources):
    """Synthetic cases have one modality: a 4-channel BraTS export once wrote channel 0 alone without a word."""
    real, synthetic = sources
    with pytest.raises(ValueError, match=r"has 2 channels \{'0': 'FLAIR', '1': 'T1'\}, but synthetic cases have one "
                                         r"modality: choose the channel to export \(--channel NAME or index\)"):
        write_nnunet_dataset(real, synthetic, tmp_path / "Dataset106_X")
    assert not (tmp_path / "Dataset106_X" / "dataset.json").exists()
    with pytest.raises(ValueError, match=r"channel 'T2' is not in the real dataset's .*allowed \(index or name\)"):
        write_nnunet_dataset(real, synthetic, tmp_path / "Dataset106_X", channel="T2")
    out = write_nnunet_dataset(real, synthetic, tmp_path / "Dataset106_X", channel="t1")
    assert json.loads((out / "gem3d_sources.json").read_text())["channel"] == 1


def assert_leak_free(splits, sources: dict[str, str]) -> None:
    """No synthetic case is validated on, none trains in a fold that validates its source, every real case is
    validated exactly once."""
    validated = [c for fold in splits for c in fold["val"]]
    assert sorted(validated) == sorted(set(validated)) and not set(validated) & set(sources)
    for fold in splits:
        assert not set(fold["train"]) & set(fold["val"])
        for name, source in sources.items():
            assert (name in fold["train"]) == (source not in fold["val"]), (name, fold)


def test_splits_final_keeps_synthetic_cases_with_their_source_fold(tmp_path, sources):
    real, synthetic = sources
    out = write_nnunet_dataset(real, synthetic, tmp_path / "Dataset107_Splits", channel=0)
    splits = json.loads((out / "splits_final.json").read_text())
    assert len(splits) == 3  # 3 real cases: 3 folds, one real case validated in each
    assert sorted(c for fold in splits for c in fold["val"]) == ["case_000", "case_001", "case_002"]
    sources_of = {"case_000_icma_s0": "case_000", "case_000_icma_s1": "case_000", "case_001_icma_s0": "case_001",
                  "case_002_ic_s0": "case_002"}
    assert_leak_free(splits, sources_of)
    many = [f"case_{i:03d}" for i in range(12)]
    synthetic_of = {f"{c}_ic_s{k}": c for c in many for k in range(2)} | {"elsewhere_ic_s0": "not_a_real_case"}
    folds = leak_free_splits(many, synthetic_of)
    assert len(folds) == 5 and [len(f["val"]) for f in folds] == [3, 3, 2, 2, 2]
    assert_leak_free(folds, {k: v for k, v in synthetic_of.items() if v in many})
    assert all("elsewhere_ic_s0" in f["train"] for f in folds)  # its source is never validated on
    with pytest.warns(UserWarning, match="one real case cannot be cross-validated, so no splits_final.json"):
        single = write_nnunet_dataset(make_real(tmp_path / "Dataset008_One", cases=("case_000",)), [synthetic[0]],
                                      tmp_path / "Dataset108_One", channel=0, keep=lambda c: c.case == "case_000")
    assert not (single / "splits_final.json").exists()


def test_real_folds_are_nnunets_own_and_nnunet_reads_the_file(tmp_path, sources):
    """The real cases keep the folds nnU-Net's default split gives them, and nnU-Net's trainer (``do_split``) reads
    the file into the same folds (the file belongs in nnUNet_preprocessed/<Dataset>/)."""
    nnunet = pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed: nnU-Net's own reading is not checked")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases = [f"case_{i:03d}" for i in range(13)]
    assert [sorted(f["val"]) for f in generate_crossval_split(cases, seed=12345, n_splits=5)] == [
        sorted(v) for v in crossval_folds(cases)]
    real, synthetic = sources
    out = write_nnunet_dataset(real, synthetic, tmp_path / "Dataset109_Read", channel=0)
    written = json.loads((out / "splits_final.json").read_text())
    identifiers = sorted(p.name[: -len(".nii.gz")] for p in (out / "labelsTr").iterdir())

    class Dataset:  # what do_split needs of nnU-Net's dataset class
        def __init__(self, folder, identifiers=None, folder_with_segs_from_previous_stage=None):
            self.identifiers = identifiers or list(ids)

    ids = identifiers
    for fold in range(len(written)):
        trainer = type("Trainer", (), {"dataset_class": Dataset, "fold": fold, "preprocessed_dataset_folder": "",
                                       "preprocessed_dataset_folder_base": str(out),
                                       "folder_with_segs_from_previous_stage": None,
                                       "print_to_log_file": lambda self, *a, **k: None})()
        train, val = nnUNetTrainer.do_split(trainer)
        assert (list(train), list(val)) == (written[fold]["train"], written[fold]["val"]), nnunet.__file__
