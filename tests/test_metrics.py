import math

import numpy as np
import pytest

from gem3d.metrics.image import psnr, slice_consistency, ssim


def _volume(seed=0, shape=(4, 32, 32)):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, shape)


def test_psnr_known_value():
    ref = np.zeros((2, 8, 8))
    ref[0, 0, 0] = 1.0  # data range 1
    pred = ref + 0.1  # mse 0.01 -> 20 dB
    assert psnr(pred, ref) == pytest.approx(20.0, abs=1e-9)
    assert psnr(ref, ref) == math.inf


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
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    noisy = ref + np.random.default_rng(2).normal(0, 0.2, ref.shape)
    noisier = ref + np.random.default_rng(2).normal(0, 0.5, ref.shape)
    assert 0 < ssim(noisier, ref, data_range=1.0) < ssim(noisy, ref, data_range=1.0) < 1


def test_shape_errors_name_shapes():
    with pytest.raises(ValueError, match=r"\(4, 32, 32\) and \(4, 32, 31\)"):
        psnr(_volume(), _volume(shape=(4, 32, 31)))
    with pytest.raises(ValueError, match="D >= 2"):
        slice_consistency(np.zeros((1, 4, 4)))


def test_slice_consistency():
    ramp = np.broadcast_to(np.arange(5.0)[:, None, None], (5, 3, 3))
    assert slice_consistency(ramp) == pytest.approx(1.0)
    assert slice_consistency(np.ones((3, 4, 4))) == 0.0
