"""Label fidelity: does the synthetic volume look like the real one inside each label of its conditioning mask?
Per-label intensity statistics, Dice (MONAI), and the segmenter's Dice: a segmenter trained on real cases
(:mod:`gem3d.segmentation`) labels each volume, and its labels are compared with the mask the volume was made from."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from gem3d.data.case import load_case
from gem3d.data.geometry import load_nifti
from gem3d.data.preprocess import grey_to_label, label_to_grey
from gem3d.export.nifti import save_nifti
from gem3d.segmentation import Segmenter

OUTSIDE = "outside"


def label_intensity_stats(volume, labels, body=None) -> dict[str, dict[str, float]]:
    """``{region: {"mean", "std", "median", "voxels"}}`` of ``volume`` (``(D, H, W)``) for every label value
    ``"k" > 0`` of ``labels``, ``"0"`` (body without a label, needs ``body``) and ``"outside"`` (not body)."""
    v = np.asarray(volume, dtype=np.float64)
    lab = np.asarray(labels)
    if lab.shape != v.shape:
        raise ValueError(f"labels shape {lab.shape} differs from the volume's {v.shape}")
    regions = {str(k): lab == k for k in sorted(int(v) for v in np.unique(lab) if v > 0)}
    if body is not None:
        body = np.asarray(body, bool) | (lab > 0)
        regions["0"] = body & (lab <= 0)
        regions[OUTSIDE] = ~body
    out = {}
    for name, region in regions.items():
        values = v[region] if region.any() else np.array([math.nan])  # an empty region has NaN statistics
        out[name] = {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
                     "voxels": int(region.sum())}
    return out


def label_order(stats: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The labels (``"0"`` and values > 0, not ``outside``) sorted by mean intensity, darkest first."""
    names = [n for n in stats if n != OUTSIDE and math.isfinite(stats[n]["mean"])]
    return sorted(names, key=lambda n: stats[n]["mean"])


def label_fidelity(synthetic, real, labels, body, label_names: Mapping[int, str] | None = None,
                   real_labels=None, real_body=None) -> dict[str, float]:
    """Per-label mean and std differences (synthetic - real) of ``synthetic`` vs ``real`` (``(D, H, W)`` on the real
    volume's [0, 1] scale), the mean outside the body, and whether the label means keep the real order. ``labels`` /
    ``body`` are the synthetic volume's; ``real_labels`` / ``real_body`` the real one's (default the same)."""
    fake_stats = label_intensity_stats(synthetic, labels, body)
    real_stats = label_intensity_stats(real, labels if real_labels is None else real_labels,
                                       body if real_body is None else real_body)
    names = {str(k): v for k, v in (label_names or {}).items()}
    out: dict[str, float] = {}
    for region, real_values in real_stats.items():
        if region == OUTSIDE or region not in fake_stats:
            continue
        name = names.get(region, region)
        out[f"mean_diff_{name}"] = fake_stats[region]["mean"] - real_values["mean"]
        out[f"std_diff_{name}"] = fake_stats[region]["std"] - real_values["std"]
    if OUTSIDE in real_stats and real_stats[OUTSIDE]["voxels"]:
        out["outside_mean"] = fake_stats[OUTSIDE]["mean"]
        out["outside_mean_diff"] = fake_stats[OUTSIDE]["mean"] - real_stats[OUTSIDE]["mean"]
    out["label_order_kept"] = float(label_order(fake_stats) == label_order(real_stats))
    return out


def dice_per_label(prediction, reference, num_labels: int | None = None) -> dict[int, float]:
    """Dice of every label ``1..num_labels`` between two int label maps of one shape (MONAI ``DiceMetric``,
    background excluded). A label absent from ``reference`` gets NaN (MONAI's ``ignore_empty``)."""
    pred, ref = torch.as_tensor(np.asarray(prediction)).long(), torch.as_tensor(np.asarray(reference)).long()
    if pred.shape != ref.shape:
        raise ValueError(f"label maps differ in shape: {tuple(pred.shape)} and {tuple(ref.shape)}")
    n = int(max(pred.max(), ref.max(), 1)) if num_labels is None else int(num_labels)
    pred, ref = pred.clamp(0, n)[None, None], ref.clamp(0, n)[None, None]  # -1 (outside the body) is background
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    scores = metric(one_hot(pred, num_classes=n + 1, dim=1), one_hot(ref, num_classes=n + 1, dim=1))[0]
    return {k + 1: float(scores[k]) for k in range(n)}


@torch.no_grad()
def autoencoder_mask_dice(first_stage, labels, max_label: int) -> dict[int, float]:
    """Does the paper's mask encoding keep every label? ``labels (D, S, S)`` (-1 outside the body, 0..max_label) ->
    grey masks -> ``first_stage.encode_mask`` -> ``decode_grey`` -> the nearest grey level's label, and its Dice per
    label against ``labels`` (:func:`dice_per_label`). The diffusion model reads the latent, not its decoding, so a
    low score says the latent blurs that label into its neighbours, not that the label is gone."""
    labels = np.asarray(labels)
    grey = rearrange(torch.from_numpy(label_to_grey(labels, max_label)), "d h w -> d 1 h w")
    back = first_stage.decode_grey(first_stage.encode_mask(grey.to(first_stage.device)))
    decoded = grey_to_label(rearrange(back.float().cpu(), "d 1 h w -> d h w").numpy(), max_label)
    return dice_per_label(decoded, labels, max_label)


def mean_dice(scores: Mapping[int, float]) -> float:
    """The mean Dice over the labels a mask holds (NaN entries left out); NaN when it holds none."""
    values = [v for v in scores.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def dice_column(label_name: str) -> str:
    """The metrics column of one label's Dice: ``dice_<name>``, spaces as ``_``."""
    return "dice_" + str(label_name).replace(" ", "_")


def dice_columns(scores: Mapping[int, float], label_names: Mapping[int, str]) -> dict[str, float]:
    """``{dice_<label name>: Dice, ..., "dice_mean": mean over the labels the mask holds}`` of one sample."""
    out = {dice_column(label_names.get(value, value)): score for value, score in scores.items()}
    out["dice_mean"] = mean_dice(scores)
    return out


def zero_outside(image_path: str | Path, body, out_path: str | Path, slice_axis: int = 2) -> Path:
    """Write the image of ``image_path`` with 0 outside ``body`` (canonical ``(D, H, W)`` bool, the layout of
    :func:`gem3d.data.case.load_case` with ``slice_axis``) onto its own grid: the input of a segmenter trained on
    volumes that are 0 outside the body (skull-stripped MRI)."""
    data, geometry = load_nifti(image_path, slice_axis=slice_axis)
    inside = geometry.to_source(np.asarray(body, bool))
    return save_nifti(np.where(inside, data, 0).astype(np.float32), geometry, out_path)


def segmenter_dice(segmenter: Segmenter, images: Sequence[Path], masks: Sequence, num_labels: int,
                   out_dir: str | Path, slice_axis: int = 2, progress: bool = False,
                   prediction_paths: list | None = None) -> list[dict[int, float]]:
    """Dice per label ``1..num_labels`` between ``segmenter``'s prediction on each image (written to ``out_dir``)
    and that image's mask: a label NIfTI on the image's grid, or a canonical ``(D, H, W)`` int array (the layout of
    :func:`gem3d.data.case.load_case` with ``slice_axis``). One dict per image, in order; a label absent from the
    mask gets NaN. ``prediction_paths``, when given, is extended with the prediction files, in order."""
    if len(images) != len(masks):
        raise ValueError(f"segmenter_dice needs one mask per image, got {len(images)} images and {len(masks)} masks")
    predictions = segmenter.predict(list(images), out_dir, progress=progress)
    if prediction_paths is not None:
        prediction_paths.extend(predictions)
    results = []
    for image, prediction, mask in zip(images, predictions, masks):
        predicted = load_case(prediction, slice_axis=slice_axis).image
        if isinstance(mask, (str, Path)):
            mask = load_case(image, mask, slice_axis=slice_axis).label
        mask = np.asarray(mask)
        if predicted.shape != mask.shape:
            raise ValueError(f"the prediction {prediction} has shape {predicted.shape}, the mask of {image} "
                             f"{mask.shape}: they must share the image's grid")
        results.append(dice_per_label(np.rint(predicted).astype(np.int64), mask, num_labels))
    return results


def segmenter_agreement(segmenter: Segmenter, cases, num_labels: int, out_dir: str | Path,
                        progress: bool = False) -> dict[str, float]:
    """FreeTumor-style quality score ``{case name: mean Dice}`` of synthetic cases (``.name``, ``.image``,
    ``.label``: a label NIfTI on the image's grid) from :func:`segmenter_dice`."""
    scores = segmenter_dice(segmenter, [c.image for c in cases], [c.label for c in cases], num_labels, out_dir,
                            progress=progress)
    return {c.name: mean_dice(s) for c, s in zip(cases, scores)}
