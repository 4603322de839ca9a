"""gem3d.metrics.distribution and .features: FID, MMD, diversity, FRD and the feature networks' weight layouts."""
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric

from gem3d.metrics import distribution, features


def test_frechet_distance_matches_monai_and_known_answers():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 2, (7, 30)), rng.normal(0, 1, (11, 30))
    expected = float(FIDMetric()(torch.as_tensor(a), torch.as_tensor(b)))
    assert distribution.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert distribution.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # two 1-D Gaussians: (mu_a - mu_b)^2 + (s_a - s_b)^2; sets {-1, 1} (var 2) and {2, 4, 6} (var 4)
    assert distribution.frechet_distance([[-1.0], [1.0]], [[2.0], [4.0], [6.0]]) == pytest.approx(
        16 + (math.sqrt(2) - 2) ** 2)
    with pytest.raises(ValueError, match="at least 2 samples"):
        distribution.frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="width"):
        distribution.frechet_distance(a, b[:, :5])


def test_mmd_known_value():
    """MONAI's unbiased linear-kernel MMD: sets {x, -x} and {y, -y} give -|x|^2 - |y|^2 (the cross term is 0)."""
    x, y = np.array([1.0, 2.0]), np.array([0.0, 3.0])
    assert distribution.mmd(np.stack([x, -x]), np.stack([y, -y])) == pytest.approx(-5.0 - 9.0)
    # a shift by s between two copies of one set adds |s|^2
    base = np.random.default_rng(1).normal(size=(4, 3, 2))
    shifted = distribution.mmd(base, base + 0.5) - distribution.mmd(base, base)
    assert shifted == pytest.approx(0.25 * 6)
    with pytest.raises(ValueError, match="at least 2"):
        distribution.mmd(base[:1], base)


def test_ms_ssim_diversity():
    rng = np.random.default_rng(2)
    volume = rng.uniform(0, 1, (4, 32, 32))
    assert distribution.ms_ssim_diversity([volume, volume]) == pytest.approx(1.0, abs=1e-5)
    others = [rng.uniform(0, 1, (4, 32, 32)) for _ in range(3)]
    assert distribution.ms_ssim_diversity(others) < 0.2
    assert math.isnan(distribution.ms_ssim_diversity([volume]))


def _radimagenet_layout(state):
    index = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    return {f"backbone.{index[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in state.items()}


def test_radimagenet_resnet50_loads_both_layouts_and_has_torchvision_names(tmp_path):
    torch.manual_seed(0)
    source = features.radimagenet_resnet50()
    names = source.state_dict()
    # torchvision resnet50's parameter names and shapes (no torchvision here: spot checks)
    assert tuple(names["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(names["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert "layer1.0.downsample.0.bias" not in names and tuple(names["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert len([k for k in names if k.endswith("weight")]) == 106  # 53 convs + 53 batch norms
    x = torch.rand(2, 3, 32, 32)
    expected = source(x)
    assert tuple(expected.shape) == (2, 2048)
    torch.save(_radimagenet_layout(source.state_dict()), tmp_path / "official.pt")
    torch.save({**source.state_dict(), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)},
               tmp_path / "torchvision.pth")
    for name in ("official.pt", "torchvision.pth"):
        loaded = features.load_radimagenet_resnet50(tmp_path / name)
        torch.testing.assert_close(loaded(x), expected)
    keras_like = dict(source.state_dict())
    keras_like["layer1.0.conv1.bias"] = torch.zeros(64)
    torch.save(keras_like, tmp_path / "keras.pt")
    with pytest.raises(ValueError, match="unexpected.*layer1.0.conv1.bias"):
        features.load_radimagenet_resnet50(tmp_path / "keras.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        features.load_radimagenet_resnet50(tmp_path / "missing.pt")


def test_medicalnet_resnet_loads_medicalnet_files(tmp_path):
    torch.manual_seed(0)
    source = features.medicalnet_resnet(10)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state}, tmp_path / "resnet_10.pth")
    volume = np.random.default_rng(0).uniform(0, 1, (12, 20, 20))
    loaded = features.load_medicalnet_resnet(tmp_path / "resnet_10.pth")
    f = features.volume_features_3d(volume, loaded)
    np.testing.assert_allclose(f, features.volume_features_3d(volume, source))
    assert f.shape == (1, 512)
    with pytest.raises(ValueError, match="MedicalNet ResNet-18"):
        features.load_medicalnet_resnet(tmp_path / "resnet_10.pth", depth=18)
    with pytest.raises(ValueError, match="depth must be one of"):
        features.medicalnet_resnet(34)


def test_25d_features_take_every_body_slice_of_each_view():
    model = features.radimagenet_resnet50()
    volume = np.random.default_rng(3).uniform(0, 1, (6, 10, 12))
    body = np.zeros(volume.shape, bool)
    body[1:5, 2:9, 3:12] = True
    out = features.volume_features_25d(volume, model, body)
    assert {k: v.shape for k, v in out.items()} == {"axial": (4, 2048), "coronal": (9, 2048), "sagittal": (7, 2048)}
    # FID of a set with itself is 0
    assert distribution.frechet_distance(out["coronal"], out["coronal"]) == pytest.approx(0.0, abs=1e-6)


def test_frd_on_nifti_files_inside_masks(tmp_path):
    ok, reason = distribution.frd_available()
    if not ok:
        pytest.skip(reason)
    rng = np.random.default_rng(4)
    paths = {"a": [], "b": [], "ma": [], "mb": []}
    for i in range(3):
        for key, offset in (("a", 0.0), ("b", 0.5)):
            path = tmp_path / f"{key}{i}.nii.gz"
            nib.save(nib.Nifti1Image((rng.uniform(0, 1, (12, 12, 12)) + offset).astype(np.float32), np.eye(4)), str(path))
            mask = np.zeros((12, 12, 12), np.uint8)
            mask[2:10, 2:10, 2:10] = 1
            nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / f"m{key}{i}.nii.gz"))
            paths[key].append(path)
            paths["m" + key].append(tmp_path / f"m{key}{i}.nii.gz")
    same = distribution.frd(paths["a"], paths["a"], paths["ma"], paths["ma"])
    different = distribution.frd(paths["a"], paths["b"], paths["ma"], paths["mb"])
    assert same == -math.inf  # log(0): identical sets
    assert math.isfinite(different)
