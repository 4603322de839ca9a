"""Preprocessed nnU-Net input: both layouts (`.b2nd` written by blosc2 here, `.npz`), each case's geometry from its
`.pkl` properties (an oblique case whose intensities are a linear function of world position, so every voxel can
be checked against the world point it claims), the plans lookup and the path errors."""
import json
import pickle
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gem3d.data.case import AFFINE_ATOL_MM
from gem3d.data.nnunet import PreprocessedDataset, open_dataset, read_properties
from gem3d.export.manifest import Manifest
from gem3d.export.nifti import save_nifti
from gem3d.inference.engine import run_inference
from gem3d.inference.volume import SamplerOptions
from tests.test_inference_engine import make_config, tiny  # noqa: F401 (the tiny models fixture)

try:
    import blosc2
except ImportError:  # optional dependency: pip install blosc2
    blosc2 = None

LAYOUTS = [pytest.param("b2nd", marks=pytest.mark.skipif(blosc2 is None, reason="blosc2 not installed")), "npz"]

# the raw NIfTI: (x, y, z) array, oblique RAS+ affine (rotated 20, -15, 35 degrees about x, y, z), anisotropic voxels
_c, _s = np.cos(np.radians([20.0, -15.0, 35.0])), np.sin(np.radians([20.0, -15.0, 35.0]))
ROTATION = (np.array([[_c[2], -_s[2], 0], [_s[2], _c[2], 0], [0, 0, 1]])
            @ np.array([[_c[1], 0, _s[1]], [0, 1, 0], [-_s[1], 0, _c[1]]])
            @ np.array([[1, 0, 0], [0, _c[0], -_s[0]], [0, _s[0], _c[0]]]))
ZOOMS = np.array([0.8, 1.1, 2.5])
SOURCE_AFFINE = np.eye(4)
SOURCE_AFFINE[:3, :3] = ROTATION * ZOOMS
SOURCE_AFFINE[:3, 3] = [12.0, -30.0, 7.5]
SOURCE_SHAPE = (10, 12, 8)
# nnU-Net's steps: reader array (z, y, x) -> transpose_forward -> crop to the bbox -> resample (halving axes 0 and 2)
TRANSPOSE_FORWARD = [1, 2, 0]
BBOX = [[1, 11], [2, 10], [0, 8]]
PREPROCESSED_SHAPE = (5, 8, 4)
FIELDS = (np.array([0.5, -0.25, 1.0, 3.0]), np.array([-1.0, 2.0, 0.1, -4.0]))  # one linear field per channel


def field(channel, world):
    """Intensity of `channel` at world points (..., 3) (mm)."""
    return world @ FIELDS[channel][:3] + FIELDS[channel][3]


def world_points(affine, shape):
    """World (RAS+, mm) position (*shape, 3) of every voxel of an array of `shape` with `affine`."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


def reader_properties(reader):
    """What nnU-Net's reader stores for the raw NIfTI (SimpleITK: x, y, z order and LPS+ world)."""
    if reader == "nibabel":
        return {"nibabel_stuff": {"original_affine": SOURCE_AFFINE.copy()}, "spacing": [float(z) for z in ZOOMS[::-1]]}
    lps = np.diag([-1.0, -1.0, 1.0])
    return {"sitk_stuff": {"spacing": tuple(ZOOMS), "origin": tuple(lps @ SOURCE_AFFINE[:3, 3]),
                           "direction": tuple((lps @ ROTATION).ravel())},
            "spacing": [np.float64(z) for z in ZOOMS[::-1]]}


def preprocess_like_nnunet(channels):
    """(C, *SOURCE_SHAPE) raw arrays -> (C, *PREPROCESSED_SHAPE) the way nnU-Net's default preprocessor does it
    (trilinear resampling with the volume's corners kept, which is exact for linear fields)."""
    data = np.stack(channels).transpose(0, 3, 2, 1)  # reader: (x, y, z) -> (z, y, x)
    data = data.transpose(0, *[a + 1 for a in TRANSPOSE_FORWARD])
    data = data[(slice(None), *[slice(lo, hi) for lo, hi in BBOX])]
    resampled = F.interpolate(torch.from_numpy(data)[None].double(), size=PREPROCESSED_SHAPE, mode="trilinear",
                              align_corners=False)
    return resampled[0].numpy().astype(np.float32), data.shape[1:]


def write_preprocessed_dataset(root, layout="npz", reader="sitk", cases=("case_0",), labels=None):
    """`root/nnUNetPlans.json`, `root/dataset.json` and `root/nnUNetPlans_3d_fullres/<case>.{b2nd|npz}` + `.pkl`
    of the oblique source case. Returns the configuration folder."""
    folder = root / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True)
    source_world = world_points(SOURCE_AFFINE, SOURCE_SHAPE)
    data, cropped_shape = preprocess_like_nnunet([field(c, source_world) for c in range(2)])
    seg = (data[:1] > np.median(data[0])).astype(np.int8)
    seg[:, 0] = -1  # outside nnU-Net's nonzero mask
    reader_spacing = ZOOMS[::-1][TRANSPOSE_FORWARD]
    target_spacing = reader_spacing * np.array(cropped_shape) / PREPROCESSED_SHAPE
    for name in cases:
        properties = reader_properties(reader) | {
            "shape_before_cropping": tuple(np.array(SOURCE_SHAPE[::-1])[TRANSPOSE_FORWARD]),
            "bbox_used_for_cropping": [[np.int64(lo), np.int64(hi)] for lo, hi in BBOX],
            "shape_after_cropping_and_before_resampling": cropped_shape,
            "class_locations": {1: np.argwhere(seg[0] == 1)[:5]},
        }
        with open(folder / f"{name}.pkl", "wb") as f:
            pickle.dump(properties, f)
        if layout == "b2nd":
            blosc2.asarray(data, urlpath=str(folder / f"{name}.b2nd"), mode="w")
            blosc2.asarray(seg, urlpath=str(folder / f"{name}_seg.b2nd"), mode="w")
        else:
            np.savez_compressed(folder / f"{name}.npz", data=data, seg=seg)
    plans = {"plans_name": "nnUNetPlans", "transpose_forward": TRANSPOSE_FORWARD,
             "transpose_backward": list(np.argsort(TRANSPOSE_FORWARD).tolist()),
             "configurations": {"3d_fullres": {"data_identifier": folder.name, "spacing": target_spacing.tolist()}}}
    (root / "nnUNetPlans.json").write_text(json.dumps(plans))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz",
                                                   "labels": labels or {"background": 0, "lesion": 1}}))
    return folder


@pytest.mark.parametrize("reader", ["sitk", "nibabel"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_oblique_case_lands_on_the_source_world_points(tmp_path, layout, reader):
    root = tmp_path / "Dataset007_Oblique"
    write_preprocessed_dataset(root, layout, reader)
    dataset = open_dataset(root)
    assert isinstance(dataset, PreprocessedDataset) and dataset.case_names() == ["case_0"]
    for channel in (0, 1):
        case = dataset.load_case("case_0", slice_axis=2, channel=channel)
        geometry = case.geometry
        assert geometry.shape == PREPROCESSED_SHAPE and case.image.shape == geometry.canonical_shape
        world = world_points(geometry.affine, geometry.shape)
        np.testing.assert_allclose(geometry.to_source(case.image), field(channel, world), atol=1e-3)
    plans_spacing = json.loads((root / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]["spacing"]
    np.testing.assert_allclose(np.linalg.norm(geometry.affine[:3, :3], axis=0), plans_spacing, rtol=1e-6)
    assert case.label.shape == case.image.shape and set(np.unique(case.label)) == {-1, 0, 1}
    assert case.image_path.suffix == f".{layout}"

    # an output in the case's geometry
    written = save_nifti(geometry.to_source(case.image), geometry, tmp_path / "out.nii.gz")
    image = nib.load(str(written))
    np.testing.assert_allclose(np.asanyarray(image.dataobj), field(1, world_points(image.affine, image.shape)),
                               atol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_engine_writes_samples_in_the_preprocessed_case_geometry(tiny, tmp_path, layout):  # noqa: F811
    root = tmp_path / "Dataset012_Pre"
    write_preprocessed_dataset(root, layout, cases=("case_0", "case_1"),
                               labels={"background": 0, "edema": 1, "core": 2, "enhancing": 3})
    config = make_config(tiny, "ic", tmp_path / "out", data=root, cases="case_0",
                         sampler=SamplerOptions(steps=2, window=4))  # the preprocessed case has 4 axial slices
    manifest = run_inference(config)
    geometry = open_dataset(root).load_case("case_0").geometry
    for kind in ("image", "label"):
        written = nib.load(str(manifest.parent / Manifest(manifest).records[0]["files"][kind]))
        assert written.shape == geometry.shape == PREPROCESSED_SHAPE
        np.testing.assert_allclose(written.affine, geometry.affine, atol=AFFINE_ATOL_MM)


@pytest.mark.skipif(blosc2 is None, reason="blosc2 not installed")
def test_both_layouts_read_the_same_case(tmp_path):
    cases = {layout: open_dataset(write_preprocessed_dataset(tmp_path / layout, layout)).load_case("case_0")
             for layout in ("b2nd", "npz")}
    b2nd, npz = cases["b2nd"], cases["npz"]
    assert np.array_equal(b2nd.image, npz.image) and np.array_equal(b2nd.label, npz.label)
    assert b2nd.geometry == npz.geometry


def test_missing_blosc2_is_one_clear_line(tmp_path, monkeypatch):
    folder = write_preprocessed_dataset(tmp_path / "Dataset008_X", "npz")
    (folder / "case_0.npz").rename(folder / "case_0.b2nd")  # a .b2nd folder, read without blosc2
    monkeypatch.setitem(sys.modules, "blosc2", None)  # import blosc2 -> ImportError
    with pytest.raises(ImportError, match=r"needs blosc2: pip install blosc2") as err:
        open_dataset(folder.parent).load_case("case_0")
    assert "\n" not in str(err.value)


def test_path_errors_are_clear(tmp_path):
    folder = write_preprocessed_dataset(tmp_path / "Dataset009_X", "npz")
    (folder.parent / "nnUNetPlans.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(FileNotFoundError, match=r"no nnU-Net plans for .*nnUNetPlans_3d_fullres: expected .*"
                                                r"Dataset009_X/nnUNetPlans.json") as err:
        open_dataset(folder.parent)
    assert "\n" not in str(err.value)
    (tmp_path / "elsewhere.json").rename(folder / "nnUNetPlans.json")  # beside the cases also counts
    assert open_dataset(folder).load_case("case_0").image.shape == (4, 8, 5)

    empty = tmp_path / "Dataset010_Empty" / "nnUNetPlans_3d_fullres"
    empty.mkdir(parents=True)
    (empty / "case_0.pkl").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no nnU-Net preprocessed cases in .*; looked for <case>.b2nd \+ "
                                                r"<case>_seg.b2nd .* / <case>.npz \(data, seg\)"):
        open_dataset(empty.parent)
    with pytest.raises(FileNotFoundError, match="neither an nnU-Net raw dataset"):
        open_dataset(tmp_path / "Dataset010_Empty" / "nothing")

    (folder / "case_0.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=r"case properties not found: .*case_0.pkl"):
        open_dataset(folder).load_case("case_0")


def test_properties_never_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran code from a pickle",))

    path = tmp_path / "case.pkl"
    path.write_bytes(pickle.dumps({"spacing": [1.0], "bad": Payload()}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle builtins.print"):
        read_properties(path)
    path.write_bytes(pickle.dumps({"spacing": np.float64(2.0), "locations": {1: np.zeros((2, 3), np.int64)}}))
    assert read_properties(path)["spacing"] == 2.0


def test_region_based_labels_of_a_preprocessed_dataset(tmp_path):
    labels = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3}
    root = tmp_path / "Dataset011_Regions"
    write_preprocessed_dataset(root, "npz", labels=labels)
    with pytest.raises(ValueError, match="need 'regions_class_order'"):
        open_dataset(root)
    meta = json.loads((root / "dataset.json").read_text()) | {"regions_class_order": [1, 2, 3]}
    (root / "dataset.json").write_text(json.dumps(meta))
    dataset = open_dataset(root)
    assert dataset.labels == {"background": 0, "whole tumour": 1, "tumour core": 2, "enhancing": 3}
    assert dataset.max_label == 3


def test_own_masks_from_a_preprocessed_folder_are_written_without_nnunets_minus_one(tiny, tmp_path):  # noqa: F811
    """nnU-Net's seg holds -1 outside its crop. It tells the conditioning where the body is, but the label file written
    beside a sample is an nnU-Net label map: background 0 there, never -1."""
    root = tmp_path / "Dataset013_Minus"
    write_preprocessed_dataset(root, "npz", cases=("case_0", "case_1"),
                               labels={"background": 0, "edema": 1, "core": 2, "enhancing": 3})
    seg = open_dataset(root, channel=0).load_case("case_0")
    assert seg.label.min() == -1
    for setting in ("ic", "icma"):
        config = make_config(tiny, setting, tmp_path / "out", data=root, cases="case_0", previews=False,
                             sampler=SamplerOptions(steps=2, window=4))
        manifest = run_inference(config)
        label = np.asanyarray(nib.load(str(manifest.parent / Manifest(manifest).records[0]["files"]["label"])).dataobj)
        assert label.min() == 0 and label.max() == 1, setting
        if setting == "ic":  # the own mask, with -1 read as background
            np.testing.assert_array_equal(label, seg.geometry.to_source(np.maximum(seg.label, 0)))
