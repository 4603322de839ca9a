"""Segmenters trained on real cases: one interface, two backends (MONAI for the CPU default, nnU-Net v2).

Label fidelity (a segmenter trained on real cases, run on synthetic volumes, Dice against the masks they were made
from) and the downstream experiment (real vs real + synthetic training data) both go through :class:`Segmenter`:

    seg = get_segmenter(SegmenterSettings(backend="monai", iterations=400, seed=0), work_dir)
    seg.train([TrainingCase(name, image, label), ...])   # resumable; a finished training is kept
    labels = seg.predict([image_path, ...], out_dir)     # label NIfTIs in each image's own geometry

Files are nnU-Net raw NIfTIs (one channel); predictions keep the input image's affine and shape.
"""
from __future__ import annotations

from .base import BACKENDS, Segmenter, SegmenterSettings, TrainingCase, get_segmenter

__all__ = ["BACKENDS", "Segmenter", "SegmenterSettings", "TrainingCase", "get_segmenter"]
