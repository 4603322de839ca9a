"""Seeded, composable edits of canonical label volumes (the ``icma`` / ``igma`` masks, healthy counterfactuals).

Every edit has the signature ``edit(label, body, rng, **params) -> (new_label, info)``:

- ``label``: ``(D, H, W)`` integer labels in canonical layout, 0 = background, 1..max_label = structures.
  ``-1`` (nnU-Net's "outside the body" marker) is allowed and kept where it is.
- ``body``: ``(D, H, W)`` bool, the body / head region; ``None`` means ``label >= 0``.
- ``rng``: ``np.random.Generator`` or an int seed. The same seed gives the same result.
- ``info``: a JSON-able dict for the run manifest (``{"edit": name, ...parameters drawn}``).

"Lesion" labels are the labels an edit moves or removes: ``lesion_labels=None`` means every label > 0.
Geometric edits move the lesion labels as one object (nearest neighbour, in voxel units), fill the voxels
it leaves with ``fill_label`` (0) and overwrite what is under it. Every edit ends with ``enforce_invariants``:
same shape, the region outside ``body`` restored exactly, only label values that were present (or mapped to).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

Rng = np.random.Generator | int
Edited = tuple[np.ndarray, dict[str, Any]]  # (new label, info)
EditFn = Callable[..., Edited]


def left_right_axis(slice_axis: int = 2) -> int:
    """Index of the left-right (R) axis in the canonical ``(D, H, W)`` layout: RAS axes with ``slice_axis``
    moved to the front, so R is axis 0 for sagittal slices and axis 1 otherwise (axial: ``(S, R, A)``)."""
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be one of (0, 1, 2), got {slice_axis!r}")
    return 0 if slice_axis == 0 else 1


LEFT_RIGHT_AXIS = left_right_axis(2)


def as_rng(rng: Rng | None) -> np.random.Generator:
    """``np.random.Generator`` from a Generator or an int seed (``None`` is refused: edits must be seeded)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {rng!r}")


def _check_inputs(label: np.ndarray, body: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be a (D, H, W) volume, got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        if label.size and not np.array_equal(label, np.round(label)):
            raise ValueError(f"label must hold integer values, got dtype {label.dtype} with fractional values")
    if label.size and label.min() < -1:
        raise ValueError(f"label values must be >= -1 (-1 = outside the body), got minimum {label.min()}")
    body = label >= 0 if body is None else np.asarray(body)
    if body.shape != label.shape:
        raise ValueError(f"body shape {body.shape} does not match label shape {label.shape}")
    return label.astype(np.int16, copy=False), body.astype(bool, copy=False)


def _lesion_set(label: np.ndarray, lesion_labels: Iterable[int] | None) -> list[int]:
    if lesion_labels is None:
        return [int(v) for v in np.unique(label) if v > 0]
    values = sorted({int(v) for v in lesion_labels})
    bad = [v for v in values if v <= 0]
    if bad:
        raise ValueError(f"lesion_labels must be > 0 (0 is background, -1 outside the body), got {bad}")
    return values


def lesion_mask(label: np.ndarray, lesion_labels: Iterable[int] | None = None) -> np.ndarray:
    """Bool ``(D, H, W)``: voxels whose label is a lesion label (default: any label > 0)."""
    return np.isin(label, _lesion_set(label, lesion_labels))


def enforce_invariants(new: np.ndarray, old: np.ndarray, body: np.ndarray,
                       allowed: Iterable[int] | None = None) -> np.ndarray:
    """``new`` as int16 with the region outside ``body`` restored from ``old`` (``-1`` stays, labels > 0 become 0).
    ``allowed``: the label values that may appear (default: those of ``old``; 0 always). A ``RuntimeError`` for a
    changed shape or another label is a bug in the edit, not in the input."""
    new = np.array(new, dtype=np.int16)
    if new.shape != old.shape:
        raise RuntimeError(f"edit changed the volume shape from {old.shape} to {new.shape}")
    outside = ~body
    new[outside] = np.where(old[outside] < 0, old[outside], 0)
    allowed_set = set(int(v) for v in (np.unique(old) if allowed is None else allowed)) | {0}
    if np.any(old[outside] < 0):
        allowed_set.add(-1)
    present = set(int(v) for v in np.unique(new))
    if not present <= allowed_set:
        extra = sorted(present - allowed_set)
        raise RuntimeError(f"edit produced label values {extra} outside the allowed set {sorted(allowed_set)}")
    return new


def _info(name: str, **params: Any) -> dict[str, Any]:
    """``{"edit": name, **params}`` made JSON-able: numpy values as lists and numbers, floats rounded to 6 digits."""
    plain = json.loads(json.dumps(params, default=lambda v: v.tolist()), parse_float=lambda s: round(float(s), 6))
    return {"edit": name, **plain}


def _move_lesion(name: str, label: np.ndarray, body: np.ndarray, lesion_labels: Iterable[int] | None, fill_label: int,
                 drawn: dict[str, Any], transform: Callable[[np.ndarray, np.ndarray], Edited]) -> Edited:
    """The geometric edits' common part: cut the lesion labels out of ``label`` (leaving ``fill_label``), move them
    with ``transform(lesion, mask) -> (moved lesion, info)`` and paste them back on top. ``drawn``: the parameters
    drawn, for the info. Without lesion voxels ``label`` is kept and the info says ``skipped``."""
    mask = lesion_mask(label, lesion_labels)
    if not mask.any():
        return enforce_invariants(label, label, body), _info(name, **drawn, skipped="no lesion")
    moved, info = transform(np.where(mask, label, 0), mask)
    new = np.where(moved > 0, moved, np.where(mask, fill_label, label))
    new = enforce_invariants(new, label, body, allowed=[*np.unique(label), fill_label])
    return new, _info(name, **(drawn | info))


def _centre_of_mass(mask: np.ndarray) -> np.ndarray:
    return np.asarray(ndimage.center_of_mass(mask.astype(np.float64)), dtype=np.float64)


def _transform_about_centre(lesion: np.ndarray, mask: np.ndarray, matrix: np.ndarray) -> Edited:
    """Resample ``lesion`` (nearest) under ``x_out = matrix @ (x_in - c) + c``, ``c`` the mask's centre of mass."""
    centre = _centre_of_mass(mask)
    inverse = np.linalg.inv(matrix)
    offset = centre - inverse @ centre
    moved = ndimage.affine_transform(lesion, inverse, offset=offset, order=0, mode="constant", cval=0, output=np.int16)
    return moved, {"about_voxel": centre}


def _rotation_matrix(degrees: Sequence[float]) -> np.ndarray:
    """3x3 rotation: ``degrees[k]`` about array axis k (i.e. in the plane of the other two axes)."""
    matrix = np.eye(3)
    for axis, angle in enumerate(degrees):
        a, b = [i for i in range(3) if i != axis]
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        plane = np.eye(3)
        plane[a, a], plane[a, b], plane[b, a], plane[b, b] = c, -s, s, c
        matrix = plane @ matrix
    return matrix


def _check_range(name: str, value: Sequence[float], low: float = 0.0) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (low <= lo <= hi):
        raise ValueError(f"{name} must be (low, high) with {low} <= low <= high, got {tuple(value)}")
    return lo, hi


def move_toward_centre(label: np.ndarray, body: np.ndarray | None, rng: Rng, *,
                       distance: Sequence[float] = (20.0, 60.0), reference_size: float | None = 128.0,
                       centre: str = "volume", axes: Sequence[int] = (0, 1, 2),
                       lesion_labels: Iterable[int] | None = None, fill_label: int = 0) -> Edited:
    """Shift the lesion labels toward the centre by a random distance (voxels), never past the centre.

    - ``distance``: (low, high) voxels (docs/method.md §5: 20-60) for a volume of ``reference_size`` voxels along its
      shortest moved axis; smaller volumes scale it by ``min(1, shortest / reference_size)`` (``None``: no scaling).
    - ``centre``: ``"volume"`` (the array centre) or ``"body"`` (the body's centre of mass).
    - ``axes``: the axes the shift may use (e.g. ``(1, 2)`` for in-plane only).
    """
    label, body = _check_inputs(label, body)
    rng = as_rng(rng)
    lo, hi = _check_range("distance", distance)
    if centre not in ("volume", "body"):
        raise ValueError(f"centre must be 'volume' or 'body', got {centre!r}")
    axes = sorted({int(a) for a in axes})
    if not axes or any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"axes must be a non-empty subset of (0, 1, 2), got {axes}")
    scale_factor = 1.0
    if reference_size is not None:
        if reference_size <= 0:
            raise ValueError(f"reference_size must be > 0 or None, got {reference_size}")
        scale_factor = min(1.0, min(label.shape[a] for a in axes) / float(reference_size))
    drawn = float(rng.uniform(lo, hi)) * scale_factor

    def shift_toward_centre(lesion: np.ndarray, mask: np.ndarray) -> Edited:
        target = (np.asarray(label.shape, dtype=np.float64) - 1.0) / 2.0
        if centre == "body" and body.any():
            target = _centre_of_mass(body)
        source = _centre_of_mass(mask)
        direction = np.zeros(3)
        direction[axes] = (target - source)[axes]
        gap = float(np.linalg.norm(direction))
        shift = np.zeros(3, dtype=int) if gap < 0.5 else np.rint(direction / gap * min(drawn, gap)).astype(int)
        info = {"shift": shift, "centre": centre, "from_voxel": source, "toward_voxel": target,
                "lesion_voxels_before": int(mask.sum())}
        return ndimage.shift(lesion, shift, order=0), info

    unmoved = {"distance": drawn, "shift": [0, 0, 0]}
    new, info = _move_lesion("move_toward_centre", label, body, lesion_labels, fill_label, unmoved, shift_toward_centre)
    if "skipped" not in info:
        info["lesion_voxels_after"] = int(lesion_mask(new, lesion_labels).sum())
    return new, info


def rotate(label: np.ndarray, body: np.ndarray | None, rng: Rng, *, max_degrees: float | Sequence[float] = 2.5,
           lesion_labels: Iterable[int] | None = None, fill_label: int = 0) -> Edited:
    """Rotate the lesion labels about their centre of mass by uniform(-max, max) degrees about each
    axis (nearest neighbour). ``max_degrees``: one value or one per axis."""
    label, body = _check_inputs(label, body)
    rng = as_rng(rng)
    limits = np.broadcast_to(np.asarray(max_degrees, dtype=np.float64), (3,))
    if np.any(limits < 0) or np.any(limits > 180):
        raise ValueError(f"max_degrees must be in [0, 180], got {max_degrees!r}")
    degrees = rng.uniform(-limits, limits)
    rotation = functools.partial(_transform_about_centre, matrix=_rotation_matrix(degrees))
    return _move_lesion("rotate", label, body, lesion_labels, fill_label, {"degrees": degrees}, rotation)


def flip(label: np.ndarray, body: np.ndarray | None, rng: Rng, *, axis: int = LEFT_RIGHT_AXIS, probability: float = 1.0,
         lesion_labels: Iterable[int] | None = None, fill_label: int = 0) -> Edited:
    """Mirror the lesion labels across the volume's mid-plane of ``axis`` (default left-right),
    with the given probability. The body is not mirrored; lesion voxels that land outside it are dropped."""
    label, body = _check_inputs(label, body)
    rng = as_rng(rng)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be one of (0, 1, 2), got {axis!r}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    flipped = bool(rng.random() < probability)
    return _move_lesion("flip", label, body, lesion_labels, fill_label, {"axis": axis, "flipped": flipped},
                        lambda lesion, mask: (np.flip(lesion, axis=axis) if flipped else lesion, {}))


def scale(label: np.ndarray, body: np.ndarray | None, rng: Rng, *, factor_range: Sequence[float] = (0.8, 1.2),
          lesion_labels: Iterable[int] | None = None, fill_label: int = 0) -> Edited:
    """Scale the lesion labels isotropically about their centre of mass by uniform(low, high) (nearest)."""
    label, body = _check_inputs(label, body)
    rng = as_rng(rng)
    lo, hi = _check_range("factor_range", factor_range)
    if lo <= 0:
        raise ValueError(f"factor_range must be positive, got {tuple(factor_range)}")
    factor = float(rng.uniform(lo, hi))
    scaling = functools.partial(_transform_about_centre, matrix=np.eye(3) * factor)
    return _move_lesion("scale", label, body, lesion_labels, fill_label, {"factor": factor}, scaling)


def remove_lesion(label: np.ndarray, body: np.ndarray | None, rng: Rng | None = None, *,
                  lesion_labels: Iterable[int] | None = None, fill_label: int = 0) -> Edited:
    """Healthy counterfactual: lesion labels -> ``fill_label`` (background). Deterministic (``rng`` unused)."""
    label, body = _check_inputs(label, body)
    lesion_values = _lesion_set(label, lesion_labels)
    if fill_label in lesion_values:
        raise ValueError(f"fill_label {fill_label} is itself a lesion label {lesion_values}")
    mask = np.isin(label, lesion_values)
    allowed = [v for v in np.unique(label) if v not in lesion_values] + [fill_label]
    new = enforce_invariants(np.where(mask, fill_label, label), label, body, allowed=allowed)
    return new, _info("remove_lesion", lesion_labels=lesion_values, removed_voxels=int(mask.sum()))


def remap_labels(label: np.ndarray, body: np.ndarray | None, rng: Rng | None = None, *, mapping: Mapping[int, int],
                 max_label: int | None = None) -> Edited:
    """Replace label values by ``mapping`` all at once, e.g. ``{3: 2}`` or a swap ``{1: 2, 2: 1}``; unmapped values
    stay, ``-1`` cannot be mapped, ``max_label`` (optional) bounds the labels to ``0..max_label``. ``rng`` unused."""
    label, body = _check_inputs(label, body)
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError(f"mapping must be a non-empty dict {{from: to}}, got {mapping!r}")
    table = {int(k): int(v) for k, v in mapping.items()}
    bad = {k: v for k, v in table.items() if k < 0 or v < 0 or (max_label is not None and max(k, v) > max_label)}
    if bad:
        bound = f"0..{max_label}" if max_label is not None else ">= 0"
        raise ValueError(f"mapping entries {bad} are outside the label range {bound}")
    new = label.copy()
    for source, target in table.items():
        new[label == source] = target
    allowed = [table.get(int(v), int(v)) for v in np.unique(label)]
    new = enforce_invariants(new, label, body, allowed=allowed)
    return new, _info("remap_labels", mapping={str(k): v for k, v in sorted(table.items())})


def compose(*edits: EditFn, name: str = "compose") -> EditFn:
    """One edit that applies ``edits`` in order with the same generator, e.g. ``compose(partial(rotate,
    max_degrees=5), flip)``. The info is ``{"edit": name, "steps": [info of each edit]}``."""
    if not edits:
        raise ValueError("compose needs at least one edit")
    for edit in edits:
        if not callable(edit):
            raise TypeError(f"compose takes edit functions, got {edit!r}")

    def composed(label: np.ndarray, body: np.ndarray | None, rng: Rng) -> Edited:
        label, body = _check_inputs(label, body)
        rng = as_rng(rng)
        steps = []
        for edit in edits:
            label, info = edit(label, body, rng)
            steps.append(info)
        return label, {"edit": name, "steps": steps}

    return composed


def icma_edit(label: np.ndarray, body: np.ndarray | None, rng: Rng, *, max_degrees: float = 2.5,
              distance: Sequence[float] = (20.0, 60.0), reference_size: float | None = 128.0,
              flip_probability: float = 1.0, lr_axis: int = LEFT_RIGHT_AXIS,
              lesion_labels: Iterable[int] | None = None) -> Edited:
    """The paper's ``icma``/``igma`` mask edit (docs/method.md §5): rotate the lesion labels (±``max_degrees``
    per axis), flip them left-right, shift them ``distance`` voxels toward the volume centre (scaled down
    for volumes smaller than ``reference_size``); the body region is restored, so a lesion never leaves it."""
    edit = compose(
        functools.partial(rotate, max_degrees=max_degrees, lesion_labels=lesion_labels),
        functools.partial(flip, axis=lr_axis, probability=flip_probability, lesion_labels=lesion_labels),
        functools.partial(move_toward_centre, distance=distance, reference_size=reference_size, centre="volume",
                          lesion_labels=lesion_labels),
        name="icma_edit",
    )
    return edit(label, body, rng)

