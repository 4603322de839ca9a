"""Distribution metrics: do the synthetic volumes, as a set, look like the real ones? (Fréchet distance of
``(N, F)`` feature sets from :mod:`.features`, MMD, MS-SSIM diversity, FRD.)"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.metrics import MMDMetric

from .image import ms_ssim

FRD_LOG_NOTE = (
    "FRD v1 as frd-score computes it by default: log of the squared Fréchet distance, log(d_F^2). The paper's Eq. 3 "
    "is log(d_F), half of it (frd-score's use_paper_log); values here are frd-score's default, comparable with "
    "published frd-score numbers."
)


def _features(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{what} must be a (N, F) feature matrix, got shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise ValueError(f"{what} needs at least 2 samples for a covariance, got {t.shape[0]}")
    return t


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance ``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^1/2)`` between Gaussians fitted to
    ``(N, F)`` and ``(M, F)`` feature sets: MONAI ``FIDMetric``'s value (tested), without its F x F ``sqrtm`` (150 s
    for F = 2048 here). With centred features A, B the trace term is the nuclear norm of ``B A^T / sqrt((N-1)(M-1))``.
    """
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in width: {a.shape[1]} and {b.shape[1]}")
    n, m = a.shape[0], b.shape[0]
    mu_a, mu_b = a.mean(0), b.mean(0)
    a_c, b_c = a - mu_a, b - mu_b
    trace_a, trace_b = (a_c**2).sum() / (n - 1), (b_c**2).sum() / (m - 1)
    cross = torch.linalg.matrix_norm(b_c @ a_c.T, ord="nuc") / math.sqrt((n - 1) * (m - 1))
    value = ((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * cross
    return max(0.0, float(value))


def mmd(set_a, set_b) -> float:
    """MMD between two sets of ``N`` equally shaped samples ``(N, ...)`` (MONAI ``MMDMetric``, linear kernel on the
    flattened samples; N >= 2 each). Sets of unequal size are cut to the smaller one."""
    a = torch.as_tensor(np.asarray(set_a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(set_b), dtype=torch.float64)
    n = min(a.shape[0], b.shape[0])
    if n < 2:
        raise ValueError(f"MMD needs at least 2 samples in each set, got {a.shape[0]} and {b.shape[0]}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"MMD samples must share one shape, got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    a, b = a[:n].reshape(n, 1, -1), b[:n].reshape(n, 1, -1)
    return float(MMDMetric()(b, a))


def ms_ssim_diversity(samples: Sequence[np.ndarray], mode: str = "axial") -> float:
    """Mean MS-SSIM (see :func:`gem3d.metrics.image.ms_ssim`) over all pairs of ``(D, H, W)`` samples on one scale,
    e.g. [0, 1] (data range 1). Lower = more diverse; NaN for fewer than two samples."""
    if len(samples) < 2:
        return math.nan
    values = [ms_ssim(a, b, data_range=1.0, mode=mode)[0] for a, b in itertools.combinations(samples, 2)]
    return float(np.mean(values))


def frd_available() -> tuple[bool, str]:
    """Whether ``frd-score`` and pyradiomics import; ``(False, reason)`` if not."""
    hints = (("frd_score", "pip install frd-score"), ("radiomics", "pyradiomics: see the eval extra in pyproject.toml"))
    for module, hint in hints:
        if importlib.util.find_spec(module) is None:
            return False, f"skipped: {module} not installed ({hint})"
    return True, "ok"


def frd(real_files: Sequence[Path], synthetic_files: Sequence[Path], real_masks: Sequence[Path] | None = None,
        synthetic_masks: Sequence[Path] | None = None, num_workers: int = 1) -> float:
    """Fréchet Radiomics Distance (FRD v1, frd-score's default log(d_F^2); see ``FRD_LOG_NOTE``) between two sets of
    NIfTI volumes, features taken inside the mask files where given (value > 0). Lower = more alike."""
    import frd_score  # noqa: PLC0415  (optional dependency: frd-score + pyradiomics)

    masks = None if real_masks is None else [[str(p) for p in real_masks], [str(p) for p in synthetic_masks]]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # frd-score prints its result
        warnings.simplefilter("ignore")
        return float(frd_score.compute_frd([[str(p) for p in real_files], [str(p) for p in synthetic_files]],
                                           paths_masks=masks, num_workers=num_workers, verbose=False))
