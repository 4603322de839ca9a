"""gem3d.export: NIfTI in the source geometry, run manifests, PNG previews, nnU-Net datasets."""

from .manifest import Manifest, make_record, merge_manifests, record_key
from .nifti import save_canonical_nifti, save_nifti
from .nnunet import find_synthetic_cases, validate_nnunet_dataset, write_nnunet_dataset
from .preview import save_preview

__all__ = [
    "Manifest",
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
