"""gem3d.model_dirs: the one owner of model folders (gem3d runs, converted folders, original GEM-3D folders):
their layouts, detection and loading. Inference and conversion both use it."""

from .load import (
    CONVERTED_CONFIG, CONVERTED_WEIGHTS, DENOISER_TARGET, LAYOUTS, LoadedModel, detect_layout, load_model_dir,
    read_preprocess, run_preprocess,
)  # fmt: skip
from .original import is_original_model_dir, read_original_model_dir

__all__ = [
    "CONVERTED_CONFIG", "CONVERTED_WEIGHTS", "DENOISER_TARGET", "LAYOUTS", "LoadedModel", "detect_layout",
    "is_original_model_dir", "load_model_dir", "read_original_model_dir", "read_preprocess", "run_preprocess",
]
