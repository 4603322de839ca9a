"""gem3d's one nnU-Net raw dataset check (the dataset checker, and the export's validation): one `Problem` per finding.
One tolerance, `AFFINE_ATOL_MM` (the loaders' own); one label rule, `parse_labels` (nnU-Net's)."""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .case import AFFINE_ATOL_MM, affine_difference
from .geometry import Geometry
from .nnunet import REQUIRED_KEYS, parse_labels

DATASET_FOLDER_PATTERN = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_\-]+$")

# problem kinds
FOLDER_NAME = "folder_name"
JSON_MISSING = "dataset_json_missing"
JSON_INVALID = "dataset_json_invalid"
JSON_KEY_MISSING = "dataset_json_key_missing"
JSON_BAD_LABELS = "dataset_json_bad_labels"
NUM_TRAINING = "num_training_mismatch"
NO_CASES = "no_training_cases"
IMAGE_MISSING = "image_missing"
LABEL_MISSING = "label_missing"
CHANNEL_MISSING = "channel_missing"
UNREADABLE = "unreadable"
NOT_3D = "not_3d"
SHAPE_MISMATCH = "shape_mismatch"
AFFINE_MISMATCH = "affine_mismatch"
UNDECLARED_LABEL = "undeclared_label"
NON_INTEGER_LABEL = "non_integer_label"
NON_FINITE = "non_finite"
TOO_FEW_SLICES = "too_few_slices"
KINDS = (FOLDER_NAME, JSON_MISSING, JSON_INVALID, JSON_KEY_MISSING, JSON_BAD_LABELS, NUM_TRAINING, NO_CASES,
         IMAGE_MISSING, LABEL_MISSING, CHANNEL_MISSING, UNREADABLE, NOT_3D, SHAPE_MISMATCH, AFFINE_MISMATCH,
         UNDECLARED_LABEL, NON_INTEGER_LABEL, NON_FINITE, TOO_FEW_SLICES)


@dataclass(frozen=True)
class Problem:
    """One finding: kind (one of KINDS), case ("-" for the dataset), file (relative to the dataset), value."""

    kind: str
    case: str
    file: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}: case={self.case} file={self.file} value={self.value}"


def _read(path: Path, root: Path, case: str, problems: list[Problem]) -> tuple[np.ndarray, Geometry] | None:
    rel = str(path.relative_to(root))
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # corrupt / truncated / not NIfTI
        problems.append(Problem(UNREADABLE, case, rel, f"{type(exc).__name__}: {exc}"))
        return None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        problems.append(Problem(NOT_3D, case, rel, f"shape {tuple(data.shape)}"))
        return None
    try:
        geometry = Geometry(np.asarray(img.affine, dtype=np.float64), data.shape)
    except ValueError as exc:
        problems.append(Problem(UNREADABLE, case, rel, f"bad affine: {exc}"))
        return None
    return data, geometry


def _check_json(root: Path, problems: list[Problem]) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        problems.append(Problem(JSON_MISSING, "-", "dataset.json", "absent"))
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(Problem(JSON_INVALID, "-", "dataset.json", str(exc)))
        return {}
    if not isinstance(meta, dict):
        problems.append(Problem(JSON_INVALID, "-", "dataset.json", f"top level is {type(meta).__name__}, not object"))
        return {}
    for key in (*REQUIRED_KEYS, "numTraining"):
        if key not in meta:
            problems.append(Problem(JSON_KEY_MISSING, "-", "dataset.json", key))
    channels = meta.get("channel_names")
    if channels is not None and (not isinstance(channels, dict) or not channels
                                 or set(map(str, channels)) != {str(c) for c in range(len(channels))}):
        problems.append(Problem(JSON_INVALID, "-", "dataset.json", f"channel_names={channels!r} (keys must be 0..n-1)"))
        meta.pop("channel_names")
    if "labels" in meta:
        try:
            meta["labels"] = parse_labels(meta["labels"], meta.get("regions_class_order"))
        except ValueError as exc:
            problems.append(Problem(JSON_BAD_LABELS, "-", "dataset.json", str(exc)))
            meta.pop("labels")
    return meta


def _check_images(root: Path, split: str, meta: dict, min_slices: int, slice_axis: int,
                  problems: list[Problem], summary: dict) -> int:
    ending = meta.get("file_ending", ".nii.gz")
    channels = sorted(int(c) for c in meta.get("channel_names", {"0": ""}) if str(c).isdigit()) or [0]
    labels = set(meta["labels"].values()) if "labels" in meta else None
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    by_case: dict[str, dict[int, Path]] = {}
    for p in sorted((root / f"images{split}").glob(f"*{ending}")):
        m = pattern.match(p.name)
        if m:
            by_case.setdefault(m.group(1), {})[int(m.group(2))] = p
    label_files = {p.name[: -len(ending)]: p for p in sorted((root / f"labels{split}").glob(f"*{ending}"))}
    if split == "Tr":
        for name in sorted(set(label_files) - set(by_case)):
            problems.append(Problem(IMAGE_MISSING, name, f"images{split}/{name}_0000{ending}",
                                    f"label {label_files[name].name} has no image"))
    for name, files in sorted(by_case.items()):
        for c in channels:
            if c not in files:
                problems.append(Problem(CHANNEL_MISSING, name, f"images{split}/{name}_{c:04d}{ending}",
                                        f"channel {c} absent (channels {channels})"))
        reads = [(p, _read(p, root, name, problems)) for _, p in sorted(files.items())]
        reads = [(p, r) for p, r in reads if r is not None]
        for p, (data, _) in reads:
            if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
                n_bad = int((~np.isfinite(data)).sum())
                problems.append(Problem(NON_FINITE, name, str(p.relative_to(root)), f"{n_bad} non-finite voxels"))
        if reads:
            ref_path, (_, ref_geom) = reads[0]
            slices = Geometry(ref_geom.affine, ref_geom.shape, slice_axis).canonical_shape[0]
            summary["slices"].append(slices)
            summary["shapes"].add(ref_geom.shape)
            if slices < min_slices:
                problems.append(Problem(TOO_FEW_SLICES, name, str(ref_path.relative_to(root)),
                                        f"{slices} slices < {min_slices} (slice axis {slice_axis})"))
        label_path = label_files.get(name)
        if label_path is None and split == "Tr":
            problems.append(Problem(LABEL_MISSING, name, f"labels{split}/{name}{ending}", "absent"))
        label_read = _read(label_path, root, name, problems) if label_path is not None else None
        if label_read is not None:
            reads.append((label_path, label_read))
            data, rel = label_read[0], str(label_path.relative_to(root))
            if data.dtype.kind == "f" and (not np.all(np.isfinite(data)) or np.any(data != np.rint(data))):
                bad = data[~np.isfinite(data) | (data != np.rint(data))]
                problems.append(Problem(NON_INTEGER_LABEL, name, rel, f"values such as {bad[:3].tolist()}"))
            elif labels is not None:
                undeclared = sorted(set(np.unique(data).astype(int).tolist()) - labels)
                if undeclared:
                    problems.append(Problem(UNDECLARED_LABEL, name, rel,
                                            f"{undeclared} not in dataset.json labels {sorted(labels)}"))
        for p, (_, geom) in reads[1:]:  # other channels and the label vs the first image
            diff = affine_difference(geom.affine, ref_geom.affine)
            if geom.shape != ref_geom.shape:
                problems.append(Problem(SHAPE_MISMATCH, name, str(p.relative_to(root)),
                                        f"{geom.shape} vs image {ref_geom.shape}"))
            elif diff > AFFINE_ATOL_MM:
                problems.append(Problem(AFFINE_MISMATCH, name, str(p.relative_to(root)),
                                        f"max |affine diff| {diff:.4g} mm > {AFFINE_ATOL_MM} vs {ref_path.name}"))
    return len(by_case)


def check_dataset_with_summary(dataset_dir: str | Path, min_slices: int = 16, slice_axis: int = 2,
                               nnunet_name: bool = False) -> tuple[list[Problem], dict]:
    """`check_dataset` plus what it found: {num_training, num_test, labels, slices (per case), shapes}."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    problems: list[Problem] = []
    if nnunet_name and not DATASET_FOLDER_PATTERN.match(root.resolve().name):
        problems.append(Problem(FOLDER_NAME, "-", ".", f"{root.resolve().name!r} is not DatasetNNN_Name "
                                                       "(nnU-Net will not find it)"))
    meta = _check_json(root, problems)
    summary = {"labels": meta.get("labels", {}), "slices": [], "shapes": set()}
    summary["num_training"] = _check_images(root, "Tr", meta, min_slices, slice_axis, problems, summary)
    summary["num_test"] = _check_images(root, "Ts", meta, min_slices, slice_axis, problems, summary)
    if summary["num_training"] == 0:
        absent = [f"{d}/ is missing" for d in ("imagesTr", "labelsTr") if not (root / d).is_dir()]
        problems.append(Problem(NO_CASES, "-", "imagesTr", "; ".join(["no <case>_0000 images", *absent])))
    n_declared = meta.get("numTraining")
    if n_declared is not None and n_declared != summary["num_training"]:
        problems.append(Problem(NUM_TRAINING, "-", "dataset.json",
                                f"numTraining={n_declared!r} but imagesTr holds {summary['num_training']} cases"))
    return problems, summary


def check_dataset(dataset_dir: str | Path, min_slices: int = 16, slice_axis: int = 2,
                  nnunet_name: bool = False) -> list[Problem]:
    """Check an nnU-Net raw dataset: dataset.json (labels by `parse_labels`, channel_names 0..n-1, numTraining);
    each case's image (every channel) and label present, on one grid (`AFFINE_ATOL_MM`); integer, declared label
    values; finite intensities; >= `min_slices` canonical slices; with `nnunet_name`, the DatasetNNN_Name folder
    name nnU-Net needs (gem3d reads any name). Returns the problems found (empty = OK)."""
    return check_dataset_with_summary(dataset_dir, min_slices, slice_axis, nnunet_name)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check an nnU-Net raw dataset for gem3d.")
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--min-slices", type=int, default=16, help="slices a case needs for one window (16)")
    parser.add_argument("--slice-axis", type=int, default=2, choices=(0, 1, 2), help="RAS axis of the slices")
    parser.add_argument("--nnunet-name", action="store_true", help="require nnU-Net's DatasetNNN_Name folder name")
    args = parser.parse_args(argv)
    problems, summary = check_dataset_with_summary(args.dataset_dir, args.min_slices, args.slice_axis,
                                                   args.nnunet_name)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dataset_dir}")
        return 1
    slices = f"{min(summary['slices'])}..{max(summary['slices'])}" if summary["slices"] else "-"
    shapes = ", ".join(str(s) for s in sorted(summary["shapes"])[:4]) + (" ..." if len(summary["shapes"]) > 4 else "")
    print(f"OK {args.dataset_dir}: {summary['num_training']} training cases, {summary['num_test']} test cases, "
          f"labels {summary['labels']}, slices {slices}, shapes {shapes}")
    return 0
