"""check_dataset: every problem kind, each made by a small broken dataset, and the CLI's exit codes."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import child_env
from gem3d.data import check
from gem3d.data.check import KINDS, check_dataset
from gem3d.data.nnunet import RawDataset
from gem3d.export.nnunet import validate_nnunet_dataset
from tests.test_datasets import write_raw_dataset

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 12)  # 12 axial slices


def _json(root):
    return json.loads((root / "dataset.json").read_text())


def _set_json(root, meta):
    (root / "dataset.json").write_text(json.dumps(meta))


def _save(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), str(path))


def _edit_json(**changes):
    def edit(root):
        meta = _json(root)
        for key, value in changes.items():
            if value is None:
                meta.pop(key)
            else:
                meta[key] = value
        _set_json(root, meta)
    return edit


def _label_of(root, name="case_001"):
    return root / "labelsTr" / f"{name}.nii.gz"


def _image_of(root, name="case_001", channel=0):
    return root / "imagesTr" / f"{name}_{channel:04d}.nii.gz"


BREAKAGES = {
    check.FOLDER_NAME: lambda r: r.rename(r.with_name("check_data")),  # returns the moved dataset
    check.JSON_MISSING: lambda r: (r / "dataset.json").unlink(),
    check.JSON_INVALID: lambda r: (r / "dataset.json").write_text("{not json"),
    check.JSON_KEY_MISSING: _edit_json(file_ending=None),
    check.JSON_BAD_LABELS: _edit_json(labels={"background": 0, "tumour": [1, 2]}),
    check.NUM_TRAINING: _edit_json(numTraining=7),
    check.NO_CASES: lambda r: [p.unlink() for p in [*(r / "imagesTr").iterdir(), *(r / "labelsTr").iterdir()]],
    check.IMAGE_MISSING: lambda r: _image_of(r).unlink(),
    check.LABEL_MISSING: lambda r: _label_of(r).unlink(),
    check.CHANNEL_MISSING: lambda r: [_edit_json(channel_names={"0": "FLAIR", "1": "T1"})(r),
                                      shutil.copy(_image_of(r, "case_000"), _image_of(r, "case_000", 1))],
    check.UNREADABLE: lambda r: _label_of(r).write_bytes(b"garbage"),
    check.NOT_3D: lambda r: _save(_image_of(r), np.ones(SHAPE[:2], np.float32)),
    check.SHAPE_MISMATCH: lambda r: _save(_label_of(r), np.zeros(SHAPE[:2] + (11,), np.uint8)),
    check.AFFINE_MISMATCH: lambda r: _save(_label_of(r), np.zeros(SHAPE, np.uint8), np.diag([2.0, 2.0, 3.5, 1.0])),
    check.UNDECLARED_LABEL: lambda r: _save(_label_of(r), np.full(SHAPE, 5, np.uint8)),
    check.NON_INTEGER_LABEL: lambda r: _save(_label_of(r), np.full(SHAPE, 0.5, np.float32)),
    check.NON_FINITE: lambda r: _save(_image_of(r), np.full(SHAPE, np.nan, np.float32)),
    check.TOO_FEW_SLICES: lambda r: [_save(_image_of(r), np.ones(SHAPE[:2] + (3,), np.float32)),
                                     _save(_label_of(r), np.zeros(SHAPE[:2] + (3,), np.uint8))],
}


def make(tmp_path):
    root = tmp_path / "Dataset003_Check"
    write_raw_dataset(root, n_cases=2, shape=SHAPE, affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    return root


def test_every_kind_has_a_breakage():
    assert set(BREAKAGES) == set(KINDS)


def test_clean_dataset_has_no_problems(tmp_path):
    assert check_dataset(make(tmp_path), min_slices=4) == []


@pytest.mark.parametrize("kind", KINDS)
def test_each_problem_kind(tmp_path, kind):
    root = make(tmp_path)
    moved = BREAKAGES[kind](root)
    root = moved if isinstance(moved, Path) else root
    problems = check_dataset(root, min_slices=4, nnunet_name=True)
    kinds = {p.kind for p in problems}
    assert kind in kinds, problems
    found = next(p for p in problems if p.kind == kind)
    line = str(found)
    assert line.startswith(f"{kind}: case=") and "file=" in line and "value=" in line
    if kind not in (check.FOLDER_NAME, check.JSON_MISSING, check.JSON_INVALID, check.JSON_KEY_MISSING,
                    check.JSON_BAD_LABELS, check.NUM_TRAINING, check.NO_CASES):
        assert found.case == "case_001"  # the broken case is named; the intact one is not
        assert all(p.case != "case_000" for p in problems)


def test_problem_values_are_specific(tmp_path):
    root = make(tmp_path)
    BREAKAGES[check.UNDECLARED_LABEL](root)
    BREAKAGES[check.NUM_TRAINING](root)
    problems = {p.kind: p for p in check_dataset(root, min_slices=4)}
    assert problems[check.UNDECLARED_LABEL].file == "labelsTr/case_001.nii.gz"
    assert problems[check.UNDECLARED_LABEL].value.startswith("[5] not in dataset.json labels [0, 1, 2, 3]")
    assert "numTraining=7" in problems[check.NUM_TRAINING].value
    assert check_dataset(root, min_slices=13)[-1].kind == check.NUM_TRAINING
    assert {p.kind for p in check_dataset(make(tmp_path / "b"), min_slices=13)} == {check.TOO_FEW_SLICES}


def test_folder_name_is_required_only_for_nnunet(tmp_path):
    root = make(tmp_path).rename(tmp_path / "brain")
    assert check_dataset(root, min_slices=4) == []  # gem3d reads any folder name
    problems = check_dataset(root, min_slices=4, nnunet_name=True)
    assert [p.kind for p in problems] == [check.FOLDER_NAME] and validate_nnunet_dataset(root) == [str(problems[0])]


@pytest.mark.parametrize("shift_mm, same_grid", [(5e-4, True), (2e-3, False)])
def test_one_affine_tolerance_for_checker_export_and_loader(tmp_path, shift_mm, same_grid):
    root = make(tmp_path)
    label = nib.load(str(_label_of(root)))
    affine = label.affine.copy()
    affine[0, 3] += shift_mm
    _save(_label_of(root), np.asanyarray(label.dataobj), affine)
    assert (check.AFFINE_MISMATCH not in {p.kind for p in check_dataset(root, min_slices=4)}) == same_grid
    assert (validate_nnunet_dataset(root) == []) == same_grid
    if same_grid:
        RawDataset(root).load_case("case_001")
    else:
        with pytest.raises(ValueError, match="affines differ"):
            RawDataset(root).load_case("case_001")


def test_one_label_rule_for_checker_export_and_loader(tmp_path):
    root = make(tmp_path)
    regions = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": [3]}
    _edit_json(labels=regions, regions_class_order=[1, 2, 3])(root)  # nnU-Net region-based training (BraTS)
    assert check_dataset(root, min_slices=4) == [] and validate_nnunet_dataset(root) == []
    assert RawDataset(root).labels == {"background": 0, "whole tumour": 1, "tumour core": 2, "enhancing": 3}
    for labels, order, message in [(regions, None, "need 'regions_class_order'"),
                                   ({"background": 0, "a": 1, "b": 2, "c": 4}, None, "consecutive from 0"),
                                   ({"background": 0, "a": 1, "b": 1, "c": 3}, None, "unique")]:
        meta = _json(root) | {"labels": labels}
        meta.pop("regions_class_order", None)
        _set_json(root, meta)
        found = [p for p in check_dataset(root, min_slices=4) if p.kind == check.JSON_BAD_LABELS]
        assert len(found) == 1 and message in found[0].value
        assert str(found[0]) in validate_nnunet_dataset(root)
        with pytest.raises(ValueError, match=message):
            RawDataset(root)


def test_cli_exit_codes(tmp_path):
    root = make(tmp_path)
    script = ROOT / "scripts" / "check_dataset.py"
    ok = subprocess.run([sys.executable, str(script), str(root), "--min-slices", "4"], capture_output=True, text=True,
                        env=child_env())
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK ") and "2 training cases" in ok.stdout
    BREAKAGES[check.LABEL_MISSING](root)
    bad = subprocess.run([sys.executable, str(script), str(root), "--min-slices", "4"], capture_output=True, text=True,
                         env=child_env())
    assert bad.returncode == 1
    lines = bad.stdout.strip().splitlines()
    assert lines[0] == "label_missing: case=case_001 file=labelsTr/case_001.nii.gz value=absent"
    assert lines[-1].startswith("1 problem(s)")
