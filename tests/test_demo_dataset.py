"""The demo dataset builder (3 cases from nilearn's MNI152 template, offline)."""
import json
import runpy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from gem3d.data.check import check_dataset
from gem3d.data.demo import DEMO_LABELS, DEMO_SHAPE, build_demo_dataset, draw_case_params, make_demo_case
from gem3d.data.nnunet import RawDataset
from gem3d.data.preprocess import PreprocessConfig, prepare_case

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "Dataset900_GEM3DDemo", cases=3, seed=0)


def test_demo_passes_check_dataset(demo):
    assert check_dataset(demo, min_slices=16) == []
    meta = json.loads((demo / "dataset.json").read_text())
    assert meta["labels"] == DEMO_LABELS and meta["channel_names"] == {"0": "FLAIR"} and meta["numTraining"] == 3
    assert RawDataset(demo).case_names() == ["GEM3DDemo_000", "GEM3DDemo_001", "GEM3DDemo_002"]


def test_demo_geometry_is_real_ras(demo):
    img = nib.load(str(demo / "imagesTr" / "GEM3DDemo_000_0000.nii.gz"))
    assert img.shape == DEMO_SHAPE and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(nib.affines.voxel_sizes(img.affine), (2.9, 2.9, 3.3), rtol=1e-6)
    assert np.abs(img.affine[:3, 3]).min() > 1.0  # a real origin, not the corner at 0
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_demo_labels_inside_the_brain_and_tumours_large(demo):
    ds = RawDataset(demo)
    for name in ds.case_names():
        case = ds.load_case(name)
        image, label = case.image, case.label
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
        assert (image[label > 0] > 0).all()  # lesions inside the nonzero (brain) region
        assert np.all(np.isfinite(image)) and image.min() == 0.0  # zero outside the brain
        brain_fraction = (image > 0).mean()
        assert 0.2 < brain_fraction < 0.6
        # the largest tumour is big: equivalent in-plane radius >= 8 voxels on its widest slice
        tumour, n = ndimage.label(label > 0)
        sizes = np.bincount(tumour.ravel())[1:]
        biggest = tumour == (1 + int(np.argmax(sizes)))
        area = biggest.sum(axis=(1, 2)).max()
        assert np.sqrt(area / np.pi) >= 8.0
        # high contrast: enhancing ring brighter and core darker than healthy brain, edema brighter
        healthy = np.median(image[(label == 0) & (image > 0)])
        spread = np.std(image[(label == 0) & (image > 0)])
        assert np.median(image[label == 3]) > healthy + spread
        assert np.median(image[label == 2]) < healthy - spread
        assert np.median(image[label == 1]) > healthy


def test_demo_cases_differ_and_are_reproducible(demo):
    ds = RawDataset(demo)
    prepared = [prepare_case(ds.load_case(n), PreprocessConfig(size=64)) for n in ds.case_names()]
    a, b = prepared[0], prepared[1]
    assert not np.array_equal(a.label, b.label)
    mean_profiles = [np.median(p.image[p.label == 0]) for p in prepared]
    assert len(set(np.round(mean_profiles, 3))) == 3
    params = json.loads((demo / "gem3d_demo.json").read_text())["cases"]
    assert len({(p["gamma"], p["noise_sigma"], p["bias_strength"]) for p in params}) == 3
    image, label, affine, p = make_demo_case(1, seed=0)
    np.testing.assert_array_equal(image, nib.load(str(demo / "imagesTr" / "GEM3DDemo_001_0000.nii.gz")).get_fdata(
        dtype=np.float32))
    np.testing.assert_array_equal(affine, nib.load(str(demo / "labelsTr" / "GEM3DDemo_001.nii.gz")).affine)
    other, *_ = make_demo_case(1, seed=1)
    assert not np.array_equal(other, image)


def test_demo_has_t2_like_cases():
    contrasts = {draw_case_params(i, seed=0)["contrast"] for i in range(10)}
    assert contrasts == {"t1", "t2"}


def test_script_and_refusal_to_overwrite(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a gem3d demo"):
        build_demo_dataset(foreign, cases=1)
    out = tmp_path / "cli_demo"
    script = runpy.run_path(str(ROOT / "scripts" / "make_demo_dataset.py"), run_name="make_demo_dataset")
    assert script["main"]([str(out), "--cases", "1", "--seed", "2"]) == 0
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["GEM3DDemo_000_0000.nii.gz"]


def test_demo_splits_keep_tuning_and_reported_cases_apart(tmp_path):
    from gem3d.data.demo import DEMO_SPLIT, demo_splits

    names = [f"c{i:02d}" for i in range(16)]
    splits = demo_splits(names, seed=0, **DEMO_SPLIT)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (8, 2, 6)
    assert sorted(sum(splits.values(), [])) == names
    assert splits == demo_splits(list(reversed(names)), seed=0, **DEMO_SPLIT)  # the names' order does not matter
    assert demo_splits(names, seed=1, **DEMO_SPLIT) != splits
    with pytest.raises(ValueError, match=r"val \+ test <= cases - 1 = 3; got val=2, test=6"):
        demo_splits(names[:4], val=2, test=6)
    folder = build_demo_dataset(tmp_path / "d", cases=4, val=1, test=2)
    written = json.loads((folder / "splits.json").read_text())
    assert (len(written["train"]), len(written["val"]), len(written["test"])) == (1, 1, 2)
    assert not (build_demo_dataset(tmp_path / "small", cases=2) / "splits.json").exists()


def test_split_counts_scale_the_demo_split_and_keep_two_training_cases():
    from gem3d.data.demo import split_counts

    assert split_counts(16) == (2, 6)
    assert split_counts(4) == (1, 1) and split_counts(8) == (1, 3) and split_counts(32) == (4, 12)
