"""The dataset block: configs/datasets/*.yaml included by every paper config, and scripts/new_dataset_config.py,
which writes one from dataset.json and the intensity statistics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main as main_module  # noqa: E402
from conftest import child_env  # noqa: E402
from gem3d.config import check_params, load_config_file, to_plain  # noqa: E402
from gem3d.data.dataset_config import dataset_block, foreground_intensities, main as new_dataset_config  # noqa: E402
from gem3d.data.nnunet import RawDataset  # noqa: E402
from gem3d.data.preprocess import PreprocessConfig  # noqa: E402

CONFIGS = ROOT / "configs" / "latent-diffusion"
PAPER_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("brain_", "abdomen_")))


def write_dataset(root: Path, channel: str, labels: dict, cases: int = 3, shape=(16, 14, 12),
                  **extra) -> list[np.ndarray]:
    """Cases whose labelled voxels hold known intensities (CT: 0..400 HU, air -1000 outside); returns them."""
    rng = np.random.default_rng(1)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    foreground = []
    for i in range(cases):
        label = np.zeros(shape, np.uint8)
        label[3:12, 3:10, 2:10] = 1
        label[5:8, 5:8, 4:8] = 2
        image = np.where(label > 0, rng.uniform(0, 400, shape), -1000.0).astype(np.float32)
        foreground.append(image[label > 0])
        affine = np.diag([1.5, 1.5, 2.5, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"c{i}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"c{i}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": channel}, "labels": labels,
                                                   "numTraining": cases, "file_ending": ".nii.gz", **extra}))
    return foreground


@pytest.fixture()
def ct_dataset(tmp_path) -> tuple[Path, np.ndarray]:
    root = tmp_path / "Dataset777_MyCT"
    foreground = write_dataset(root, "CT", {"background": 0, "liver": 1, "tumour": 2})
    return root, np.concatenate(foreground)


def test_ct_block_has_the_foreground_percentile_window(ct_dataset, tmp_path, capsys):
    root, foreground = ct_dataset
    out = tmp_path / "my_ct.yaml"
    assert new_dataset_config([str(root), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    written = yaml.safe_load(out.read_text())
    preprocess = written["data"]["params"]["preprocess"]
    low, high = np.percentile(foreground.astype(np.float64), [0.5, 99.5])  # every labelled voxel (< 10,000 a case)
    assert preprocess["window"] == [round(low, 1), round(high, 1)] and 0 <= low < 5 and 395 < high <= 400
    assert preprocess | {"window": None} == {
        "size": 512, "slice_axis": 2, "intensity": "window", "percentiles": [0.5, 99.5], "window": None,
        "max_label": 2, "body": "threshold", "body_threshold": -500.0, "body_fill_holes": True,
        "body_largest_component": True, "informed_labels": "shown"}
    assert written["data"]["params"]["dataset_dir"] == str(root.resolve())
    assert "# labels: background 0, liver 1, tumour 2" in out.read_text()


def test_mri_block_is_minmax_nonzero_and_region_labels_count(tmp_path):
    root = tmp_path / "Dataset778_MyBrain"
    write_dataset(root, "FLAIR", {"background": 0, "whole tumour": [1, 2, 3], "core": [2, 3], "enhancing": 3},
                  regions_class_order=[1, 2, 3])
    block, comments = dataset_block(root, size=256)
    preprocess = block["data"]["params"]["preprocess"]
    assert preprocess["intensity"] == "minmax" and preprocess["body"] == "nonzero" and preprocess["size"] == 256
    assert preprocess["max_label"] == 3 and "not CT" in comments[-1]
    with pytest.raises(ValueError, match=r"channel 1 is not in .*channel_names \{'0': 'FLAIR'\}"):
        dataset_block(root, channel=1)


def test_statistics_sample_at_most_the_given_voxels_per_case(ct_dataset):
    root, foreground = ct_dataset
    dataset = RawDataset(root)
    values = foreground_intensities(dataset, dataset.case_names(), samples_per_case=100)
    assert values.shape == (300,) and np.isin(values.astype(np.float32), foreground).all()


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_every_paper_config_resolves_with_a_written_block(config, ct_dataset, tmp_path):
    root, _ = ct_dataset
    block_path = tmp_path / "my_ct.yaml"
    assert new_dataset_config([str(root), "-o", str(block_path), "--size", "64"]) == 0
    block = yaml.safe_load(block_path.read_text())["data"]["params"]
    merged = main_module.load_config([str(CONFIGS / config), str(block_path)], [])
    data = to_plain(merged.data.params)
    assert data["dataset_dir"] == block["dataset_dir"] and data["preprocess"] == block["preprocess"]
    assert main_module.layout_problems(merged) == [] and check_params(merged.data, "data") == []
    PreprocessConfig.from_dict(data["preprocess"])
    assert not any("dataset_dir" in str(problem) for problem in main_module.path_problems(merged))  # it exists


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_configs_take_their_dataset_from_the_shared_block(config):
    shared = "brain_msd" if config.startswith("brain_") else "abdomen_ct1k"
    raw = OmegaConf.load(CONFIGS / config)
    assert raw.include == f"../datasets/{shared}.yaml"
    assert "dataset_dir" not in raw.data.params and "preprocess" not in raw.data.params  # in one place only
    block = OmegaConf.load(ROOT / "configs" / "datasets" / f"{shared}.yaml").data.params
    merged = load_config_file(CONFIGS / config)
    assert merged.data.params.dataset_dir == block.dataset_dir and merged.data.params.preprocess == block.preprocess
    assert "include" not in merged


def test_include_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\ny: 2\n")
    with pytest.raises(ValueError, match=r"config include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config_file(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match=r"c\.yaml: include 'missing\.yaml': no such file"):
        load_config_file(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("include: [e.yaml]\nx: {a: 1}\n")
    (tmp_path / "e.yaml").write_text("x: {a: 0, b: 2}\n")
    assert OmegaConf.to_container(load_config_file(tmp_path / "d.yaml")) == {"x": {"a": 1, "b": 2}}


def test_script_is_a_thin_entry_point(ct_dataset, tmp_path):
    root, _ = ct_dataset
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "new_dataset_config.py"), str(root), "-o",
                           str(tmp_path / "b.yaml"), "--max-cases", "1"], env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "of 1 training cases" in (tmp_path / "b.yaml").read_text()
    assert len((ROOT / "scripts" / "new_dataset_config.py").read_text().splitlines()) <= 30
