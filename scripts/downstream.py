#!/usr/bin/env python
"""Does the enhanced dataset train a better segmenter? Segmenters trained on real cases only, real + each synthetic
setting, synthetic only and real + quality-filtered synthetic cases, in low-data regimes and over seeds, scored on
the real test split (see gem3d/downstream.py and the README's Downstream section):

    python scripts/downstream.py --real demo_out/dataset --synthetic demo_out/synthetic --out demo_out/downstream \
        [--conditions real real+icma real+base icma-only] [--real-counts 2 4 all] [--seeds 0 1 2] \
        [--backend monai|nnunet] [--iterations 300] [--device cuda] [--option configuration=3d_fullres] \
        [--min-dice 0.5 --conditions ... real+filtered]
"""
from gem3d.downstream import main

if __name__ == "__main__":  # the guard nnU-Net needs: its worker processes re-import the main module
    raise SystemExit(main())
