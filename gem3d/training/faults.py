"""What keeps a training run safe from faults (docs/reliability.md): atomic checkpoint writes that refuse non-finite
weights, the random state saved with every checkpoint (a resumed run draws the same noise), the stop on a NaN loss.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gem3d.files import atomic_path

__all__ = ["AtomicCheckpointIO", "RandomStateCheckpoint", "check_finite_loss"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic for local files (:func:`gem3d.files.atomic_path`: a failed save
    leaves the previous ``last.ckpt`` as it was); weights with a NaN or an Inf are not written at all
    (``FloatingPointError``). Remote paths (``s3://...``) keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        bad = [name for name, value in checkpoint.get("state_dict", {}).items()
               if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            shown = bad[:3] + (["..."] if len(bad) > 3 else [])
            raise FloatingPointError(
                f"not writing {path}: the weights hold NaN or Inf values ({len(bad)} tensors, e.g. {shown}) at global "
                f"step {checkpoint.get('global_step')}; the previous checkpoint is kept"
            )
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class RandomStateCheckpoint(L.Callback):
    """Saves the torch (CPU and CUDA), numpy and Python random states with every checkpoint and restores them on
    resume: the noise and timesteps after a resume are those of the uninterrupted run."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, position, has_gauss, cached_gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # numpy's keys as a tensor: weights_only loading takes no numpy arrays
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, position, has_gauss, cached_gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def check_finite_loss(module: L.LightningModule, loss: torch.Tensor, batch_idx: int, name: str = "train/loss") -> None:
    """Stop training (``FloatingPointError``) when ``loss`` is NaN or Inf on any rank, before the optimiser step,
    so the weights and the checkpoints written so far stay those of the last good step."""
    finite = bool(torch.isfinite(loss.detach()).all())
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    if not finite:
        raise FloatingPointError(
            f"{name} is {loss.detach().float().mean().item()} at global step {module.global_step} (batch {batch_idx} "
            f"of epoch {module.current_epoch}) on some rank: training stopped before the optimiser step; the "
            f"checkpoints written so far hold finite weights (resume from last.ckpt with a lower learning rate, or "
            f"check the data)"
        )
