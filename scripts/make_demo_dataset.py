#!/usr/bin/env python
"""Write the gem3d demo dataset (nnU-Net raw layout, from nilearn's MNI152 template) into OUT.

    python scripts/make_demo_dataset.py OUT --cases 10 --seed 0
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gem3d.data.demo import build_demo_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="dataset folder to write (it becomes the nnU-Net dataset folder)")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a folder that is not a gem3d demo")
    args = parser.parse_args(argv)
    t0 = time.time()
    out = build_demo_dataset(args.out, cases=args.cases, seed=args.seed, overwrite=args.overwrite, progress=True)
    print(f"wrote {args.cases} demo cases to {out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
