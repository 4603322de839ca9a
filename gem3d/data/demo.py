"""The demo dataset: an nnU-Net raw dataset from the MNI152 2009 template that nilearn ships (no download).

Each case: the brain-extracted template under a random smooth deformation, with its own contrast (T1-like or
inverted, T2-like), gamma, bias field, noise and scale, plus one or two tumours with BraTS labels (1 edema,
2 non-enhancing core, 3 enhancing ring). The image is 0 outside the brain (the `nonzero` body rule finds it).
64 x 64 x 48 voxels (RAS, 2.9 x 2.9 x 3.3 mm), per-case origin."""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from gem3d.data.preprocess import largest_component

DEMO_NAME = "Dataset900_GEM3DDemo"
CASE_PREFIX = "GEM3DDemo"
DEMO_LABELS = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
DEMO_SHAPE = (64, 64, 48)  # RAS voxels: x (R), y (A), z (S)
DEMO_SPACING = (2.9, 2.9, 3.3)  # mm
BRAIN_CENTRE_MM = (0.0, -17.0, 5.0)  # world centre of the MNI brain mask's bounding box


@functools.lru_cache(maxsize=1)
def load_mni_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 template (99, 117, 95) float32 in [0, 1], brain mask bool, affine) at 2 mm, from nilearn's package data."""
    try:
        from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    except ImportError as exc:  # pragma: no cover - nilearn is in the demo extra
        raise ImportError("the demo dataset needs nilearn (pip install 'gem3d[demo]')") from exc
    template = load_mni152_template(resolution=2)
    mask = load_mni152_brain_mask(resolution=2)
    t1 = np.asarray(template.get_fdata(), dtype=np.float32)
    brain = np.asarray(mask.get_fdata()) > 0.5
    arrays = (np.clip(t1, 0.0, None), brain, np.asarray(template.affine, dtype=np.float64))
    for arr in arrays:
        arr.setflags(write=False)  # cached and shared
    return arrays


def demo_affine(origin_shift_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(4, 4) RAS affine of the demo grid, centred on the brain (+ shift in mm), float32-representable."""
    spacing = np.asarray(DEMO_SPACING)
    centre = np.asarray(BRAIN_CENTRE_MM) + np.asarray(origin_shift_mm)
    origin = centre - spacing * (np.asarray(DEMO_SHAPE) - 1) / 2.0
    affine = nib.affines.from_matvec(np.diag(spacing), np.round(origin, 3))
    return affine.astype(np.float32).astype(np.float64)  # what the NIfTI header stores, exactly


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control: tuple[int, ...],
                 amplitude: float) -> np.ndarray:
    """Smooth random field: normal control points (std `amplitude`) upsampled by cubic spline to `shape`."""
    ctrl = rng.normal(0.0, amplitude, size=control)
    zoom = [s / c for s, c in zip(shape, control)]
    field = ndimage.zoom(ctrl, zoom, order=3, mode="nearest", grid_mode=True)
    return field[tuple(slice(0, s) for s in shape)].astype(np.float32)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def warp_template(rng: np.random.Generator, affine: np.ndarray, deformation_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample the MNI template and mask onto the demo grid through a random similarity + smooth displacement (mm)."""
    t1, brain, template_affine = load_mni_template()
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in DEMO_SHAPE], indexing="ij"), axis=-1)
    world = grid @ affine[:3, :3].T + affine[:3, 3]
    centre = np.asarray(BRAIN_CENTRE_MM)
    linear = _rotation(rng, 6.0) * rng.uniform(0.92, 1.08)
    moved = (world - centre) @ linear.T + centre
    for axis in range(3):
        moved[..., axis] += smooth_field(rng, DEMO_SHAPE, (5, 5, 4), deformation_mm)
    vox = (moved - template_affine[:3, 3]) @ np.linalg.inv(template_affine[:3, :3]).T
    coords = np.moveaxis(vox, -1, 0)
    image = ndimage.map_coordinates(t1, coords, order=1, mode="constant", cval=0.0)
    mask = ndimage.map_coordinates(brain.astype(np.float32), coords, order=1, mode="constant", cval=0.0) > 0.5
    mask = ndimage.binary_fill_holes(mask)
    mask = largest_component(mask)
    return image.astype(np.float32) * mask, mask


def place_tumours(rng: np.random.Generator, brain: np.ndarray, count: int) -> tuple[np.ndarray, list[dict]]:
    """Label volume (DEMO_SHAPE, uint8) with `count` tumours inside `brain`: edema radius >= 8.5 voxels in-plane,
    enhancing ring at 0.62 and non-enhancing core at 0.38 of it, irregular (smoothly perturbed) ellipsoids."""
    spacing = np.asarray(DEMO_SPACING)
    label = np.zeros(DEMO_SHAPE, dtype=np.uint8)
    depth_mm = ndimage.distance_transform_edt(brain, sampling=spacing)
    grid_mm = np.stack(np.meshgrid(*[np.arange(s) * sp for s, sp in zip(DEMO_SHAPE, spacing)], indexing="ij"), -1)
    info = []
    for k in range(count):
        radius_vox = rng.uniform(10.0, 13.0) if k == 0 else rng.uniform(9.0, 11.0)
        radius_mm = radius_vox * spacing[0]
        candidates = np.argwhere((depth_mm > 0.55 * radius_mm) & (label == 0))
        if len(candidates) == 0:
            candidates = np.argwhere(depth_mm >= 0.5 * depth_mm.max())
        centre = candidates[rng.integers(len(candidates))]
        axes = radius_mm * rng.uniform(0.85, 1.15, size=3)
        rot = _rotation(rng, 30.0)
        rel = (grid_mm - centre * spacing) @ rot
        dist = np.sqrt(((rel / axes) ** 2).sum(-1))
        dist = dist * (1.0 + smooth_field(rng, DEMO_SHAPE, (6, 6, 5), 0.12))
        inside = brain & (dist < 1.0)
        label[inside & (label == 0)] = 1
        label[brain & (dist < 0.62)] = 3
        label[brain & (dist < 0.38)] = 2
        info.append({"centre_vox": centre.tolist(), "radius_vox": round(float(radius_vox), 2),
                     "axes_mm": np.round(axes, 2).tolist()})
    return label, info


def render_intensities(rng: np.random.Generator, anatomy: np.ndarray, brain: np.ndarray, label: np.ndarray,
                       params: dict) -> np.ndarray:
    """Tissue (template) -> case contrast, tumour appearance, gamma, bias field, Rician noise, scale; 0 outside."""
    ref = float(np.percentile(anatomy[brain], 99)) or 1.0
    x = np.clip(anatomy / ref, 0.0, 1.2)
    if params["contrast"] == "t2":
        x = np.where(brain, 1.15 - x, 0.0)
    mean = float(x[brain].mean())
    x = mean + params["contrast_gain"] * (x - mean)
    # tumour: bright edema, very bright enhancing ring, dark core; blended with soft edges, tissue texture kept
    levels = {1: rng.uniform(1.05, 1.2), 3: rng.uniform(1.45, 1.65), 2: rng.uniform(0.02, 0.1)}
    keep = {1: 0.3, 3: 0.15, 2: 0.1}
    for value in (1, 3, 2):
        weight = ndimage.gaussian_filter((label == value).astype(np.float32), 0.6) * brain
        x = x * (1 - weight) + weight * (keep[value] * x + (1 - keep[value]) * levels[value])
    x = np.clip(x, 0.0, None) ** params["gamma"]
    bias = np.exp(smooth_field(rng, DEMO_SHAPE, (3, 3, 3), params["bias_strength"]))
    x = x * bias
    sigma = params["noise_sigma"]
    x = np.sqrt((x + rng.normal(0, sigma, x.shape)) ** 2 + rng.normal(0, sigma, x.shape) ** 2)
    x = np.where(brain, np.maximum(x, 1e-3), 0.0) * params["intensity_scale"]
    return x.astype(np.float32)


def draw_case_params(index: int, seed: int) -> dict:
    """The per-case appearance draws (cheap; from their own random stream)."""
    rng = np.random.default_rng([seed, index, 0])
    return {
        "contrast": "t2" if rng.random() < 0.35 else "t1",
        "gamma": float(np.exp(rng.uniform(np.log(0.6), np.log(1.7)))),
        "contrast_gain": float(rng.uniform(0.7, 1.3)),
        "bias_strength": float(rng.uniform(0.0, 0.35)),
        "noise_sigma": float(np.exp(rng.uniform(np.log(0.005), np.log(0.07)))),
        "intensity_scale": float(np.round(rng.uniform(100.0, 2000.0), 1)),
        "origin_shift_mm": np.round(rng.uniform(-4.0, 4.0, size=3), 2).tolist(),
        "deformation_mm": float(np.round(rng.uniform(2.0, 5.0), 3)),
        "num_tumours": int(rng.integers(1, 3)),
    }


def make_demo_case(index: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One case -> (image (64, 64, 48) float32, label uint8, affine (4, 4), its record: name, draws, tumours)."""
    params = draw_case_params(index, seed)
    rng = np.random.default_rng([seed, index, 1])
    affine = demo_affine(params["origin_shift_mm"])
    anatomy, brain = warp_template(rng, affine, params["deformation_mm"])
    label, tumours = place_tumours(rng, brain, count=params.pop("num_tumours"))
    image = render_intensities(rng, anatomy, brain, label, params)
    record = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in params.items()}
    return image, label, affine, {"name": f"{CASE_PREFIX}_{index:03d}", **record, "tumours": tumours}


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


DEMO_CASES = 16
DEMO_SPLIT = {"val": 2, "test": 6}  # tuning cases (val) apart from the reported ones (test); the rest train


def split_counts(cases: int) -> tuple[int, int]:
    """``(val, test)`` case counts for a demo of ``cases`` cases: :data:`DEMO_SPLIT` scaled down (one each at least)
    so that two cases stay for training."""
    val = max(1, round(cases * DEMO_SPLIT["val"] / DEMO_CASES))
    test = max(1, min(round(cases * DEMO_SPLIT["test"] / DEMO_CASES), cases - val - 2))
    return val, test


def demo_splits(names: list[str], seed: int = 0, val: int = 2, test: int = 6) -> dict[str, list[str]]:
    """``{train, val, test}``: ``val`` tuning and ``test`` reporting cases drawn from ``names`` (seeded), the rest
    for training (at least one)."""
    if val < 0 or test < 0 or val + test > len(names) - 1:
        raise ValueError(f"need 0 <= val, test and val + test <= cases - 1 = {len(names) - 1}; got val={val}, "
                         f"test={test}")
    names = sorted(names)
    order = [names[i] for i in np.random.default_rng([seed, 0x5B1]).permutation(len(names))]
    return {"train": sorted(order[val + test:]), "val": sorted(order[:val]), "test": sorted(order[val:val + test])}


def build_demo_dataset(out: str | Path, cases: int = DEMO_CASES, seed: int = 0, overwrite: bool = False,
                       progress: bool = False, val: int | None = None, test: int | None = None) -> Path:
    """Write the demo nnU-Net raw dataset into the folder `out` (dataset.json, imagesTr, labelsTr, gem3d_demo.json)
    and splits.json with ``val`` tuning and ``test`` reporting cases (default :data:`DEMO_SPLIT` from
    :data:`DEMO_CASES` cases on; smaller datasets get no splits.json unless ``val``/``test`` are given, and training
    splits them)."""
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite and not (out / "gem3d_demo.json").is_file():
            raise FileExistsError(f"{out} exists and is not a gem3d demo dataset; choose an empty folder")
        for sub in ("imagesTr", "labelsTr", ".gem3d_cache"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "splits.json").unlink(missing_ok=True)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(cases), desc="demo cases", disable=not progress):
        image, label, affine, record = make_demo_case(index, seed)
        _save(image, affine, out / "imagesTr" / f"{record['name']}_0000.nii.gz")
        _save(label, affine, out / "labelsTr" / f"{record['name']}.nii.gz")
        records.append(record)
    dataset_json = {
        "name": DEMO_NAME,
        "description": "gem3d demo: deformed MNI152 2009 template (nilearn) with synthetic BraTS-like tumours",
        "reference": "MNI ICBM152 non-linear 2009 template, shipped with nilearn",
        "channel_names": {"0": "FLAIR"},
        "labels": dict(DEMO_LABELS),
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    (out / "gem3d_demo.json").write_text(json.dumps({"seed": seed, "cases": records}, indent=1))
    if val is not None or test is not None or cases >= DEMO_CASES:
        val = DEMO_SPLIT["val"] if val is None else val
        test = DEMO_SPLIT["test"] if test is None else test
        splits = demo_splits([r["name"] for r in records], seed, val=val, test=test)
        (out / "splits.json").write_text(json.dumps({**splits, "seed": seed}, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    """``scripts/make_demo_dataset.py OUT [--cases 16] [--val 2] [--test 6] [--seed 0] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="make_demo_dataset.py",
                                     description="Write the gem3d demo dataset (nnU-Net raw layout, from nilearn's "
                                                 "MNI152 template) into OUT.")
    parser.add_argument("out", type=Path, help="dataset folder to write (it becomes the nnU-Net dataset folder)")
    parser.add_argument("--cases", type=int, default=DEMO_CASES)
    parser.add_argument("--val", type=int, help=f"tuning cases (splits.json val; default {DEMO_SPLIT['val']})")
    parser.add_argument("--test", type=int, help=f"reported cases (splits.json test; default {DEMO_SPLIT['test']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a folder that is not a gem3d demo")
    args = parser.parse_args(argv)
    t0 = time.time()
    out = build_demo_dataset(args.out, cases=args.cases, seed=args.seed, overwrite=args.overwrite, progress=True,
                             val=args.val, test=args.test)
    print(f"wrote {args.cases} demo cases to {out} in {time.time() - t0:.1f} s")
    return 0
