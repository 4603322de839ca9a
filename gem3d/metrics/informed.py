"""Generated informed slices (settings ``ig`` / ``igma``) against real slices at the same position.

The engine draws the informed slice with the position-conditioned slice model at slice ``target_index`` of the
volume (manifest ``informed``: ``source: generated``, ``position``, ``target_index``), and the volume model starts
there, conditioned on it. The slice image itself is not written, so it is measured where it ends up: the volume's
plane ``target_index`` (canonical ``(D, H, W)``, axial slices first).

- Intensities: the 1-D Wasserstein distance (scipy) of the plane's body voxels to the real slices of the other
  cases at the same relative position, and the same distance from the real slice of the sample's own case: the
  real-vs-real yardstick. A real slice scores the yardstick exactly.
- The segmenter: Dice at the plane, on the generated volume against its mask, and on the real volume against its
  label (the yardstick).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import wasserstein_distance

from .labels import dice_per_label, mean_dice


def informed_plane(record: Mapping) -> int | None:
    """The volume's slice index that stands for a generated informed slice (``informed.target_index`` of a manifest
    record), None for any other informed slice."""
    informed = record.get("informed") or {}
    if informed.get("source") != "generated" or informed.get("target_index") is None:
        return None
    return int(informed["target_index"])


def relative_index(plane: int, num_slices: int, other_slices: int) -> int:
    """The slice of a volume of ``other_slices`` at the relative position of ``plane`` in ``num_slices`` (the
    engine's rule: ``min(int(position * n), n - 1)``)."""
    return min(int(plane / num_slices * other_slices), other_slices - 1)


def plane_voxels(image: np.ndarray, body: np.ndarray, plane: int) -> np.ndarray:
    """The intensities of slice ``plane`` of ``image`` ``(D, H, W)`` inside ``body`` (all of the slice when the body
    misses it)."""
    values, inside = np.asarray(image)[plane], np.asarray(body, bool)[plane]
    return values[inside] if inside.any() else values.ravel()


def slice_distances(image: np.ndarray, body: np.ndarray, plane: int, own: tuple[np.ndarray, np.ndarray],
                    others: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """``{"informed_w1", "informed_w1_real"}``: the mean 1-D Wasserstein distance from the body voxels of
    ``image[plane]`` (and from ``own``'s real slice there: the yardstick) to the slices of ``others`` (``(image,
    body)`` of the other real cases, on the same intensity scale) at the same relative position; NaN without
    others."""
    if not others:
        return {"informed_w1": math.nan, "informed_w1_real": math.nan}
    num_slices = np.asarray(image).shape[0]
    generated, real = plane_voxels(image, body, plane), plane_voxels(own[0], own[1], plane)
    references = [plane_voxels(o_image, o_body, relative_index(plane, num_slices, np.asarray(o_image).shape[0]))
                  for o_image, o_body in others]
    return {"informed_w1": float(np.mean([wasserstein_distance(generated, r) for r in references])),
            "informed_w1_real": float(np.mean([wasserstein_distance(real, r) for r in references]))}


def plane_dice(prediction: np.ndarray, mask: np.ndarray, plane: int, num_labels: int) -> float:
    """The mean Dice over the labels ``mask[plane]`` holds of ``prediction[plane]`` (both ``(D, H, W)`` int);
    NaN when the plane holds no label."""
    return mean_dice(dice_per_label(np.asarray(prediction)[plane][None], np.asarray(mask)[plane][None], num_labels))
