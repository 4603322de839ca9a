#!/usr/bin/env python
"""Write the gem3d demo dataset (nnU-Net raw layout, from nilearn's MNI152 template) into OUT.

    python scripts/make_demo_dataset.py OUT --cases 16 --val 2 --test 6 --seed 0
"""
from gem3d.data.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
