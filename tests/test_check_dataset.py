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
    "folder_name": lambda r: r.rename(r.with_name("check_data")),  # returns the moved dataset
    "dataset_json_missing": lambda r: (r / "dataset.json").unlink(),
    "dataset_json_invalid": lambda r: (r / "dataset.json").write_text("{not json"),
    "dataset_json_key_missing": _edit_json(file_ending=None),
    "dataset_json_bad_labels": _edit_json(labels={"background": 0, "tumour": [1, 2]}),
    "num_training_mismatch": _edit_json(numTraining=7),
    "no_training_cases": lambda r: [p.unlink() for p in [*(r / "imagesTr").iterdir(), *(r / "labelsTr").iterdir()]],
    "image_missing": lambda r: _image_of(r).unlink(),
    "label_missing": lambda r: _label_of(r).unlink(),
    "channel_missing": lambda r: [_edit_json(channel_names={"0": "FLAIR", "1": "T1"})(r),
                                      shutil.copy(_image_of(r, "case_000"), _image_of(r, "case_000", 1))],
    "unreadable": lambda r: _label_of(r).write_bytes(b"garbage"),
    "not_3d": lambda r: _save(_image_of(r), np.ones(SHAPE[:2], np.float32)),
    "shape_mismatch": lambda r: _save(_label_of(r), np.zeros(SHAPE[:2] + (11,), np.uint8)),
    "affine_mismatch": lambda r: _save(_label_of(r), np.zeros(SHAPE, np.uint8), np.diag([2.0, 2.0, 3.5, 1.0])),
    "undeclared_label": lambda r: _save(_label_of(r), np.full(SHAPE, 5, np.uint8)),
    "non_integer_label": lambda r: _save(_label_of(r), np.full(SHAPE, 0.5, np.float32)),
    "non_finite": lambda r: _save(_image_of(r), np.full(SHAPE, np.nan, np.float32)),
    "too_few_slices": lambda r: [_save(_image_of(r), np.ones(SHAPE[:2] + (3,), np.float32)),
                                     _save(_label_of(r), np.zeros(SHAPE[:2] + (3,), np.uint8))],
}


def make(tmp_path):
    root = tmp_path / "Dataset003_Check"
    write_raw_dataset(root, n_cases=2, shape=SHAPE, affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    return root


def test_every_kind_has_a_breakage():
    assert set(BREAKAGES) == set(KINDS)
    with pytest.raises(ValueError, match="unknown problem kind 'typo'; kinds are"):
        check.Problem("typo", "-", "dataset.json", "x")


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
    if kind not in ("folder_name", "dataset_json_missing", "dataset_json_invalid", "dataset_json_key_missing",
                    "dataset_json_bad_labels", "num_training_mismatch", "no_training_cases"):
        assert found.case == "case_001"  # the broken case is named; the intact one is not
        assert all(p.case != "case_000" for p in problems)


def test_problem_values_are_specific(tmp_path):
    root = make(tmp_path)
    BREAKAGES["undeclared_label"](root)
    BREAKAGES["num_training_mismatch"](root)
    problems = {p.kind: p for p in check_dataset(root, min_slices=4)}
    assert problems["undeclared_label"].file == "labelsTr/case_001.nii.gz"
    assert problems["undeclared_label"].value.startswith("[5] not in dataset.json labels [0, 1, 2, 3]")
    assert "numTraining=7" in problems["num_training_mismatch"].value
    assert check_dataset(root, min_slices=13)[-1].kind == "num_training_mismatch"
    assert {p.kind for p in check_dataset(make(tmp_path / "b"), min_slices=13)} == {"too_few_slices"}


def test_folder_name_is_required_only_for_nnunet(tmp_path):
    root = make(tmp_path).rename(tmp_path / "brain")
    assert check_dataset(root, min_slices=4) == []  # gem3d reads any folder name
    problems = check_dataset(root, min_slices=4, nnunet_name=True)
    assert [p.kind for p in problems] == ["folder_name"] and validate_nnunet_dataset(root) == [str(problems[0])]


@pytest.mark.parametrize("shift_mm, same_grid", [(5e-4, True), (2e-3, False)])
def test_one_affine_tolerance_for_checker_export_and_loader(tmp_path, shift_mm, same_grid):
    root = make(tmp_path)
    label = nib.load(str(_label_of(root)))
    affine = label.affine.copy()
    affine[0, 3] += shift_mm
    _save(_label_of(root), np.asanyarray(label.dataobj), affine)
    assert ("affine_mismatch" not in {p.kind for p in check_dataset(root, min_slices=4)}) == same_grid
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
        found = [p for p in check_dataset(root, min_slices=4) if p.kind == "dataset_json_bad_labels"]
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
    BREAKAGES["label_missing"](root)
    bad = subprocess.run([sys.executable, str(script), str(root), "--min-slices", "4"], capture_output=True, text=True,
                         env=child_env())
    assert bad.returncode == 1
    lines = bad.stdout.strip().splitlines()
    assert lines[0] == "label_missing: case=case_001 file=labelsTr/case_001.nii.gz value=absent"
    assert lines[-1].startswith("1 problem(s)")
