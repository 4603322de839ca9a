"""gem3d.data: NIfTI / nnU-Net datasets -> canonical cases, preprocessing, slice / clip / volume datasets, checks.

Import the submodules (`gem3d.data.check` starts without torch or Lightning)."""
