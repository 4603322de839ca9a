"""Yardsticks: the informed slice copied into every slice (the floor), the real volume through the autoencoder
(the ceiling of any latent-diffusion sample), and how much the output follows the informed slice (two donors)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat

from gem3d.data.case import Case
from gem3d.data.geometry import Geometry
from gem3d.data.preprocess import PreprocessConfig, prepare_case, restore_volume
from gem3d.model_dirs import load_model_dir, run_preprocess
from gem3d.models.autoencoder import FirstStage

from .labels import OUTSIDE, label_intensity_stats


def copy_slice_volume(volume, index: int | None = None) -> np.ndarray:
    """``(D, H, W)`` volume whose every slice is ``volume[index]`` (default the middle slice, ``D // 2``)."""
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"volume must be (D, H, W), got shape {v.shape}")
    index = v.shape[0] // 2 if index is None else int(index)
    if not 0 <= index < v.shape[0]:
        raise ValueError(f"slice index {index} outside [0, {v.shape[0]})")
    return repeat(v[index], "h w -> d h w", d=v.shape[0]).copy()


def load_first_stage(path: str | Path, trust: bool = False):
    """``(first_stage, preprocess dict or None)`` from an autoencoder training run or any GEM-3D model folder."""
    path = Path(path)
    try:
        first_stage = FirstStage.from_run(path)
        run = path if path.is_dir() else path.parent.parent
        return first_stage.eval(), run_preprocess(run)
    except (KeyError, FileNotFoundError, ValueError):  # not an autoencoder run: a diffusion model folder
        loaded = load_model_dir(path, trust=trust)
        return loaded.model.first_stage.eval(), loaded.preprocess


@torch.no_grad()
def autoencoder_reconstruction(first_stage, image, label, geometry: Geometry, preprocess: PreprocessConfig) -> np.ndarray:
    """The real canonical ``(D, H, W)`` ``image`` (raw intensities) through the model's preprocessing, the first
    stage's encoder (posterior mean) and decoder, and back: canonical ``(D, H, W)`` raw intensities."""
    case = Case("reference", np.asarray(image, np.float32), np.asarray(label).astype(np.int16), geometry)
    prepared = prepare_case(case, preprocess)
    x = rearrange(torch.from_numpy(prepared.image), "d h w -> d 1 h w").to(first_stage.device)
    grey = first_stage.decode_grey(first_stage.encode(x, sample=False))
    volume = rearrange(grey, "d 1 h w -> d h w").clamp(-1, 1).cpu().numpy()
    return geometry.to_canonical(restore_volume(volume, prepared))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def counterfactual_effect(output_a, output_b, labels, body, donor_a_slice, donor_a_labels, donor_b_slice,
                          donor_b_labels) -> dict[str, float]:
    """The informed slice's effect from two ``(D, H, W)`` outputs for one mask (``labels``, ``body``) made with donors
    A and B (each donor's informed slice ``(H', W')`` and its label slice, -1 outside the body). ``mean_abs_diff``:
    mean ``|a - b|`` in the body; ``corr_<output>_<donor>``: Pearson correlation of per-label means over the shared
    labels; ``follows_donor``: 1 if each output correlates better with its own donor; ``order_<o>_is_<donor>s``: 1 if
    the output's label intensity order is its donor's (the target for an inverted-contrast donor)."""
    a, b = np.asarray(output_a, np.float64), np.asarray(output_b, np.float64)
    body = np.asarray(body, bool)
    out = {"mean_abs_diff": float(np.abs(a - b)[body].mean())}

    def means(volume, lab, region=None):
        stats = label_intensity_stats(volume, lab, region)
        return {k: v["mean"] for k, v in stats.items() if k != OUTSIDE and v["voxels"] > 0}

    out_a, out_b = means(a, labels, body), means(b, labels, body)
    donor_a = means(np.asarray(donor_a_slice)[None], np.asarray(donor_a_labels)[None], np.asarray(donor_a_labels)[None] >= 0)
    donor_b = means(np.asarray(donor_b_slice)[None], np.asarray(donor_b_labels)[None], np.asarray(donor_b_labels)[None] >= 0)
    shared = sorted(set(out_a) & set(out_b) & set(donor_a) & set(donor_b))
    vec = {name: np.array([d[k] for k in shared]) for name, d in
           (("a", out_a), ("b", out_b), ("donor_a", donor_a), ("donor_b", donor_b))}
    out.update({f"corr_{o}_{d}": _correlation(vec[o], vec[d]) for o in ("a", "b") for d in ("donor_a", "donor_b")})
    for o, d in (("a", "donor_a"), ("b", "donor_b")):
        out[f"order_{o}_is_{d}s"] = float(shared != [] and list(np.argsort(vec[o], kind="stable"))
                                          == list(np.argsort(vec[d], kind="stable")))
    own = out["corr_a_donor_a"] + out["corr_b_donor_b"]
    other = out["corr_a_donor_b"] + out["corr_b_donor_a"]
    out["follows_donor"] = float(own > other) if math.isfinite(own) and math.isfinite(other) else math.nan
    out["labels_compared"] = float(len(shared))
    return out
