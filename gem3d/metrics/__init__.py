"""gem3d.metrics: measuring synthetic volumes against real ones (used by scripts/evaluate.py and the demo only).

- :mod:`.image`: PSNR / SSIM / MS-SSIM (MONAI), 3D and per axial slice, inside a mask; :func:`.image.reconstruction_metrics`.
- :mod:`.consistency`: slice jumps, through-plane gradients, intensity profiles (synthetic vs real).
- :mod:`.labels`: per-label intensity statistics, Dice (MONAI), the optional nnU-Net segmenter hook.
- :mod:`.distribution`: Fréchet distance of features, MMD (MONAI), MS-SSIM diversity, FRD (frd-score).
- :mod:`.features`: RadImageNet ResNet-50 (2.5D FID) and MedicalNet 3D ResNets (3D FID) from local weight files.
- :mod:`.references`: copy-the-informed-slice and autoencoder references, the counterfactual (informed slice) effect.
- :mod:`.volumes`: real cases and manifest-matched synthetic samples in the canonical orientation.
- :mod:`.report`: metrics.csv, summary.md, PIL plots, offline report.html.
"""
