"""Training: LightningModules that wrap the denoiser (:mod:`gem3d.training.ldm`) and the first stage
(:mod:`gem3d.training.autoencoder`) for ``main.py``."""

from .autoencoder import AutoencoderModule
from .ldm import Gem3dLDM

__all__ = ["AutoencoderModule", "Gem3dLDM"]
