"""gem3d.model_dirs: the one owner of model folders (gem3d runs, converted folders, original GEM-3D folders):
their layouts, detection and loading. Inference and conversion both use it."""

from .load import LoadedModel, detect_layout, load_model_dir, read_preprocess, run_preprocess
from .original import is_original_model_dir, read_original_model_dir

__all__ = [
    "LoadedModel", "detect_layout", "is_original_model_dir", "load_model_dir", "read_original_model_dir",
    "read_preprocess", "run_preprocess",
]
