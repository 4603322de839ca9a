"""Label fidelity: does the synthetic volume look like the real one inside each label of its conditioning mask?
Per-label intensity statistics, Dice (MONAI), and Dice against an optional trained nnU-Net segmenter (``nnunetv2``,
imported only when used: it pulls a CUDA torch)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

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


def nnunet_available() -> bool:
    return importlib.util.find_spec("nnunetv2") is not None


def segmenter_dice(model_folder: str | Path | None, volume_paths: list[Path], label_paths: list[Path],
                   num_labels: int, folds=(0,), device: str = "cpu") -> tuple[list[dict[int, float]] | None, str]:
    """Dice per label between each conditioning mask (``label_paths``) and the trained nnU-Net ``model_folder``'s
    prediction on the synthetic image (``volume_paths``): ``(dice per sample, "ok")`` or ``(None, "skipped: why")``."""
    if model_folder is None:
        return None, "skipped: no --segmenter model folder given"
    if not nnunet_available():
        return None, "skipped: nnunetv2 not installed (see ENVIRONMENT.md)"
    model_folder = Path(model_folder)
    if not model_folder.is_dir():
        raise FileNotFoundError(f"--segmenter: nnU-Net model folder {model_folder} does not exist")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: PLC0415  (optional dependency)

    predictor = nnUNetPredictor(device=torch.device(device))
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=tuple(folds))
    results = []
    for image_path, label_path in zip(volume_paths, label_paths):
        prediction = predictor.predict_from_files([[str(image_path)]], None, save_probabilities=False,
                                                  overwrite=True, num_processes_preprocessing=1,
                                                  num_processes_segmentation_export=1)[0]
        # nnU-Net returns the segmentation in its (z, y, x) order of the file's array: transpose back to (x, y, z)
        label = np.asarray(nib.load(str(label_path)).dataobj).astype(np.int64)
        results.append(dice_per_label(np.transpose(np.asarray(prediction)), label, num_labels))
    return results, "ok"


def mean_dice(scores: dict[int, float]) -> float:
    """The mean Dice over the labels a mask holds (NaN entries left out); NaN when it holds none."""
    values = [v for v in scores.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def segmenter_agreement(model_folder: str | Path, cases, num_labels: int, device: str = "cpu") -> dict[str, float]:
    """FreeTumor-style quality score ``{case name: mean Dice}`` of synthetic cases (``.name``, ``.image``,
    ``.label``) from :func:`segmenter_dice`; fails with one line when the segmenter cannot run."""
    scores, status = segmenter_dice(model_folder, [c.image for c in cases], [c.label for c in cases], num_labels,
                                    device=device)
    if scores is None:
        raise ValueError(f"--segmenter {model_folder}: {status}")
    return {c.name: mean_dice(s) for c, s in zip(cases, scores)}
