"""Preprocessing as config (docs/method.md §2): body region, intensity normalisation to [-1, 1], in-plane resizing and
the grey mask encoding of labels (`-1` outside the body). Every step has an inverse back onto the source grid."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy import ndimage

from .case import Case
from .geometry import SLICE_AXES, Geometry

INTENSITY_MODES = ("minmax", "percentile", "window")
BODY_MODES = ("nonzero", "threshold", "none")
INFORMED_LABELS = ("shown", "hidden")
RESIZE_MODES = {"bilinear": "bilinear", "nearest": "nearest-exact"}  # torch's names; bilinear: align_corners False


@dataclass
class PreprocessConfig:
    """size: in-plane side S in pixels (None keeps the canonical H, W); slice_axis: RAS axis of the slices;
    intensity: "minmax" (per volume, the paper) | "percentile" (clip to body percentiles) | "window" (CT, HU);
    max_label: labels 0..max_label become grey levels; body: "nonzero" (MRI) | "threshold" (CT) | "none";
    informed_labels: "shown" (the informed slice as it is, the paper) | "hidden" (its labelled structures filled with
    its body tissue's mean, in training and inference: see :func:`hide_labels`)."""

    size: int | None = 512
    slice_axis: int = 2
    intensity: str = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] = (-200.0, 300.0)
    max_label: int = 3
    body: str = "nonzero"
    body_threshold: float = -500.0
    body_fill_holes: bool = True
    body_largest_component: bool = True
    informed_labels: str = "shown"

    def __post_init__(self) -> None:
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer))
                                      or self.size < 1):
            raise ValueError(f"size must be a positive int (pixels) or None, got {self.size!r}")
        if self.slice_axis not in SLICE_AXES:
            raise ValueError(f"slice_axis must be one of {SLICE_AXES} (2 = axial), got {self.slice_axis!r}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.body not in BODY_MODES:
            raise ValueError(f"body must be one of {BODY_MODES}, got {self.body!r}")
        self.percentiles = tuple(float(p) for p in self.percentiles)
        lo, hi = self.percentiles if len(self.percentiles) == 2 else (None, None)
        if lo is None or not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must be (lo, hi) with 0 <= lo < hi <= 100, got {self.percentiles}")
        self.window = tuple(float(w) for w in self.window)
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError(f"window must be (lo, hi) with lo < hi, got {self.window}")
        if isinstance(self.max_label, bool) or not isinstance(self.max_label, (int, np.integer)) or self.max_label < 1:
            raise ValueError(f"max_label must be an int >= 1, got {self.max_label!r}")
        self.body_threshold = float(self.body_threshold)
        if self.informed_labels not in INFORMED_LABELS:
            raise ValueError(f"informed_labels must be one of {INFORMED_LABELS}, got {self.informed_labels!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "PreprocessConfig":
        d = dict(d or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown preprocess keys {unknown}; allowed keys are {allowed}")
        return cls(**d)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (the mask itself when it has at most one)."""
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def compute_body_mask(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(D, H, W) raw intensities -> (D, H, W) bool body region. nonzero: voxels != 0 (brain-extracted MRI);
    threshold: voxels > body_threshold (CT, HU), largest component; both optionally hole-filled; none: everything."""
    image = np.asarray(image)
    if cfg.body == "none":
        return np.ones(image.shape, dtype=bool)
    if cfg.body == "nonzero":
        mask = image != 0
    else:
        mask = image > cfg.body_threshold
        if cfg.body_largest_component:
            mask = largest_component(mask)
    if cfg.body_fill_holes and mask.any():  # in 3-D, then per slice (a cavity open at the volume's ends)
        mask = np.stack([ndimage.binary_fill_holes(s) for s in ndimage.binary_fill_holes(mask)])
    return mask.astype(bool)


def normalise_intensity(
    image: np.ndarray, cfg: PreprocessConfig, body: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """(D, H, W) raw -> (x in [-1, 1] float32, stats). minmax: the volume's min/max; percentile: `cfg.percentiles`
    of the body voxels, clipped; window: `cfg.window`, clipped. `denormalise_intensity(x, stats)` inverts it."""
    image = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError(f"image holds {int((~np.isfinite(image)).sum())} non-finite values")
    if cfg.intensity == "minmax":
        lo, hi = float(image.min()), float(image.max())
    elif cfg.intensity == "percentile":
        voxels = image[body] if body is not None and np.any(body) else image
        lo, hi = (float(v) for v in np.percentile(voxels, cfg.percentiles))
    else:
        lo, hi = cfg.window
    if hi <= lo:  # a window always has lo < hi (PreprocessConfig)
        where = " in the body" if cfg.intensity == "percentile" else ""
        raise ValueError(f"image intensities are constant ({lo:g} everywhere{where}): nothing to normalise with "
                         f"intensity={cfg.intensity!r}; check the image file")
    x = (np.clip(image, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    return x.astype(np.float32), {"mode": cfg.intensity, "lo": lo, "hi": hi}


def denormalise_intensity(x: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """x in [-1, 1] -> raw intensities, the inverse of `normalise_intensity` (exact inside [lo, hi])."""
    lo, hi = float(stats["lo"]), float(stats["hi"])
    scale = hi - lo if hi > lo else 1.0
    return ((np.asarray(x, dtype=np.float64) + 1.0) / 2.0 * scale + lo).astype(np.float32)


def label_to_grey(label: np.ndarray, max_label: int) -> np.ndarray:
    """int labels (-1 outside the body, 0..max_label) -> float32 grey: -1 -> -1 - 2/max_label, k -> 2k/max_label - 1."""
    label = np.asarray(label)
    if label.size and (label.min() < -1 or label.max() > max_label):
        raise ValueError(f"label values must lie in [-1, {max_label}], got range [{label.min()}, {label.max()}]")
    return (2.0 * label.astype(np.float32) / max_label - 1.0).astype(np.float32)


def grey_to_label(grey: np.ndarray, max_label: int) -> np.ndarray:
    """float grey -> int16 label of the nearest level in {-1, 0, .., max_label}."""
    k = np.rint((np.asarray(grey, dtype=np.float64) + 1.0) * max_label / 2.0)
    return np.clip(k, -1, max_label).astype(np.int16)


def hide_labels(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Slices ``(..., S, S)`` in [-1, 1] and their labels -> copies whose labelled voxels (> 0) hold the mean of
    the same slice's unlabelled body (label 0; the labelled voxels' own mean where a slice has none). An informed slice
    so hidden tells the model the patient's contrast and anatomy but not how a structure looks where it cuts one, so
    each structure's look must come from the mask (without it the model copies the cut structure's look onto every
    label of the mask)."""
    image, label = np.asarray(image, dtype=np.float32), np.asarray(label)
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} differs from the label's {label.shape}")
    labelled, tissue = label > 0, label == 0
    fill_from = np.where(tissue.any(axis=(-2, -1), keepdims=True), tissue, labelled)
    count = np.maximum(fill_from.sum(axis=(-2, -1), keepdims=True), 1)
    fill = np.where(fill_from, image, 0.0).sum(axis=(-2, -1), keepdims=True) / count
    return np.where(labelled, fill, image).astype(np.float32)


def informed_image(image: np.ndarray, label: np.ndarray | None, cfg: PreprocessConfig) -> np.ndarray:
    """What the model sees of informed slices ``(..., S, S)``: as they are, or :func:`hide_labels` when
    ``cfg.informed_labels`` is ``hidden`` (which needs their labels)."""
    if cfg.informed_labels == "shown":
        return np.asarray(image, dtype=np.float32)
    if label is None:
        raise ValueError("informed_labels='hidden' needs the informed slice's labels; this slice has none")
    return hide_labels(image, label)


def contrast_variant(image: np.ndarray, body: np.ndarray, invert: bool = False, gamma: float = 1.0) -> np.ndarray:
    """(D, S, S) image in [-1, 1] -> the same anatomy in another contrast, for training: inside ``body`` the
    intensities u = (x + 1) / 2 are inverted within the body's range (``invert``), then raised to ``gamma``; -1
    outside. With the informed slice taken from the same variant, a model must read the contrast from it."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    body = np.asarray(body, dtype=bool)
    u = (np.asarray(image, dtype=np.float32) + 1.0) / 2.0
    if invert and body.any():
        u = np.where(body, u[body].min() + u[body].max() - u, u)
    u = np.where(body, np.clip(u, 0.0, 1.0) ** np.float32(gamma), 0.0)
    return (u * 2.0 - 1.0).astype(np.float32)


def resize_slices(vol: np.ndarray, size: int | tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """(D, H, W) -> (D, S, S) (or (D, *size)) per slice with torch interpolate (align_corners=False).
    mode "nearest" keeps the input dtype (labels; nearest-exact pixel centres); "bilinear" returns float32."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {tuple(RESIZE_MODES)}, got {mode!r}")
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"vol must be (D, H, W), got shape {vol.shape}")
    out_hw = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    if tuple(vol.shape[1:]) == out_hw:
        return vol.astype(np.float32) if mode == "bilinear" else vol.copy()
    x = rearrange(torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)), "d h w -> d 1 h w")
    y = rearrange(F.interpolate(x, size=out_hw, mode=RESIZE_MODES[mode]), "d 1 h w -> d h w").numpy()
    return y if mode == "bilinear" else y.astype(vol.dtype)


@dataclass
class PreparedCase:
    """name; image (D, S, S) float32 in [-1, 1]; label (D, S, S) int16 with -1 outside the body (or None);
    stats (intensity normalisation); geometry (source file); canonical_hw (H, W) before resizing; max_label."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    stats: dict[str, Any]
    geometry: Geometry
    canonical_hw: tuple[int, int]
    max_label: int

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])

    def grey_mask(self) -> np.ndarray:
        """(D, S, S) float32 grey mask (see `label_to_grey`)."""
        if self.label is None:
            raise ValueError(f"case {self.name!r} has no label, so no grey mask")
        return label_to_grey(np.asarray(self.label), self.max_label)


def prepare_case(case: Case, cfg: PreprocessConfig) -> PreparedCase:
    """Case -> PreparedCase: body region (seg -1 when the case has it, else `compute_body_mask`; labelled voxels
    always count), intensities to [-1, 1], in-plane resize to cfg.size (images bilinear, labels nearest)."""
    image = np.asarray(case.image, dtype=np.float32)
    label = None if case.label is None else np.asarray(case.label)
    if label is None:
        body = compute_body_mask(image, cfg)
    else:
        if label.shape != image.shape:
            raise ValueError(f"case {case.name!r}: label shape {label.shape} != image shape {image.shape}")
        if label.max(initial=0) > cfg.max_label or label.min(initial=0) < -1:
            raise ValueError(f"case {case.name!r}: label values {sorted(np.unique(label).tolist())} exceed the "
                             f"allowed [-1, max_label={cfg.max_label}]; set preprocess.max_label")
        body = (label >= 0) if (label < 0).any() else compute_body_mask(image, cfg)
        body |= label > 0
    try:
        x, stats = normalise_intensity(image, cfg, body)
    except ValueError as exc:
        raise ValueError(f"case {case.name!r} ({case.image_path or 'in memory'}): {exc}") from None
    stats["body_fraction"] = float(body.mean())
    label_out = None if label is None else np.where(body, label, -1).astype(np.int16)
    canonical_hw = (int(image.shape[1]), int(image.shape[2]))
    if cfg.size is not None:
        x = np.clip(resize_slices(x, cfg.size, "bilinear"), -1.0, 1.0)
        if label_out is not None:
            label_out = resize_slices(label_out, cfg.size, "nearest")
    return PreparedCase(name=case.name, image=np.ascontiguousarray(x, dtype=np.float32), label=label_out,
                        stats=stats, geometry=case.geometry, canonical_hw=canonical_hw, max_label=cfg.max_label)


def restore_volume(x: np.ndarray, prepared: PreparedCase) -> np.ndarray:
    """(D, S, S) in [-1, 1] -> source-grid float32 raw intensities (bilinear back to canonical H, W; clamped)."""
    x = np.clip(resize_slices(x, prepared.canonical_hw, "bilinear"), -1.0, 1.0)
    return prepared.geometry.to_source(denormalise_intensity(x, prepared.stats))
