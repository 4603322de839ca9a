"""Preprocessing: grey mask levels, body rules, intensity round trips, resizing, restoring onto the source grid."""
import pickle
from dataclasses import asdict

import numpy as np
import pytest

from gem3d.data.case import Case
from gem3d.data.geometry import Geometry
from gem3d.data.nnunet import read_preprocessed_case
from gem3d.data.preprocess import (
    PreprocessConfig,
    compute_body_mask,
    denormalise_intensity,
    grey_to_label,
    label_to_grey,
    normalise_intensity,
    prepare_case,
    resize_slices,
    restore_volume,
)
from tests.test_geometry import oblique_affine


def ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return np.sqrt(((grid - np.asarray(centre)) ** 2).sum(-1)) <= radius


def mri_case(shape=(7, 9, 11), affine=None, seed=0):
    """Source-grid MRI-like case: nonzero inside a ball, a lesion (1..3) inside it."""
    rng = np.random.default_rng(seed)
    body = ball(shape, np.array(shape) / 2 - 0.5, min(shape) / 2 - 0.5)
    image = np.where(body, rng.uniform(50, 400, shape), 0).astype(np.float32)
    label = np.zeros(shape, np.int16)
    label[ball(shape, np.array(shape) / 2, 1.8)] = 1
    label[ball(shape, np.array(shape) / 2, 1.0)] = 3
    geom = Geometry(oblique_affine() if affine is None else affine, shape)
    return Case("m", geom.to_canonical(image), geom.to_canonical(label), geom), image, label, body


def test_grey_levels_match_the_original_encoding():
    levels = label_to_grey(np.array([-1, 0, 1, 2, 3]), 3)
    np.testing.assert_allclose(levels, [-1 - 2 / 3, -1, -1 / 3, 1 / 3, 1], rtol=1e-6)
    np.testing.assert_allclose(label_to_grey(np.array([-1, 0, 4]), 4), [-1.5, -1, 1])
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 4, size=(3, 5, 5))
    noisy = label_to_grey(labels, 3) + rng.uniform(-0.3, 0.3, labels.shape)
    np.testing.assert_array_equal(grey_to_label(noisy, 3), labels)
    assert grey_to_label(np.array([-5.0, 5.0]), 3).tolist() == [-1, 3]
    with pytest.raises(ValueError, match=r"\[-1, 3\].*\[0, 4\]"):
        label_to_grey(np.array([0, 4]), 3)


def test_body_nonzero_threshold_none():
    shape = (6, 24, 24)
    inside = ball(shape, (2.5, 11.5, 11.5), 9)
    image = np.where(inside, 1.0, 0.0)
    image[2, 12, 12] = 0.0  # a zero voxel inside the head is still body (holes filled)
    mask = compute_body_mask(image, PreprocessConfig(body="nonzero"))
    np.testing.assert_array_equal(mask, inside)
    assert not compute_body_mask(image, PreprocessConfig(body="nonzero", body_fill_holes=False))[2, 12, 12]
    # CT: air -1000, body 40 HU with lungs (-800) inside, a separate table below
    d, h, w = 5, 32, 32
    yy, xx = np.mgrid[:h, :w]
    body2d = ((yy - 14) / 11) ** 2 + ((xx - 16) / 13) ** 2 <= 1
    lungs2d = ((yy - 14) / 5) ** 2 + ((xx - 11) / 3) ** 2 <= 1
    ct = np.full((d, h, w), -1000.0)
    ct[:, body2d] = 40.0
    ct[:, lungs2d] = -800.0
    ct[:, 29:31, 4:28] = 200.0  # the table
    body = compute_body_mask(ct, PreprocessConfig(body="threshold", body_threshold=-500))
    np.testing.assert_array_equal(body, np.broadcast_to(body2d, (d, h, w)))
    raw = compute_body_mask(ct, PreprocessConfig(body="threshold", body_largest_component=False,
                                                 body_fill_holes=False))
    assert raw[:, 30, 10].all() and not raw[:, lungs2d].any()
    assert compute_body_mask(ct, PreprocessConfig(body="none")).all()


@pytest.mark.parametrize("mode", ["minmax", "percentile", "window"])
def test_intensity_round_trip(mode):
    rng = np.random.default_rng(0)
    image = rng.uniform(-300, 500, size=(4, 8, 8)).astype(np.float32)
    cfg = PreprocessConfig(intensity=mode, percentiles=(5, 95), window=(-200, 300))
    x, stats = normalise_intensity(image, cfg, np.ones_like(image, bool))
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    lo, hi = stats["lo"], stats["hi"]
    if mode == "minmax":
        assert (lo, hi) == (image.min(), image.max()) and x.min() == -1 and x.max() == 1
    elif mode == "percentile":
        np.testing.assert_allclose([lo, hi], np.percentile(image, [5, 95]), rtol=1e-6)
    else:
        assert (lo, hi) == (-200, 300)
    back = denormalise_intensity(x, stats)
    np.testing.assert_allclose(back, np.clip(image, lo, hi), atol=1e-3 * (hi - lo))


def test_config_validation_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"intensity must be one of \('minmax', 'percentile', 'window'\).*'zscore'"):
        PreprocessConfig(intensity="zscore")
    with pytest.raises(ValueError, match=r"body must be one of .*'skin'"):
        PreprocessConfig(body="skin")
    with pytest.raises(ValueError, match="max_label must be an int >= 1"):
        PreprocessConfig(max_label=0)
    with pytest.raises(ValueError, match="percentiles"):
        PreprocessConfig(percentiles=(99, 1))
    with pytest.raises(ValueError, match=r"unknown preprocess keys \['sise'\]"):
        PreprocessConfig.from_dict({"sise": 64})
    cfg = PreprocessConfig.from_dict({"size": 64, "intensity": "window", "window": [-100, 200]})
    assert cfg.window == (-100.0, 200.0) and PreprocessConfig.from_dict(asdict(cfg)) == cfg


def test_resize_slices_modes():
    vol = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    up = resize_slices(vol, 8)
    assert up.shape == (2, 8, 8) and up.dtype == np.float32
    np.testing.assert_allclose(up.mean(axis=(1, 2)), vol.mean(axis=(1, 2)), rtol=1e-5)
    lab = np.random.default_rng(0).integers(-1, 4, size=(3, 5, 6)).astype(np.int16)
    up = resize_slices(lab, (10, 12), "nearest")
    assert up.dtype == np.int16 and set(np.unique(up)) <= set(np.unique(lab))
    np.testing.assert_array_equal(resize_slices(up, (5, 6), "nearest"), lab)
    with pytest.raises(ValueError, match=r"mode must be one of \('bilinear', 'nearest'\)"):
        resize_slices(vol, 8, "bicubic")


def test_prepare_case_body_labels_and_exact_restore_without_resize():
    case, image, label, body = mri_case()
    prepared = prepare_case(case, PreprocessConfig(size=None, max_label=3))
    assert prepared.image.shape == case.geometry.canonical_shape
    canon_body = case.geometry.to_canonical(body)
    np.testing.assert_array_equal(prepared.label == -1, ~canon_body)
    assert set(np.unique(prepared.label)) == {-1, 0, 1, 3}
    assert prepared.image.min() == -1 and prepared.image.max() == 1
    restored = restore_volume(prepared.image, prepared)
    assert restored.shape == image.shape and restored.dtype == np.float32
    np.testing.assert_allclose(restored, image, atol=1e-3)


def test_prepare_case_resize_and_restore_onto_source_grid():
    case, image, label, body = mri_case(shape=(8, 10, 12))
    d, h, w = case.geometry.canonical_shape
    prepared = prepare_case(case, PreprocessConfig(size=24, max_label=3))
    assert prepared.image.shape == (d, 24, 24) and prepared.label.shape == (d, 24, 24)
    assert prepared.canonical_hw == (h, w)
    restored = restore_volume(prepared.image, prepared)
    assert restored.shape == image.shape
    assert np.corrcoef(restored.ravel(), image.ravel())[0, 1] > 0.6


def test_lesions_are_always_body_and_labels_beyond_max_fail():
    shape = (4, 6, 6)
    image = np.zeros(shape, np.float32)
    image[:, 1:5, 1:5] = 10
    label = np.zeros(shape, np.int16)
    label[:, 0, 0] = 2  # labelled but zero intensity
    case = Case("z", image, label, Geometry(np.eye(4), shape, slice_axis=0))
    prepared = prepare_case(case, PreprocessConfig(size=None))
    assert (prepared.label[:, 0, 0] == 2).all()
    with pytest.raises(ValueError, match=r"label values \[0, 2\] exceed.*max_label=1"):
        prepare_case(case, PreprocessConfig(size=None, max_label=1))


def test_preprocessed_npz_keeps_seg_minus_one_as_body(tmp_path):
    TRANSPOSE_FORWARD = (0, 2, 1)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    seg = rng.integers(0, 3, size=(1, 5, 6, 7)).astype(np.int8)
    seg[0, :, 0, :] = -1
    np.savez(tmp_path / "case_001.npz", data=data, seg=seg)
    with open(tmp_path / "case_001.pkl", "wb") as f:  # unit voxels, axes (S, R, A) after transpose: stored = canonical
        pickle.dump({"nibabel_stuff": {"original_affine": np.eye(4)}, "shape_after_cropping_and_before_resampling":
                     (5, 6, 7), "bbox_used_for_cropping": [[0, 5], [0, 6], [0, 7]]}, f)
    case = read_preprocessed_case(tmp_path / "case_001.npz", TRANSPOSE_FORWARD)
    np.testing.assert_array_equal(case.image, data[0])
    np.testing.assert_array_equal(case.label, seg[0])
    assert case.name == "case_001" and case.geometry.canonical_shape == (5, 6, 7)
    prepared = prepare_case(case, PreprocessConfig(size=None, max_label=2, intensity="percentile"))
    np.testing.assert_array_equal(prepared.label == -1, seg[0] == -1)
    second = read_preprocessed_case(tmp_path / "case_001.npz", TRANSPOSE_FORWARD, channel=1)
    assert second.image[0, 0, 0] == data[1, 0, 0, 0]
    with pytest.raises(ValueError, match="channel 2 out of range"):
        read_preprocessed_case(tmp_path / "case_001.npz", TRANSPOSE_FORWARD, channel=2)
