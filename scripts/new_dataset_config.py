#!/usr/bin/env python
"""Write the dataset block of the training configs from a dataset's dataset.json and intensity statistics.

    python scripts/new_dataset_config.py DATASET_DIR -o configs/datasets/my_dataset.yaml [--channel 0] [--size 512]
"""
from gem3d.data.dataset_config import main

if __name__ == "__main__":
    raise SystemExit(main())
