"""The configs gem3d ships as package data: ``first_stage/`` (autoencoder architectures, latent-diffusion layout:
``kl-f8.yaml`` is the paper's) and ``inference/`` (per-dataset defaults of ``scripts/inference_*.py``).
The training configs live outside the package, in the repository's ``configs/latent-diffusion/``."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def packaged(*parts: str) -> Path:
    """Path of a shipped config, e.g. ``packaged("first_stage", "kl-f8.yaml")`` (installed or from a checkout)."""
    return Path(str(files(__name__).joinpath(*parts)))
