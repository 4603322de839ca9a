"""``(N, F)`` features for FID from MONAI ResNets with local weights (nothing is downloaded): 2.5D from a ResNet-50
in torchvision's layout with RadImageNet's PyTorch weights (slices ImageNet-normalised at their own size), 3D from
MedicalNet's ResNet-10/18/50 (volumes z-scored)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat
from monai.networks.nets import resnet as monai_resnet

from gem3d.checkpoint import load_weights, safe_load_checkpoint
from gem3d.export.preview import VIEWS as PREVIEW_VIEWS

MEDICALNET_DEPTHS = (10, 18, 50)
RADIMAGENET_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIEWS = dict(PREVIEW_VIEWS)  # view name -> the canonical axis it fixes


def radimagenet_resnet50() -> torch.nn.Module:
    """ResNet-50 feature extractor in the torchvision layout (``(B, 3, H, W)`` -> ``(B, 2048)``), eval mode."""
    return monai_resnet.ResNet(
        "bottleneck", [3, 4, 6, 3], monai_resnet.get_inplanes(), spatial_dims=2, n_input_channels=3,
        conv1_t_size=7, conv1_t_stride=2, shortcut_type="B", bias_downsample=False, feed_forward=False,
    ).eval()


def medicalnet_resnet(depth: int = 10) -> torch.nn.Module:
    """MedicalNet 3D ResNet-``depth`` feature extractor (``(B, 1, D, H, W)`` -> ``(B, F)``; F = 512 for 10/18, 2048
    for 50), eval mode."""
    if depth not in MEDICALNET_DEPTHS:
        raise ValueError(f"MedicalNet ResNet depth must be one of {MEDICALNET_DEPTHS}, got {depth}")
    bias_downsample, shortcut_type = monai_resnet.get_medicalnet_pretrained_resnet_args(depth)
    factory = getattr(monai_resnet, f"resnet{depth}")
    return factory(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type=shortcut_type,
                   bias_downsample=bias_downsample, conv1_t_size=7, conv1_t_stride=2).eval()


def _state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    state = safe_load_checkpoint(path)  # raises FileNotFoundError naming a missing path
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def radimagenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RadImageNet's ``backbone.<i>.`` keys (or torchvision keys) -> torchvision names; ``fc.*`` dropped."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("backbone.")
        head, _, rest = key.partition(".")
        key = f"{RADIMAGENET_SEQUENTIAL[head]}.{rest}" if head in RADIMAGENET_SEQUENTIAL else key
        if not key.startswith("fc."):
            out[key] = value
    return out


def load_radimagenet_resnet50(path: str | Path) -> torch.nn.Module:
    """:func:`radimagenet_resnet50` with RadImageNet's PyTorch ResNet-50 weights from ``path``."""
    model = radimagenet_resnet50()
    load_weights(model, radimagenet_keys(_state_dict(path)), f"{path} (RadImageNet ResNet-50)")
    return model.eval()


def load_medicalnet_resnet(path: str | Path, depth: int | None = None) -> torch.nn.Module:
    """:func:`medicalnet_resnet` with MedicalNet weights from ``path`` (depth from the file name ``resnet_XX``
    unless given); the segmentation head ``conv_seg`` is dropped."""
    if depth is None:
        found = re.search(r"resnet_?(\d+)", Path(path).name)
        if not found:
            raise ValueError(f"cannot tell the ResNet depth from {Path(path).name!r}; pass --fid-depth-3d")
        depth = int(found.group(1))
    state = {k: v for k, v in _state_dict(path).items() if not k.startswith(("conv_seg.", "fc."))}
    model = medicalnet_resnet(depth)
    load_weights(model, state, f"{path} (MedicalNet ResNet-{depth})")
    return model.eval()


@torch.no_grad()
def slice_features(slices: np.ndarray, model: torch.nn.Module, batch_size: int = 32) -> np.ndarray:
    """``(N, H, W)`` slices in [0, 1] -> ``(N, F)`` features of a 2D ImageNet-convention network."""
    x = torch.as_tensor(np.asarray(slices, dtype=np.float32))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for start in range(0, x.shape[0], batch_size):
        chunk = repeat(x[start:start + batch_size], "n h w -> n c h w", c=3)
        out.append(model((chunk - mean) / std).flatten(1).double())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def volume_features_25d(volume: np.ndarray, model: torch.nn.Module, body=None) -> dict[str, np.ndarray]:
    """``{view: (N_view, F)}`` 2D features of the slices of a ``(D, H, W)`` volume in [0, 1] along each view that hold
    body voxels (every slice without ``body``)."""
    out = {}
    for view, axis in VIEWS.items():
        slices = np.moveaxis(np.asarray(volume), axis, 0)
        if body is not None:
            slices = slices[np.moveaxis(np.asarray(body, bool), axis, 0).any(axis=(1, 2))]
        out[view] = slice_features(slices, model)
    return out


@torch.no_grad()
def volume_features_3d(volume: np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """``(1, F)`` features of a ``(D, H, W)`` volume (z-scored over its voxels) from a 3D network."""
    v = torch.as_tensor(np.asarray(volume, dtype=np.float32))
    v = (v - v.mean()) / (v.std() if v.std() > 0 else 1.0)
    return model(rearrange(v, "d h w -> 1 1 d h w")).flatten(1).double().numpy()
