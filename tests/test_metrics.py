"""gem3d.metrics.image and .consistency on cases with known answers; .report's line plots."""
import math

import numpy as np
import pytest
from PIL import Image

from gem3d.metrics.consistency import consistency_metrics, intensity_profile, slice_jumps, through_plane_gradient
from gem3d.metrics.image import ms_ssim, ms_ssim_scales, psnr, reconstruction_metrics, ssim, ssim_map, to_unit_range
from gem3d.metrics.report import density, line_plot


def _volume(seed=0, shape=(4, 32, 32)):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, shape)


def test_psnr_known_value():
    ref = np.zeros((2, 8, 8))
    ref[0, 0, 0] = 1.0  # data range 1
    pred = ref + 0.1  # mse 0.01 -> 20 dB
    assert psnr(pred, ref) == pytest.approx(20.0, abs=1e-9)
    assert psnr(ref, ref) == math.inf


def test_psnr_of_known_gaussian_noise():
    ref = _volume(3, (8, 32, 32))
    noisy = ref + np.random.default_rng(4).normal(0, 0.1, ref.shape)  # mse ~ 0.01 -> ~20 dB on range 1
    assert psnr(noisy, ref, data_range=1.0) == pytest.approx(20.0, abs=0.2)


def test_psnr_mask_restricts_error():
    ref = _volume()
    pred = ref.copy()
    pred[:, :16] += 0.5
    mask = np.zeros_like(ref, dtype=bool)
    mask[:, 16:] = True
    assert psnr(pred, ref, data_range=1.0, mask=mask) == math.inf
    assert psnr(pred, ref, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.125), rel=1e-9)
    with pytest.raises(ValueError, match="empty"):
        psnr(pred, ref, mask=np.zeros_like(mask))


def test_ssim_identity_and_degradation():
    ref = _volume(1)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-6)
    assert ssim(ref, ref, mode="3d") == pytest.approx(1.0, abs=1e-6)
    noisy = ref + np.random.default_rng(2).normal(0, 0.2, ref.shape)
    noisier = ref + np.random.default_rng(2).normal(0, 0.5, ref.shape)
    assert 0 < ssim(noisier, ref, data_range=1.0) < ssim(noisy, ref, data_range=1.0) < 1


def test_ssim_runs_over_axial_slices_and_inside_the_mask():
    """Damage one axial slice: the axial SSIM drops by about 1/D of the damage; a mask that leaves the slice out
    is unaffected (the issue's bug: the demo's SSIM ran over sagittal slices with the background included)."""
    ref = _volume(5, (8, 24, 24))
    pred = ref.copy()
    pred[3] = 0.5  # one flat axial slice
    per_slice = [ssim(pred[d][None], ref[d][None], 1.0) for d in range(8)]
    assert ssim(pred, ref, 1.0) == pytest.approx(np.mean(per_slice), abs=1e-6)  # MONAI computes in float32
    assert per_slice[3] < 0.1 and all(v == pytest.approx(1.0) for i, v in enumerate(per_slice) if i != 3)
    mask = np.ones(ref.shape, bool)
    mask[3] = False
    assert ssim(pred, ref, 1.0, mask=mask) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="mode must be one of"):
        ssim(pred, ref, mode="sagittal")


def test_one_ssim_map_serves_every_mask_as_ssim_would():
    """reconstruction_metrics computes the axial SSIM map once and averages it over the body and each label: the
    same numbers as one ssim() call per mask; a mask only at the border is refused as ssim() refuses it."""
    ref = _volume(7, (6, 32, 32))
    pred = ref + np.random.default_rng(8).normal(0, 0.1, ref.shape)
    labels = np.zeros(ref.shape, int)
    labels[1:4, 8:20, 10:22] = 1
    labels[2:5, 14:18, 6:12] = 2
    body = np.zeros(ref.shape, bool)
    body[:, 4:28, 4:28] = True
    for mode in ("axial", "3d"):
        shared = ssim_map(pred, ref, 1.0, mode=mode)
        for mask in (None, body, labels == 1, labels == 2):
            assert shared.mean(mask) == pytest.approx(ssim(pred, ref, 1.0, mask=mask, mode=mode), abs=1e-7)
    out = reconstruction_metrics(pred, ref, body=body, labels=labels, label_names={1: "a", 2: "b"})
    real01, fake01 = to_unit_range(ref, ref), to_unit_range(pred, ref)
    assert out["ssim_axial_body"] == pytest.approx(ssim(fake01, real01, 1.0, body), abs=1e-7)
    for value, name in ((1, "a"), (2, "b")):
        assert out[f"ssim_axial_{name}"] == pytest.approx(ssim(fake01, real01, 1.0, labels == value), abs=1e-7)
    border = np.zeros(ref.shape, bool)
    border[:, 0, :] = True
    with pytest.raises(ValueError, match="no voxel at least 5 voxels from the border"):
        ssim_map(pred, ref, 1.0).mean(border)


def test_ms_ssim_identity_scales_and_noise():
    ref = _volume(6, (4, 64, 64))
    value, scales, window = ms_ssim(ref, ref, 1.0)
    assert value == pytest.approx(1.0, abs=1e-5) and (scales, window) == (3, 11)
    noisy = ref + np.random.default_rng(7).normal(0, 0.3, ref.shape)
    assert ms_ssim(noisy, ref, 1.0)[0] < 0.9
    assert ms_ssim_scales((16, 16)) == (2, 7)  # small images: fewer scales and a smaller window
    assert ms_ssim_scales((176, 176)) == (5, 11)
    assert ms_ssim_scales((6, 6)) == (2, 3)
    assert ms_ssim_scales((4, 4)) == (1, 3)
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_scales((2, 2))


def test_reconstruction_metrics_on_the_real_scale_inside_the_body_and_per_label():
    real = np.zeros((8, 24, 24))
    real[:, 4:20, 4:20] = 100.0
    real[:, 8:14, 8:14] = 200.0  # range 200
    labels = np.zeros(real.shape, int)
    labels[:, 4:20, 4:20] = 1
    labels[:, 8:14, 8:14] = 2
    body = labels > 0
    fake = real.copy()
    fake[labels == 2] += 20.0  # error 0.1 on the [0, 1] scale, only in label 2
    fake[~body] += 50.0  # background error outside the body must not count
    out = reconstruction_metrics(fake, real, body, labels, {1: "tissue", 2: "lesion"})
    assert out["psnr_tissue"] == math.inf
    assert out["psnr_lesion"] == pytest.approx(20.0)
    fraction = (labels == 2).sum() / body.sum()
    assert out["psnr_body"] == pytest.approx(-10 * math.log10(0.01 * fraction))
    assert 0 < out["ssim_axial_body"] < 1 and out["ms_ssim_scales"] >= 1
    assert to_unit_range(real, real).max() == 1.0


def test_slice_jumps():
    ramp = np.broadcast_to(np.arange(5.0)[:, None, None], (5, 3, 3))
    np.testing.assert_allclose(slice_jumps(np.ones((3, 4, 4))), np.zeros(2))
    np.testing.assert_allclose(slice_jumps(ramp), np.ones(4))
    mask = np.zeros((5, 3, 3), bool)
    mask[:2] = True
    assert np.isnan(slice_jumps(ramp, mask)[2:]).all()
    with pytest.raises(ValueError, match="D >= 2"):
        slice_jumps(np.zeros((1, 4, 4)))


def test_through_plane_gradient_and_ratios():
    d = np.arange(6.0)[:, None, None]
    w = np.arange(8.0)[None, None, :]
    volume = np.broadcast_to(2 * d + w, (6, 8, 8))  # |dv/dd| = 2, in-plane |grad| = 1
    through, ratio = through_plane_gradient(volume)
    assert (through, ratio) == (pytest.approx(2.0), pytest.approx(2.0))
    np.testing.assert_allclose(intensity_profile(volume), 2 * np.arange(6.0) + 3.5)
    real = np.broadcast_to(d + w, (6, 8, 8))
    out = consistency_metrics(volume, real)
    assert out["slice_jump_ratio"] == pytest.approx(2.0) and out["through_plane_grad_ratio"] == pytest.approx(2.0)


def test_line_plot_writes_a_png_of_the_size_with_every_series(tmp_path):
    profile = np.sin(np.arange(30) / 4.0)
    profile[10:12] = np.nan  # a gap
    series = {"real": density(np.linspace(0.2, 0.6, 500)), "synthetic": (np.arange(30) / 30, profile),
              "empty": density(np.array([]))}
    path = line_plot(tmp_path / "p.png", series, "title", "x", "y", size=(400, 300))
    assert path == tmp_path / "p.png" and sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    with Image.open(path) as handle:
        png = np.asarray(handle.convert("RGB")).reshape(-1, 3)
    assert len(png) == 400 * 300
    for colour in ((31, 119, 180), (255, 127, 14)):  # matplotlib's first two line colours, one per series
        assert np.any(np.all(png == colour, axis=-1)), colour
