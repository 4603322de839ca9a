#!/usr/bin/env python
"""Build an enhanced nnU-Net raw dataset: real training cases + gem3d synthetic cases.

    python scripts/enhance_dataset.py --real nnUNet_raw/Dataset001_Brain \
        --synthetic OUT/icma OUT/ic --out nnUNet_raw/Dataset101_BrainGem3d [--min-dice 0.7 --segmenter NNUNET_MODEL]

Synthetic folders hold ``<case>_s<k>_image.nii.gz`` / ``<case>_s<k>_label.nii.gz``; exported cases are named
``<case>_<setting>_s<k>``. With ``--min-dice``, only the synthetic cases whose nnU-Net prediction (``--segmenter``:
a trained nnU-Net model folder; needs nnunetv2, see ENVIRONMENT.md) agrees with their conditioning mask by at
least that mean Dice are kept (FreeTumor's filter); ``quality_filter.json`` lists every score. Exits with status 1
if the written dataset does not validate, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gem3d.data.nnunet import read_dataset_json
from gem3d.export.nnunet import find_synthetic_cases, validate_nnunet_dataset, write_nnunet_dataset
from gem3d.files import atomic_write_json
from gem3d.metrics.labels import segmenter_agreement


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", required=True, type=Path, help="nnU-Net raw dataset with the real training cases")
    parser.add_argument("--synthetic", nargs="*", default=[], type=Path, help="gem3d output folders OUT/<setting>")
    parser.add_argument("--out", required=True, type=Path, help="output folder, e.g. nnUNet_raw/Dataset101_Name")
    parser.add_argument("--name", default=None, help="dataset.json name (default: the output folder's name)")
    parser.add_argument("--link", action="store_true", help="symlink files instead of copying them")
    parser.add_argument("--channel", help="channel of the real dataset to export: index or name (required when the "
                                           "dataset has several)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    parser.add_argument("--min-dice", type=float, help="keep synthetic cases whose segmenter Dice is at least this")
    parser.add_argument("--segmenter", type=Path, help="trained nnU-Net model folder for --min-dice")
    parser.add_argument("--device", default="cpu", help="device of the segmenter (cpu, cuda)")
    return parser.parse_args(argv)


def quality_filter(args: argparse.Namespace):
    """``(keep rule, report)`` of ``--min-dice`` (``(None, None)`` without it)."""
    if args.min_dice is None:
        return None, None
    if args.segmenter is None or not 0.0 <= args.min_dice <= 1.0:
        raise ValueError(f"--min-dice {args.min_dice} needs a value in [0, 1] and --segmenter NNUNET_MODEL_FOLDER")
    cases = [c for folder in args.synthetic for c in find_synthetic_cases(folder)]
    num_labels = max(int(v) for v in read_dataset_json(args.real)["labels"].values() if not isinstance(v, list))
    dice = segmenter_agreement(args.segmenter, cases, num_labels, device=args.device)
    dropped = sorted(name for name, d in dice.items() if not d >= args.min_dice)
    print(f"quality filter: dropped {len(dropped)} of {len(dice)} synthetic cases (mean Dice < {args.min_dice})")
    report = {"min_dice": args.min_dice, "segmenter": str(args.segmenter), "dice": dice, "dropped": dropped}
    return (lambda case: case.name not in dropped), report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        keep, report = quality_filter(args)
        out = write_nnunet_dataset(args.real, args.synthetic, args.out, dataset_name=args.name, copy=not args.link,
                                   channel=args.channel, overwrite=args.overwrite, keep=keep)
        if report is not None:
            atomic_write_json(out / "quality_filter.json", report)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = validate_nnunet_dataset(out)
    num_cases = len(list((out / "labelsTr").glob("*.nii.gz")))
    print(f"wrote {out} with {num_cases} training cases")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
