"""gem3d: GEM-3D, generative enhancement for 3D medical images.

A latent diffusion model that regenerates a 3D volume from its 3D segmentation mask plus one real 2D
*informed slice*, with volumetric layers that propagate the generation across slices.
"""
import os as _os

# diffusers must never reach for a model hub: set before it is first imported anywhere.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
