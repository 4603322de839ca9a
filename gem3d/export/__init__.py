"""gem3d.export: NIfTI in the source geometry (atomic writes), run manifests, PNG previews, nnU-Net datasets."""

from .manifest import Manifest, file_sha256, make_record, merge_manifests, record_key
from .nifti import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, save_canonical_nifti, save_nifti
from .nnunet import find_synthetic_cases, validate_nnunet_dataset, write_nnunet_dataset
from .preview import save_preview

__all__ = [
    "Manifest",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "file_sha256",
    "find_synthetic_cases",
    "make_record",
    "merge_manifests",
    "record_key",
    "save_canonical_nifti",
    "save_nifti",
    "save_preview",
    "validate_nnunet_dataset",
    "write_nnunet_dataset",
]
