"""Geometry: canonical reorientation and its exact inverse on oblique, non-RAS affines; NIfTI round trips."""
import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from gem3d.data.case import load_case
from gem3d.data.geometry import Geometry, load_nifti


def _rotation(ax, ay, az):
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def oblique_affine():
    """Source axes roughly (P, S, L): voxel axis 0 -> -y, 1 -> +z, 2 -> -x; zooms 1.5, 2, 3 mm; tilted ~12 deg."""
    perm = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)  # columns: world direction of each voxel axis
    linear = _rotation(12, -7, 9) @ perm @ np.diag([1.5, 2.0, 3.0])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [31.5, -12.25, 7.0]
    return affine


def write_nifti(path, arr, affine):
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def canonical_affine(geom):
    """(4, 4) voxel -> world affine of `geom.to_canonical`'s array, read off the world points of the source voxels
    it moves (and checked to hold for every canonical voxel)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij"), axis=-1)
    world = index @ geom.affine[:3, :3].T + geom.affine[:3, 3]
    canon = np.stack([geom.to_canonical(world[..., c]) for c in range(3)], axis=-1)  # (D, H, W, 3)
    affine = np.eye(4)
    affine[:3, 3] = canon[0, 0, 0]
    affine[:3, :3] = np.stack([canon[1, 0, 0], canon[0, 1, 0], canon[0, 0, 1]], axis=1) - canon[0, 0, 0][:, None]
    canon_index = np.stack(np.meshgrid(*[np.arange(n) for n in canon.shape[:3]], indexing="ij"), axis=-1)
    np.testing.assert_allclose(canon_index @ affine[:3, :3].T + affine[:3, 3], canon, atol=1e-9)
    return affine


def test_oblique_source_orientation_is_not_ras():
    geom = Geometry(oblique_affine(), (7, 9, 11))
    assert aff2axcodes(geom.affine) == ("P", "S", "L")
    # RAS axes: R <- source axis 2, A <- 0, S <- 1; slice axis 2 (S) first
    assert geom.canonical_shape == (9, 11, 7)
    np.testing.assert_allclose(geom.spacing, (2.0, 3.0, 1.5), rtol=1e-12)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_nifti_round_trip_oblique_non_ras(tmp_path, slice_axis):
    rng = np.random.default_rng(1)
    src = rng.normal(size=(7, 9, 11)).astype(np.float32)
    path = write_nifti(tmp_path / "img.nii.gz", src, oblique_affine())
    arr, geom = load_nifti(path, slice_axis=slice_axis)
    np.testing.assert_array_equal(arr, src)
    canon = geom.to_canonical(arr)
    assert canon.shape == geom.canonical_shape
    assert aff2axcodes(canonical_affine(geom))[0] == "RAS"[slice_axis]
    back = geom.to_source(canon)
    np.testing.assert_array_equal(back, src)
    # written back with the geometry: identical affine, shape and values
    out = write_nifti(tmp_path / "back.nii.gz", back, geom.affine)
    again, geom2 = load_nifti(out, slice_axis=slice_axis)
    np.testing.assert_array_equal(geom2.affine, geom.affine)
    assert geom2.shape == geom.shape
    np.testing.assert_array_equal(again, src)
    orig = nib.load(str(path))
    np.testing.assert_array_equal(nib.load(str(out)).affine, orig.affine)


def test_canonical_affine_points_at_the_same_world_positions():
    geom = Geometry(oblique_affine(), (7, 9, 11), slice_axis=2)
    src = np.arange(7 * 9 * 11, dtype=np.float32).reshape(7, 9, 11)
    canon = geom.to_canonical(src)
    affine = canonical_affine(geom)
    assert aff2axcodes(affine) == ("S", "R", "A")
    inv = np.linalg.inv(geom.affine)
    for dhw in [(0, 0, 0), (3, 5, 2), (8, 10, 6), (1, 7, 4)]:
        world = affine @ np.r_[dhw, 1.0]
        ijk = inv @ world
        np.testing.assert_allclose(ijk[:3], np.rint(ijk[:3]), atol=1e-9)
        assert canon[dhw] == src[tuple(np.rint(ijk[:3]).astype(int))]


def test_ras_input_with_axial_slices_moves_z_first():
    affine = np.diag([2.5, 2.5, 3.0, 1.0])
    affine[:3, 3] = [-80, -100, -60]
    geom = Geometry(affine, (4, 5, 6))
    src = np.random.default_rng(0).normal(size=(4, 5, 6))
    np.testing.assert_array_equal(geom.to_canonical(src), np.moveaxis(src, 2, 0))
    assert geom.spacing == (3.0, 2.5, 2.5)


def test_dict_round_trip_and_validation():
    geom = Geometry(oblique_affine(), (7, 9, 11), slice_axis=1)
    again = Geometry.from_dict(geom.to_dict())
    np.testing.assert_array_equal(again.affine, geom.affine)
    assert (again.shape, again.slice_axis) == (geom.shape, 1) and again == geom
    assert again != Geometry(oblique_affine(), (7, 9, 11), slice_axis=2)
    with pytest.raises(ValueError, match=r"slice_axis must be one of \(0, 1, 2\).*got 3"):
        Geometry(np.eye(4), (2, 2, 2), slice_axis=3)
    with pytest.raises(ValueError, match="singular"):
        Geometry(np.zeros((4, 4)), (2, 2, 2))
    with pytest.raises(ValueError, match=r"does not match the geometry's source shape \(7, 9, 11\)"):
        geom.to_canonical(np.zeros((7, 9, 10)))
    with pytest.raises(ValueError, match="canonical shape"):
        geom.to_source(np.zeros((7, 9, 11)))


def test_load_nifti_errors_and_4d(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_nifti(tmp_path / "missing.nii.gz")
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 5), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"3-D.*shape \(4, 5\)"):
        load_nifti(tmp_path / "flat.nii.gz")
    one = np.random.default_rng(0).normal(size=(4, 5, 6, 1)).astype(np.float32)
    arr, geom = load_nifti(write_nifti(tmp_path / "one.nii.gz", one, np.eye(4)))
    np.testing.assert_array_equal(arr, one[..., 0])
    assert geom.shape == (4, 5, 6)
    two = np.random.default_rng(0).normal(size=(4, 5, 6, 2)).astype(np.float32)
    write_nifti(tmp_path / "two.nii.gz", two, np.eye(4))
    with pytest.raises(ValueError, match="2 channels"):
        load_nifti(tmp_path / "two.nii.gz")
    np.testing.assert_array_equal(load_nifti(tmp_path / "two.nii.gz", channel=1)[0], two[..., 1])
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="cannot read"):
        load_nifti(tmp_path / "junk.nii.gz")


def test_load_case_checks_grid_agreement(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(7, 9, 11)).astype(np.float32)
    label = rng.integers(0, 3, size=(7, 9, 11)).astype(np.uint8)
    write_nifti(tmp_path / "c_0000.nii.gz", image, oblique_affine())
    write_nifti(tmp_path / "c.nii.gz", label, oblique_affine())
    case = load_case(tmp_path / "c_0000.nii.gz", tmp_path / "c.nii.gz")
    assert case.name == "c" and case.image.dtype == np.float32 and case.label.dtype == np.int16
    np.testing.assert_array_equal(case.geometry.to_source(case.label), label)
    shifted = oblique_affine()
    shifted[0, 3] += 1.0
    write_nifti(tmp_path / "bad.nii.gz", label, shifted)
    with pytest.raises(ValueError, match="affines differ"):
        load_case(tmp_path / "c_0000.nii.gz", tmp_path / "bad.nii.gz")
    write_nifti(tmp_path / "small.nii.gz", label[:, :, :5], oblique_affine())
    with pytest.raises(ValueError, match=r"shapes differ: \(7, 9, 11\) vs \(7, 9, 5\)"):
        load_case(tmp_path / "c_0000.nii.gz", tmp_path / "small.nii.gz")
