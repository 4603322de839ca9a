#!/usr/bin/env python
"""Check an nnU-Net raw dataset for gem3d: one line per problem (kind, case, file, value); exit 1 if any.

    python scripts/check_dataset.py DATASET_DIR [--min-slices 16] [--slice-axis 2]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gem3d.data.check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
