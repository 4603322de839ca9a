#!/usr/bin/env python
"""Build an enhanced nnU-Net raw dataset: real training cases + gem3d synthetic cases.

    python scripts/enhance_dataset.py --real nnUNet_raw/Dataset001_Brain \\
        --synthetic OUT/icma OUT/ic --out nnUNet_raw/Dataset101_BrainGem3d [--min-dice 0.7]

Every option is described by ``--help``; the logic lives in :mod:`gem3d.export.enhance`.
"""
import sys

from gem3d.export.enhance import main

if __name__ == "__main__":
    sys.exit(main())
