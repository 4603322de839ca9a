import json
import os

import nibabel as nib
import numpy as np
import pytest

from gem3d.data.geometry import Geometry, load_nifti
from gem3d.export import nifti as nifti_module
from gem3d.export.nifti import save_nifti
from gem3d.files import atomic_write_json, atomic_write_text


def oblique_affine() -> np.ndarray:
    """An oblique, anisotropic, non-RAS (L, P, S-like with permuted axes) affine, float32-representable."""
    angles = np.radians([17.0, -9.0, 31.0])
    rx = np.array([[1, 0, 0], [0, np.cos(angles[0]), -np.sin(angles[0])], [0, np.sin(angles[0]), np.cos(angles[0])]])
    ry = np.array([[np.cos(angles[1]), 0, np.sin(angles[1])], [0, 1, 0], [-np.sin(angles[1]), 0, np.cos(angles[1])]])
    rz = np.array([[np.cos(angles[2]), -np.sin(angles[2]), 0], [np.sin(angles[2]), np.cos(angles[2]), 0], [0, 0, 1]])
    linear = rz @ ry @ rx @ np.diag([-0.9, 1.3, 2.5])
    linear = linear[:, [1, 0, 2]]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-31.25, 17.5, 4.125]
    return affine.astype(np.float32).astype(np.float64)


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_oblique_affine_and_shape_survive_exactly(tmp_path, suffix):
    affine = oblique_affine()
    geometry = Geometry(affine=affine, shape=(7, 5, 6))
    assert nib.aff2axcodes(geometry.affine) != ("R", "A", "S")
    data = np.random.default_rng(0).normal(size=(7, 5, 6)).astype(np.float32)
    path = save_nifti(data, geometry, tmp_path / f"vol{suffix}")
    assert path == tmp_path / f"vol{suffix}"
    image = nib.load(str(path))
    assert image.shape == (7, 5, 6)
    assert np.array_equal(image.affine, affine)
    assert np.array_equal(image.header.get_sform(), affine)
    assert np.allclose(image.header.get_qform(), affine, atol=1e-5)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    assert image.get_data_dtype() == np.float32
    assert np.array_equal(np.asanyarray(image.dataobj), data)
    assert listing(tmp_path) == [f"vol{suffix}"]


def test_canonical_volume_written_back_in_source_geometry(tmp_path):
    affine = oblique_affine()
    source = np.arange(7 * 5 * 6, dtype=np.int16).reshape(7, 5, 6)
    geometry = Geometry(affine=affine, shape=source.shape)
    canonical = geometry.to_canonical(source)
    path = save_nifti(geometry.to_source(canonical), geometry, tmp_path / "label.nii.gz")
    loaded, loaded_geometry = load_nifti(path, dtype=np.int16)
    assert np.array_equal(loaded, source)
    assert np.array_equal(loaded_geometry.affine, affine)
    assert np.array_equal(loaded_geometry.to_canonical(loaded), canonical)
    assert nib.load(str(path)).get_data_dtype() == np.int16


def test_plain_affine_is_accepted(tmp_path):
    affine = np.diag([2.0, -1.5, 3.0, 1.0])
    path = save_nifti(np.zeros((3, 4, 5), np.float32), affine, tmp_path / "a.nii.gz")
    assert np.array_equal(nib.load(str(path)).affine, affine)


def test_shape_mismatch_names_both_shapes(tmp_path):
    geometry = Geometry(affine=oblique_affine(), shape=(7, 5, 6))
    with pytest.raises(ValueError, match=r"\(6, 5, 7\).*\(7, 5, 6\)"):
        save_nifti(np.zeros((6, 5, 7), np.float32), geometry, tmp_path / "bad.nii.gz")
    assert listing(tmp_path) == []


def test_bad_suffix_and_bad_affine_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must end with"):
        save_nifti(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "x.nrrd")
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        save_nifti(np.zeros((2, 2, 2)), np.eye(3), tmp_path / "x.nii.gz")
    singular = np.eye(4)
    singular[2, 2] = 0.0
    with pytest.raises(ValueError, match="singular"):
        save_nifti(np.zeros((2, 2, 2)), singular, tmp_path / "x.nii.gz")


def test_default_dtypes(tmp_path):
    cases = {
        "bool": (np.ones((2, 3, 4), bool), np.uint8),
        "int64": (np.full((2, 3, 4), 3, np.int64), np.int16),
        "float64": (np.full((2, 3, 4), 0.5), np.float32),
    }
    for name, (array, expected) in cases.items():
        image = nib.load(str(save_nifti(array, np.eye(4), tmp_path / f"{name}.nii.gz")))
        assert image.get_data_dtype() == expected, name
        assert np.array_equal(np.asanyarray(image.dataobj), array.astype(expected))
    rounded = save_nifti(np.full((2, 2, 2), 2.6), np.eye(4), tmp_path / "r.nii.gz", dtype=np.int16)
    assert np.array_equal(np.asanyarray(nib.load(str(rounded)).dataobj), np.full((2, 2, 2), 3, np.int16))


def test_failure_mid_write_leaves_no_partial_or_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "vol.nii.gz"
    old = save_nifti(np.zeros((3, 3, 3), np.float32), np.eye(4), target)
    old_bytes = old.read_bytes()

    def broken_save(image, filename):
        with open(filename, "wb") as handle:
            handle.write(b"\x1f\x8b partial gzip stream")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(nifti_module.nib, "save", broken_save)
    with pytest.raises(OSError, match="simulated"):
        save_nifti(np.ones((3, 3, 3), np.float32), np.eye(4), target)
    with pytest.raises(OSError, match="simulated"):
        save_nifti(np.ones((3, 3, 3), np.float32), np.eye(4), tmp_path / "new.nii.gz")
    assert listing(tmp_path) == ["vol.nii.gz"]
    assert target.read_bytes() == old_bytes


def test_atomic_text_bytes_json(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    assert (tmp_path / "a" / "b.txt").read_text() == "hello"
    payload = {"n": np.int64(3), "x": np.float32(0.5), "arr": np.arange(3), "p": tmp_path / "z"}
    atomic_write_json(tmp_path / "d.json", payload)
    assert json.loads((tmp_path / "d.json").read_text()) == {"n": 3, "x": 0.5, "arr": [0, 1, 2], "p": str(tmp_path / "z")}
    with pytest.raises(TypeError, match="not JSON serialisable"):
        atomic_write_json(tmp_path / "d.json", {"bad": object()})
    assert json.loads((tmp_path / "d.json").read_text())["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d.json"]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """A file written atomically is readable like any other new file (umask), not private like mkstemp's."""
    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o600)
        atomic_write_text(path, "y")  # an existing file keeps its mode
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(mask)
