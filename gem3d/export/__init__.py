"""gem3d.export: NIfTI in the source geometry, run manifests, PNG previews, nnU-Net datasets."""
