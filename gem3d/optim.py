"""Adam and AdamW for every model gem3d trains, with torch's fused kernel where the parameters allow it.

The default Adam loops over the parameters, a few small ops each; the fused kernel updates them all in one call
(the same update up to float rounding). On the demo's CPU models the loop is a measurable share of a training step
(BENCHMARKS.md section 12).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["FUSED_DEVICES", "fused_supported", "make_adam"]

FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused Adam kernel runs (float parameters)
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def fused_supported(params: list[torch.Tensor]) -> bool:
    """True when every parameter is a floating-point tensor on a device of :data:`FUSED_DEVICES`, all on one
    device type."""
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= set(FUSED_DEVICES) and all(p.is_floating_point() for p in params)


def make_adam(kind: str, params: Iterable[torch.nn.Parameter], *, fused: bool | None = None,
              **kwargs) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (``kind="adam"``) or ``AdamW`` (``"adamw"``) over ``params`` with ``kwargs`` (lr,
    betas, weight_decay, ...). ``fused``: None = the fused kernel where :func:`fused_supported`, else the default
    loop; True insists (and fails where torch cannot); False = the loop."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimiser kind {kind!r} is not one of {sorted(OPTIMIZERS)}")
    params = list(params)
    if not params:
        raise ValueError("no parameters to optimise")
    if fused is None:
        fused = fused_supported(params)
    return OPTIMIZERS[kind](params, fused=fused or None, **kwargs)
