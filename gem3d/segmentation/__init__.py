"""Segmenters trained on real cases: one interface, two backends (MONAI for the CPU default, nnU-Net v2).

Label fidelity (a segmenter trained on real cases, run on synthetic volumes, Dice against the masks they were made
from) and the downstream experiment (real vs real + synthetic training data) both go through :class:`Segmenter`:

    seg = get_segmenter(SegmenterSettings(backend="monai", iterations=400, seed=0), work_dir)
    seg.train([TrainingCase(name, image, label), ...])   # resumable; a finished training is kept
    labels = seg.predict([image_path, ...], out_dir)     # label NIfTIs in each image's own geometry
    seg = trained_segmenter(settings, cases, cache_root)  # trained once in cache_root/<key>/, reused after

Files are nnU-Net raw NIfTIs (one channel); predictions keep the input image's affine and shape.
"""
from __future__ import annotations

from .base import (BACKENDS, DEFAULT_ITERATIONS, SETTINGS_FILE, Segmenter, SegmenterSettings, TrainingCase,
                   get_segmenter, prediction_name, read_settings)
from .cache import dataset_training_cases, load_trained_segmenter, trained_segmenter

__all__ = ["BACKENDS", "DEFAULT_ITERATIONS", "SETTINGS_FILE", "Segmenter", "SegmenterSettings", "TrainingCase",
           "dataset_training_cases", "get_segmenter", "load_trained_segmenter", "prediction_name", "read_settings",
           "trained_segmenter"]
