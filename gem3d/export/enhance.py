"""Build an enhanced nnU-Net raw dataset: real training cases + gem3d synthetic cases.

    python scripts/enhance_dataset.py --real nnUNet_raw/Dataset001_Brain \\
        --synthetic OUT/icma OUT/ic --out nnUNet_raw/Dataset101_BrainGem3d [--min-dice 0.7]

Synthetic folders hold ``<case>_s<k>_image.nii.gz`` / ``<case>_s<k>_label.nii.gz``; exported cases are named
``<case>_<setting>_s<k>``. With ``--min-dice``, only the synthetic cases whose segmenter labels agree with their
conditioning mask by at least that mean Dice (over the labels the mask holds) are kept (FreeTumor's filter); the
segmenter is ``--segmenter TRAINED_FOLDER`` (a gem3d segmenter folder of either backend, or a trained nnU-Net model
folder) or, by default, one trained on the real training cases (``--segmenter-backend`` etc., cached in
``--segmenter-cache``, default ``<out's parent>/gem3d_segmenter_cache``); ``quality_filter.json`` lists every score.
Exits with status 1 if the written dataset does not validate, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gem3d.export.nnunet import find_synthetic_cases, validate_nnunet_dataset, write_nnunet_dataset
from gem3d.files import atomic_write_json
from gem3d.metrics.evaluation import add_segmenter_arguments, check_segmenter_arguments, quality_filter


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
    parser.add_argument("--body", default="nonzero", choices=("nonzero", "none"),
                        help="nonzero (MRI): volumes are set to 0 outside the body before segmenting; none (CT)")
    add_segmenter_arguments(parser, "<out's parent>/gem3d_segmenter_cache")
    parser.add_argument("--device", dest="segmenter_device", help="the same as --segmenter-device")
    args = parser.parse_args(argv)
    check_segmenter_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/enhance_dataset.py``; returns the exit status (0 written and valid, 1 invalid,
    2 bad input)."""
    args = parse_args(argv)
    try:
        keep = report = None
        if args.min_dice is not None:
            cases = [c for folder in args.synthetic for c in find_synthetic_cases(folder)]
            cache = args.segmenter_cache or args.out.parent / "gem3d_segmenter_cache"
            report = quality_filter(args.real, cases, args.min_dice, args, cache, body=args.body)
            print(f"quality filter: dropped {len(report['dropped'])} of {len(report['dice'])} synthetic cases "
                  f"(mean Dice < {args.min_dice})")
            keep = lambda case: case.name not in report["dropped"]  # noqa: E731
        out = write_nnunet_dataset(args.real, args.synthetic, args.out, dataset_name=args.name, copy=not args.link,
                                   channel=args.channel, overwrite=args.overwrite, keep=keep)
        if report is not None:
            atomic_write_json(out / "quality_filter.json", report)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = validate_nnunet_dataset(out)
    print(f"wrote {out} with {len(list((out / 'labelsTr').glob('*.nii.gz')))} training cases")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0

