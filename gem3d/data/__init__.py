"""gem3d.data: NIfTI / nnU-Net datasets -> canonical cases, preprocessing, slice / clip / volume datasets, checks.

Names are imported lazily, so `gem3d.data.check` (the dataset checker) starts without torch or Lightning."""
from importlib import import_module

_EXPORTS = {
    "geometry": ("Geometry", "load_nifti"),
    "case": ("Case", "load_case"),
    "nnunet": ("RawDataset", "PreprocessedDataset", "open_dataset", "read_preprocessed_case"),
    "preprocess": ("PreprocessConfig", "PreparedCase", "compute_body_mask", "normalise_intensity",
                   "denormalise_intensity", "label_to_grey", "grey_to_label", "resize_slices", "prepare_case",
                   "restore_volume", "restore_label"),
    "datasets": ("VolumeCache", "LatentCache", "LatentEncoder", "ClipDataset", "SliceDataset", "VolumeDataset", "make_splits", "write_splits",
                 "read_splits", "load_or_create_splits"),
    "module": ("Gem3dDataModule",),
    "check": ("Problem", "check_dataset"),
    "demo": ("build_demo_dataset",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
