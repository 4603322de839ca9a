#!/usr/bin/env python
"""Check an nnU-Net raw dataset for gem3d: one line per problem (kind, case, file, value); exit 1 if any.

    python scripts/check_dataset.py DATASET_DIR [--min-slices 16] [--slice-axis 2] [--channel FLAIR]

The last line says which image channel gem3d will read (index and name, from dataset.json).
"""
from gem3d.data.check import main

if __name__ == "__main__":
    raise SystemExit(main())
