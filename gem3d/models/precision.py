"""Reduced precision for sampling: an autocast scope that covers the denoiser only.

Inside ``with sampling_precision("bf16"):`` every :class:`gem3d.models.unet.UNetModel` call runs under
``torch.autocast`` and returns the input's dtype (float32), so the sampler's arithmetic and the autoencoder stay
float32. Outside a scope UNet calls are plain float32. Training uses Lightning's ``precision: bf16-mixed`` instead.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

import torch

__all__ = ["PRECISIONS", "default_precision", "sampling_precision", "denoiser_autocast"]

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHOICES = ("auto", *PRECISIONS)

_SAMPLING_PRECISION: ContextVar[str] = ContextVar("gem3d_sampling_precision", default="fp32")


def default_precision(device: torch.device | str) -> str:
    """``"bf16"`` on a CUDA device that supports bfloat16, ``"fp32"`` otherwise (CPU, older GPUs)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


@contextlib.contextmanager
def sampling_precision(precision: str = "auto") -> Iterator[None]:
    """Run the UNet calls inside at ``precision`` (``auto``: :func:`default_precision` of each call's device)."""
    if precision not in CHOICES:
        raise ValueError(f"precision must be one of {list(CHOICES)}, got {precision!r}")
    token = _SAMPLING_PRECISION.set(precision)
    try:
        yield
    finally:
        _SAMPLING_PRECISION.reset(token)


def denoiser_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast scope for one denoiser call on ``device`` under the current sampling precision.

    A no-op for fp32, and inside an autocast that is already on (Lightning's mixed-precision training).
    """
    precision = _SAMPLING_PRECISION.get()
    if precision == "auto":
        precision = default_precision(device)
    if precision == "fp32" or torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])
