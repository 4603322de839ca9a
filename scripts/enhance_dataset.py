#!/usr/bin/env python
"""Build an enhanced nnU-Net raw dataset: real training cases + gem3d synthetic cases.

    python scripts/enhance_dataset.py --real nnUNet_raw/Dataset001_Brain \
        --synthetic OUT/icma OUT/ic --out nnUNet_raw/Dataset101_BrainGem3d

Synthetic folders hold ``<case>_s<k>_image.nii.gz`` / ``<case>_s<k>_label.nii.gz``; exported cases are
named ``<case>_<setting>_s<k>``. Exits with status 1 if the written dataset does not validate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gem3d.export.nnunet import validate_nnunet_dataset, write_nnunet_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", required=True, type=Path, help="nnU-Net raw dataset with the real training cases")
    parser.add_argument("--synthetic", nargs="*", default=[], type=Path, help="gem3d output folders OUT/<setting>")
    parser.add_argument("--out", required=True, type=Path, help="output folder, e.g. nnUNet_raw/Dataset101_Name")
    parser.add_argument("--name", default=None, help="dataset.json name (default: the output folder's name)")
    parser.add_argument("--link", action="store_true", help="symlink files instead of copying them")
    parser.add_argument("--channel", type=int, default=0, help="channel of the real dataset to keep (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = write_nnunet_dataset(
        args.real, args.synthetic, args.out, dataset_name=args.name, copy=not args.link,
        channel=args.channel, overwrite=args.overwrite,
    )
    problems = validate_nnunet_dataset(out)
    num_cases = len(list((out / "labelsTr").glob("*.nii.gz")))
    print(f"wrote {out} with {num_cases} training cases")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
