"""Test doubles of the segmenter interface and blob datasets with known labels.

``ThresholdSegmenter`` labels by intensity against the median of the nonzero voxels: brighter than ``bright`` x the
median -> 1, nonzero and darker than ``dark`` x the median -> 2. On :func:`blob_case` volumes (tissue 100, a bright
sphere 200 = label 1, a dark sphere 30 = label 2) it is exactly right, so Dice against the true labels is 1."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from gem3d.export.nifti import save_nifti
from gem3d.segmentation import Segmenter, TrainingCase, prediction_name

AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [1.25, 0.0, 0.0, -4.0], [0.0, 0.0, 2.0, 3.5], [0, 0, 0, 1]])
TRAINED = "trained.json"


class ThresholdSegmenter(Segmenter):
    """Trains nothing but counts its trainings in ``trained.json``; predicts by thresholds (see the module)."""

    def is_trained(self) -> bool:
        return (self.work_dir / TRAINED).is_file()

    def train(self, cases: Sequence[TrainingCase], progress: bool = True) -> None:
        if self.is_trained():
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / TRAINED).write_text(json.dumps({"cases": [c.name for c in cases]}))

    def predict(self, images: Sequence[Path], out_dir: str | Path, progress: bool = True) -> list[Path]:
        bright, dark = self.settings.options.get("bright", 1.5), self.settings.options.get("dark", 0.5)
        written = []
        for path in images:
            image = nib.load(str(path))
            data = np.asarray(image.dataobj, np.float32)
            median = np.median(data[data != 0])
            labels = np.where(data > bright * median, 1, np.where((data != 0) & (data < dark * median), 2, 0))
            written.append(save_nifti(labels.astype(np.int16), image.affine, Path(out_dir) / prediction_name(path)))
        return written


def blob_case(seed: int, shape=(24, 24, 20), swap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(image, label)`` on the source grid: an ellipsoid body of tissue (100 +- 3), a bright sphere (200, label 1)
    and a dark sphere (30, label 2) at random places, zero outside. ``swap``: the image draws each sphere at the other
    one's place (the label stays): a volume whose labels were moved."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    centre = np.array(shape) / 2
    body = sum(((g - c) / (0.45 * s)) ** 2 for g, c, s in zip(grid, centre, shape)) < 1
    offsets = rng.uniform(2.5, 4.0, 3) * rng.choice([-1, 1], 3)
    spheres = [centre + offsets, centre - offsets]  # on opposite sides of the centre: they never overlap
    radius = 3.5
    inside = [sum((g - c) ** 2 for g, c in zip(grid, at)) < radius ** 2 for at in spheres]
    label = np.zeros(shape, np.int16)
    label[inside[0]], label[inside[1]] = 1, 2
    drawn = (inside[1], inside[0]) if swap else (inside[0], inside[1])
    image = np.where(body | (label > 0), 100 + rng.normal(0, 3, shape), 0.0)
    image[drawn[0]], image[drawn[1]] = 200 + rng.normal(0, 3, int(drawn[0].sum())), 30.0
    return image.astype(np.float32), label


def blob_dataset(root: Path, n: int = 4, labels=None, regions_class_order=None) -> Path:
    """An nnU-Net raw dataset of ``n`` blob cases ``case_000``.. (``imagesTr``, ``labelsTr``, dataset.json)."""
    for i in range(n):
        image, label = blob_case(i)
        save_nifti(image, AFFINE, root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        save_nifti(label, AFFINE, root / "labelsTr" / f"case_{i:03d}.nii.gz")
    meta = {"channel_names": {"0": "MRI"}, "labels": labels or {"background": 0, "bright blob": 1, "dark blob": 2},
            "numTraining": n, "file_ending": ".nii.gz"}
    if regions_class_order is not None:
        meta["regions_class_order"] = regions_class_order
    (root / "dataset.json").write_text(json.dumps(meta))
    return root
