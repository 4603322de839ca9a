import functools
import json

import numpy as np
import pytest

from gem3d.data.geometry import Geometry
from gem3d.inference import mask_edit as me

SHAPE = (24, 32, 32)
SEEDS = range(25)


def phantom(outside: int = -1):
    """Ellipsoid body (centred), a 2-level lesion off-centre, an 'organ' label 1 elsewhere."""
    d, h, w = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = ((d - 11.5) / 11.5) ** 2 + ((h - 15.5) / 15) ** 2 + ((w - 15.5) / 13) ** 2 <= 1
    label = np.zeros(SHAPE, np.int16)
    label[(((d - 12) / 4) ** 2 + ((h - 24) / 3) ** 2 + ((w - 10) / 3) ** 2 <= 1)] = 1
    lesion = ((d - 10) / 4) ** 2 + ((h - 7) / 4) ** 2 + ((w - 21) / 4) ** 2 <= 1
    label[lesion] = 2
    label[lesion & ((((d - 10) / 2) ** 2 + ((h - 7) / 2) ** 2 + ((w - 21) / 2) ** 2) <= 1)] = 3
    label[~body] = outside
    return label, body


EDITS = {
    "move": functools.partial(me.move_toward_centre, reference_size=None, distance=(2, 8)),
    "move_scaled": me.move_toward_centre,
    "rotate": functools.partial(me.rotate, max_degrees=10.0),
    "flip": me.flip,
    "scale": me.scale,
    "remove": me.remove_lesion,
    "remap": functools.partial(me.remap_labels, mapping={3: 2}),
    "compose": me.compose(me.rotate, functools.partial(me.scale, factor_range=(1.5, 2.0)), me.flip),
    "icma": me.icma_edit,
    "icma_lesion_only": functools.partial(me.icma_edit, lesion_labels=[2, 3], reference_size=None),
}


@pytest.mark.parametrize("outside", [-1, 0])
@pytest.mark.parametrize("name", sorted(EDITS))
def test_invariants_over_many_seeds(name, outside):
    label, body = phantom(outside)
    values = set(np.unique(label).tolist())
    changed = 0
    for seed in SEEDS:
        new, info = EDITS[name](label, body, seed)
        assert new.shape == SHAPE and new.dtype == np.int16
        assert not np.any((new > 0) & ~body), (name, seed)
        assert np.array_equal(new[~body], label[~body]), (name, seed)  # body region restored
        assert np.array_equal(new == -1, label == -1)
        assert set(np.unique(new).tolist()) <= values | {0}, (name, seed)
        json.dumps(info)
        changed += int(not np.array_equal(new, label))
    assert changed > 0, name


def test_same_seed_same_result_and_generator_equivalence():
    label, body = phantom()
    for name, edit in EDITS.items():
        a, info_a = edit(label, body, 7)
        b, info_b = edit(label, body, np.random.default_rng(7))
        assert np.array_equal(a, b) and info_a == info_b, name
    results = {me.icma_edit(label, body, seed)[0].tobytes() for seed in range(6)}
    assert len(results) > 1


def test_rng_must_be_seeded():
    label, body = phantom()
    with pytest.raises(TypeError, match="Generator or an int seed"):
        me.rotate(label, body, None)


def test_remove_lesion_leaves_no_lesion():
    label, body = phantom()
    healthy, info = me.remove_lesion(label, body)
    assert not np.any(healthy > 0)
    assert info["removed_voxels"] == int((label > 0).sum())
    only_tumour, _ = me.remove_lesion(label, body, lesion_labels=[2, 3])
    assert not np.any(np.isin(only_tumour, [2, 3]))
    assert np.array_equal(only_tumour == 1, label == 1)
    assert np.array_equal(only_tumour[~np.isin(label, [2, 3])], label[~np.isin(label, [2, 3])])
    with pytest.raises(ValueError, match="lesion_labels must be > 0"):
        me.remove_lesion(label, body, lesion_labels=[0])


def test_remap_is_exact():
    label, body = phantom()
    swapped, info = me.remap_labels(label, body, mapping={1: 2, 2: 1})
    expected = label.copy()
    expected[label == 1] = 2
    expected[label == 2] = 1
    assert np.array_equal(swapped, expected)
    assert info == {"edit": "remap_labels", "mapping": {"1": 2, "2": 1}}
    merged, _ = me.remap_labels(label, body, mapping={3: 2})
    assert np.array_equal(merged == 2, np.isin(label, [2, 3]))
    assert np.array_equal(merged == 1, label == 1)
    with pytest.raises(ValueError, match=r"\{3: 5\}.*0\.\.3"):
        me.remap_labels(label, body, mapping={3: 5}, max_label=3)
    with pytest.raises(ValueError, match=r"\{-1: 0\}"):
        me.remap_labels(label, body, mapping={-1: 0})


def test_move_toward_centre_moves_by_the_drawn_distance():
    label, body = phantom()
    lesion = np.isin(label, [2, 3])
    before = np.argwhere(lesion).mean(axis=0)
    centre = (np.asarray(SHAPE) - 1) / 2
    new, info = me.move_toward_centre(label, body, 3, distance=(5.0, 5.0), reference_size=None, lesion_labels=[2, 3])
    after = np.argwhere(np.isin(new, [2, 3])).mean(axis=0)
    assert info["distance"] == 5.0 and info["lesion_voxels_after"] == info["lesion_voxels_before"] == lesion.sum()
    assert np.linalg.norm(after - before - info["shift"]) < 1e-9
    assert abs(np.linalg.norm(info["shift"]) - 5.0) <= 1.0
    assert np.linalg.norm(centre - after) < np.linalg.norm(centre - before) - 4.0
    # never past the centre, whatever the distance
    far, info_far = me.move_toward_centre(label, body, 3, distance=(500, 500), reference_size=None, lesion_labels=[2, 3])
    assert np.linalg.norm(np.asarray(info_far["shift"]) - (centre - before)) <= 1.0
    # small volumes scale the paper's 20-60 voxels down
    _, scaled = me.move_toward_centre(label, body, 3)
    assert 20 * 24 / 128 <= scaled["distance"] <= 60 * 24 / 128


def test_flip_mirrors_left_right_in_a_symmetric_body():
    label, body = phantom(outside=0)
    assert np.array_equal(body, np.flip(body, axis=me.LEFT_RIGHT_AXIS))
    flipped, info = me.flip(label, body, 0, lesion_labels=[2, 3])
    lesion = np.where(np.isin(label, [2, 3]), label, 0)
    assert np.array_equal(np.where(np.isin(flipped, [2, 3]), flipped, 0), np.flip(lesion, axis=me.LEFT_RIGHT_AXIS))
    assert info == {"edit": "flip", "axis": me.LEFT_RIGHT_AXIS, "flipped": True}
    same, info = me.flip(label, body, 0, probability=0.0)
    assert np.array_equal(same, label) and info["flipped"] is False


def test_identity_parameters_are_identities():
    label, body = phantom()
    assert np.array_equal(me.rotate(label, body, 1, max_degrees=0.0)[0], label)
    assert np.array_equal(me.scale(label, body, 1, factor_range=(1.0, 1.0))[0], label)
    grown, _ = me.scale(label, body, 1, factor_range=(1.5, 1.5), lesion_labels=[2, 3])
    assert np.isin(grown, [2, 3]).sum() > 2 * np.isin(label, [2, 3]).sum()
    empty = np.where(body, 0, -1).astype(np.int16)
    for edit in EDITS.values():
        new, _ = edit(empty, body, 0)
        assert np.array_equal(new, empty)


def test_left_right_axis_matches_geometry_canonical_layout():
    assert me.left_right_axis(2) == me.LEFT_RIGHT_AXIS == 1
    assert me.left_right_axis(0) == 0 and me.left_right_axis(1) == 1
    shape = (5, 6, 7)
    for affine in (np.diag([2.0, 2.0, 3.0, 1.0]), np.diag([-2.0, -2.0, 3.0, 1.0]), np.eye(4)[[1, 0, 2, 3]]):
        for slice_axis in (0, 1, 2):
            geometry = Geometry(affine=affine, shape=shape, slice_axis=slice_axis)
            ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
            world_x = (ijk @ affine[:3, :3].T + affine[:3, 3])[..., 0]  # R coordinate of each voxel
            canonical = geometry.to_canonical(world_x)
            axis = me.left_right_axis(slice_axis)
            assert np.all(np.diff(canonical, axis=axis) > 0)
            others = [a for a in range(3) if a != axis]
            for other in others:
                assert np.allclose(np.diff(canonical, axis=other), 0)


def test_compose():
    label, body = phantom()
    edit = me.compose(functools.partial(me.rotate, max_degrees=5), me.flip, name="mine")
    new, info = edit(label, body, 3)
    assert info["edit"] == "mine" and [s["edit"] for s in info["steps"]] == ["rotate", "flip"]
    rng = np.random.default_rng(3)
    step1, _ = me.rotate(label, body, rng, max_degrees=5)
    step2, _ = me.flip(step1, body, rng)
    assert np.array_equal(new, step2)
    _, icma_info = me.icma_edit(label, body, 0)
    assert [s["edit"] for s in icma_info["steps"]] == ["rotate", "flip", "move_toward_centre"]
    with pytest.raises(ValueError, match=r"label must be a \(D, H, W\)"):
        me.rotate(label[0], body[0], 0)
    with pytest.raises(ValueError, match="body shape"):
        me.rotate(label, body[:, :, :5], 0)
