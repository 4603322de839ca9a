"""Tiny GEM-3D model dirs and a tiny demo dataset for the inference tests (no training).

``build_model_dir(folder, variant)`` writes a folder laid out like a ``main.py`` training run
(``checkpoints/last.ckpt`` with ``state_dict`` + ``hyper_parameters``, ``configs/tiny-project.yaml`` with
``data.params.preprocess``), holding a :class:`gem3d.training.ldm.Gem3dLDM` with a tiny UNet and a tiny f=2 first stage
(f=4: 32x32 slices -> 4x8x8 latents). Weights are seeded random values, so the zero-initialised output layers predict
something and the outputs depend on the seed, the mask and the informed slice.

``build_dataset(folder, cases, slices)`` writes a demo nnU-Net raw dataset (64x64x48 RAS cases, cropped to ``slices``
axial slices around the middle to keep the tests fast) and re-saves the last case on an oblique, axis-permuted,
flipped grid.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

from gem3d.training.ldm import Gem3dLDM

PREPROCESS = {"size": 32, "max_label": 3, "intensity": "minmax", "body": "nonzero", "slice_axis": 2}
FIRST_STAGE = {
    "target": "gem3d.models.autoencoder.FirstStage.from_diffusers_config",
    "params": {"block_out_channels": [32, 32, 32], "layers_per_block": 1, "latent_channels": 4, "sample_size": 32,
               "in_channels": 3, "out_channels": 3},
}
UNETS = {
    "slice_stage": dict(in_channels=12),
    "volume_stage": dict(in_channels=12, volumetric=True),
    "baseline_volume": dict(in_channels=8, volumetric=True),
    "position": dict(in_channels=4, use_spatial_transformer=True, context_dim=32),
}


def unet_config(variant: str) -> dict:
    params = dict(out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                  attention_resolutions=[2], num_head_channels=16)
    params.update(UNETS[variant])
    return {"target": "gem3d.models.unet.UNetModel", "params": params}


def randomise_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter (zero-initialised layers included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def build_model(variant: str, seed: int = 0, **model_kwargs):
    """``model_kwargs``: more Gem3dLDM arguments; ``mask_encoding="label_fractions"`` widens the UNet's input to
    ``max_label + 2`` mask channels."""
    torch.manual_seed(seed)
    unet = unet_config(variant)
    if model_kwargs.get("mask_encoding") == "label_fractions":
        unet["params"]["in_channels"] += model_kwargs["max_label"] + 2 - FIRST_STAGE["params"]["latent_channels"]
    with warnings.catch_warnings():  # "volume stage without ckpt_path": intended, the weights are random anyway
        warnings.simplefilter("ignore", UserWarning)
        model = Gem3dLDM(unet_config=unet, first_stage_config=FIRST_STAGE, variant=variant,
                         use_ema=False, sample_with_ema=False, **model_kwargs)
    randomise_(model.unet, seed + 1)
    return model.eval()


def build_model_dir(folder: str | Path, variant: str, seed: int = 0, preprocess: dict | None = None,
                    first_stage: dict | None = None, **model_kwargs) -> Path:
    """A training-run-like folder for ``variant`` (see the module docstring); ``first_stage``: a first stage's
    state dict to use (models that share an autoencoder); ``model_kwargs``: see :func:`build_model`."""
    folder = Path(folder)
    model = build_model(variant, seed, **model_kwargs)
    if first_stage is not None:
        model.first_stage.load_state_dict(first_stage)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0, "global_step": 0}
    torch.save(ckpt, folder / "checkpoints" / "last.ckpt")
    project = {
        "model": {"target": "gem3d.training.ldm.Gem3dLDM", "params": dict(model.hparams)},
        "data": {"target": "gem3d.data.module.Gem3dDataModule",
                 "params": {"dataset_dir": "unused", "preprocess": dict(preprocess or PREPROCESS)}},
    }
    (folder / "configs" / "tiny-project.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(project))))
    return folder


# ---------------------------------------------------------------------------------------------- dataset

OBLIQUE_CASE_INDEX = -1  # the last case of the dataset is re-saved on an oblique grid


def oblique_affine(affine: np.ndarray, perm: tuple[int, int, int], degrees: float = 20.0) -> np.ndarray:
    """The affine of ``np.transpose(arr, perm)`` (same world positions), then rotated by ``degrees`` about x and
    with the first new voxel axis flipped (non-RAS, oblique)."""
    out = np.eye(4)
    out[:3, :3] = affine[:3, perm]
    out[:3, 3] = affine[:3, 3]
    a = math.radians(degrees)
    rot = np.array([[1, 0, 0, 0], [0, math.cos(a), -math.sin(a), 0], [0, math.sin(a), math.cos(a), 0], [0, 0, 0, 1]])
    return rot @ out


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _crop_slices(path: Path, slices: int) -> None:
    """Keep ``slices`` axial (third-axis) slices around the middle of a RAS file (affine origin moved)."""
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj)
    start = max(0, (arr.shape[2] - slices) // 2)
    affine = img.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, start]) + affine[:3, 3]
    _save(np.ascontiguousarray(arr[:, :, start : start + slices]), affine, path)


def build_dataset(folder: str | Path, cases: int = 4, seed: int = 0, slices: int | None = 24) -> tuple[Path, str]:
    """Demo dataset of ``cases`` cases; returns (folder, name of the oblique case)."""
    from gem3d.data.demo import build_demo_dataset

    folder = build_demo_dataset(folder, cases=cases, seed=seed)
    names = sorted(p.name[: -len(".nii.gz")] for p in (folder / "labelsTr").glob("*.nii.gz"))
    if slices is not None:
        for case in names:
            _crop_slices(folder / "imagesTr" / f"{case}_0000.nii.gz", slices)
            _crop_slices(folder / "labelsTr" / f"{case}.nii.gz", slices)
    name = names[OBLIQUE_CASE_INDEX]
    perm = (2, 0, 1)
    for path in (folder / "imagesTr" / f"{name}_0000.nii.gz", folder / "labelsTr" / f"{name}.nii.gz"):
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
        new = np.ascontiguousarray(np.flip(np.transpose(arr, perm), axis=0))
        affine = oblique_affine(img.affine, perm)
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1, new.shape[0] - 1  # voxel i -> old index (n-1-i)
        _save(new, affine @ flip, path)
    return folder, name


# ---------------------------------------------------------------------------------------------- shared setup

MODEL_VARIANTS = ("volume_stage", "baseline_volume", "position")
_SETUP: dict = {}


def tiny_setup(tmp_path_factory) -> dict:
    """The dataset and the three model dirs, built once per test process (every test module's session fixture
    returns the same folders): ``{"data", "oblique", "names", "volume_stage", "baseline_volume", "position"}``."""
    if not _SETUP:
        root = tmp_path_factory.mktemp("tiny_inference")
        data, oblique = build_dataset(root / "dataset", cases=4)
        setup = {"data": data, "oblique": oblique,
                 "names": sorted(p.name[: -len(".nii.gz")] for p in (data / "labelsTr").glob("*.nii.gz"))}
        first_stage = None  # one autoencoder for all three, as a GEM-3D model family has
        for seed, variant in enumerate(MODEL_VARIANTS):
            setup[variant] = build_model_dir(root / "models" / variant, variant, seed=seed, first_stage=first_stage)
            if first_stage is None:
                first_stage = {k.removeprefix("first_stage."): v for k, v in torch.load(
                    setup[variant] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"].items()
                    if k.startswith("first_stage.")}
        _SETUP.update(setup)
    return dict(_SETUP)
