"""gem3d's one nnU-Net raw dataset check (the dataset checker, and the export's validation): one `Problem` per finding.
One tolerance, `AFFINE_ATOL_MM` (the loaders' own); one label rule, `parse_labels` (nnU-Net's)."""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from .case import AFFINE_ATOL_MM
from .geometry import Geometry
from .nnunet import REQUIRED_KEYS, parse_labels, resolve_channel

DATASET_FOLDER_PATTERN = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_\-]+$")

KINDS = ("folder_name", "dataset_json_missing", "dataset_json_invalid", "dataset_json_key_missing",
         "dataset_json_bad_labels", "num_training_mismatch", "no_training_cases", "image_missing", "label_missing",
         "channel_missing", "unreadable", "not_3d", "shape_mismatch", "affine_mismatch", "undeclared_label",
         "non_integer_label", "non_finite", "too_few_slices")


@dataclass(frozen=True)
class Problem:
    """One finding: kind (one of KINDS), case ("-" for the dataset), file (relative to the dataset), value."""

    kind: str
    case: str
    file: str
    value: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}; kinds are {KINDS}")

    def __str__(self) -> str:
        return f"{self.kind}: case={self.case} file={self.file} value={self.value}"


def _read(path: Path, case: str, report: Callable[[str, str, Path, str], None]) -> tuple[np.ndarray, Geometry] | None:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # corrupt / truncated / not NIfTI
        return report("unreadable", case, path, f"{type(exc).__name__}: {exc}")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        return report("not_3d", case, path, f"shape {tuple(data.shape)}")
    try:
        return data, Geometry(np.asarray(img.affine, dtype=np.float64), data.shape)
    except ValueError as exc:
        return report("unreadable", case, path, f"bad affine: {exc}")


def _check_json(root: Path, problems: list[Problem]) -> dict:
    def report(kind: str, value: str) -> dict:
        problems.append(Problem(kind, "-", "dataset.json", value))
        return {}

    path = root / "dataset.json"
    if not path.is_file():
        return report("dataset_json_missing", "absent")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return report("dataset_json_invalid", str(exc))
    if not isinstance(meta, dict):
        return report("dataset_json_invalid", f"top level is {type(meta).__name__}, not object")
    for key in (*REQUIRED_KEYS, "numTraining"):
        if key not in meta:
            report("dataset_json_key_missing", key)
    channels = meta.get("channel_names")
    if channels is not None and (not isinstance(channels, dict) or not channels
                                 or set(map(str, channels)) != {str(c) for c in range(len(channels))}):
        report("dataset_json_invalid", f"channel_names={channels!r} (keys must be 0..n-1)")
        meta.pop("channel_names")
    if "labels" in meta:
        try:
            meta["labels"] = parse_labels(meta["labels"], meta.get("regions_class_order"))
        except ValueError as exc:
            report("dataset_json_bad_labels", str(exc))
            meta.pop("labels")
    return meta


def _check_images(root: Path, split: str, meta: dict, min_slices: int, slice_axis: int,
                  problems: list[Problem], summary: dict) -> int:
    def report(kind: str, case: str, path: Path, value: str) -> None:
        problems.append(Problem(kind, case, str(path.relative_to(root)), value))

    ending = meta.get("file_ending", ".nii.gz")
    channels = sorted(int(c) for c in meta.get("channel_names", {"0": ""}) if str(c).isdigit()) or [0]
    labels = set(meta["labels"].values()) if "labels" in meta else None
    images_dir, labels_dir = root / f"images{split}", root / f"labels{split}"
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    by_case: dict[str, dict[int, Path]] = {}
    for p in sorted(images_dir.glob(f"*{ending}")):
        m = pattern.match(p.name)
        if m:
            by_case.setdefault(m.group(1), {})[int(m.group(2))] = p
    label_files = {p.name[: -len(ending)]: p for p in sorted(labels_dir.glob(f"*{ending}"))}
    if split == "Tr":
        for name in sorted(set(label_files) - set(by_case)):
            report("image_missing", name, images_dir / f"{name}_0000{ending}",
                   f"label {label_files[name].name} has no image")
    for name, files in sorted(by_case.items()):
        for c in channels:
            if c not in files:
                report("channel_missing", name, images_dir / f"{name}_{c:04d}{ending}",
                       f"channel {c} absent (channels {channels})")
        reads = [(p, _read(p, name, report)) for _, p in sorted(files.items())]
        reads = [(p, r) for p, r in reads if r is not None]
        for p, (data, _) in reads:
            if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
                report("non_finite", name, p, f"{int((~np.isfinite(data)).sum())} non-finite voxels")
        if reads:
            ref_path, (_, ref_geom) = reads[0]
            slices = Geometry(ref_geom.affine, ref_geom.shape, slice_axis).canonical_shape[0]
            summary["slices"].append(slices)
            summary["shapes"].add(ref_geom.shape)
            if slices < min_slices:
                report("too_few_slices", name, ref_path, f"{slices} slices < {min_slices} (slice axis {slice_axis})")
        label_path = label_files.get(name)
        if label_path is None and split == "Tr":
            report("label_missing", name, labels_dir / f"{name}{ending}", "absent")
        label_read = _read(label_path, name, report) if label_path is not None else None
        if label_read is not None:
            reads.append((label_path, label_read))
            data = label_read[0]
            if data.dtype.kind == "f" and (not np.all(np.isfinite(data)) or np.any(data != np.rint(data))):
                bad = data[~np.isfinite(data) | (data != np.rint(data))]
                report("non_integer_label", name, label_path, f"values such as {bad[:3].tolist()}")
            elif labels is not None:
                undeclared = sorted(set(np.unique(data).astype(int).tolist()) - labels)
                if undeclared:
                    report("undeclared_label", name, label_path,
                           f"{undeclared} not in dataset.json labels {sorted(labels)}")
        for p, (_, geom) in reads[1:]:  # other channels and the label vs the first image
            diff = float(np.abs(geom.affine - ref_geom.affine).max())
            if geom.shape != ref_geom.shape:
                report("shape_mismatch", name, p, f"{geom.shape} vs image {ref_geom.shape}")
            elif diff > AFFINE_ATOL_MM:
                report("affine_mismatch", name, p,
                       f"max |affine diff| {diff:.4g} mm > {AFFINE_ATOL_MM} vs {ref_path.name}")
    return len(by_case)


def check_dataset(dataset_dir: str | Path, min_slices: int = 16, slice_axis: int = 2, nnunet_name: bool = False,
                  summary: dict | None = None, channel: int | str | None = None) -> list[Problem]:
    """Check an nnU-Net raw dataset: dataset.json (labels by `parse_labels`, channel_names 0..n-1, numTraining);
    each case's image (every channel) and label present, on one grid (`AFFINE_ATOL_MM`); integer, declared label
    values; finite intensities; >= `min_slices` canonical slices; with `nnunet_name`, the DatasetNNN_Name folder
    name nnU-Net needs (gem3d reads any name); `channel` (index or name) must be one of channel_names (a ValueError
    naming the allowed ones otherwise: a wrong argument, not a problem of the dataset). Returns the
    problems found (empty = OK); fills `summary`, when given, with what it found: {num_training, num_test, labels,
    slices (per case), shapes, channel: (index, name) that gem3d will read, channel_names}."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    problems: list[Problem] = []
    if nnunet_name and not DATASET_FOLDER_PATTERN.match(root.resolve().name):
        problems.append(Problem("folder_name", "-", ".", f"{root.resolve().name!r} is not DatasetNNN_Name "
                                                       "(nnU-Net will not find it)"))
    meta = _check_json(root, problems)
    summary = {} if summary is None else summary
    summary.update(labels=meta.get("labels", {}), slices=[], shapes=set())
    channel_names = {str(k): str(v) for k, v in (meta.get("channel_names") or {}).items()}
    summary.update(channel_names=channel_names, channel=None)
    if channel_names:
        index = resolve_channel(channel_names, channel, where=str(root / "dataset.json"))
        summary["channel"] = (index, channel_names[str(index)])
    summary["num_training"] = _check_images(root, "Tr", meta, min_slices, slice_axis, problems, summary)
    summary["num_test"] = _check_images(root, "Ts", meta, min_slices, slice_axis, problems, summary)
    if summary["num_training"] == 0:
        absent = [f"{d}/ is missing" for d in ("imagesTr", "labelsTr") if not (root / d).is_dir()]
        problems.append(Problem("no_training_cases", "-", "imagesTr", "; ".join(["no <case>_0000 images", *absent])))
    n_declared = meta.get("numTraining")
    if n_declared is not None and n_declared != summary["num_training"]:
        problems.append(Problem("num_training_mismatch", "-", "dataset.json",
                                f"numTraining={n_declared!r} but imagesTr holds {summary['num_training']} cases"))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check an nnU-Net raw dataset for gem3d.")
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("--min-slices", type=int, default=16, help="slices a case needs for one window (16)")
    parser.add_argument("--slice-axis", type=int, default=2, choices=(0, 1, 2), help="RAS axis of the slices")
    parser.add_argument("--nnunet-name", action="store_true", help="require nnU-Net's DatasetNNN_Name folder name")
    parser.add_argument("--channel", help="the channel gem3d will read: index or channel name (default 0)")
    args = parser.parse_args(argv)
    summary = {}
    try:
        problems = check_dataset(args.dataset_dir, args.min_slices, args.slice_axis, args.nnunet_name, summary,
                                 channel=args.channel)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dataset_dir}")
        return 1
    slices = f"{min(summary['slices'])}..{max(summary['slices'])}" if summary["slices"] else "-"
    shapes = ", ".join(str(s) for s in sorted(summary["shapes"])[:4]) + (" ..." if len(summary["shapes"]) > 4 else "")
    print(f"OK {args.dataset_dir}: {summary['num_training']} training cases, {summary['num_test']} test cases, "
          f"labels {summary['labels']}, slices {slices}, shapes {shapes}")
    print(channel_line(summary, args.channel))
    return 0


def channel_line(summary: dict, chosen: str | None) -> str:
    """Which channel gem3d will read, and how to choose another."""
    if summary.get("channel") is None:
        return "channel: dataset.json has no channel_names; gem3d reads channel 0"
    index, name = summary["channel"]
    names = summary["channel_names"]
    how = "" if len(names) == 1 else (
        f" (of {len(names)}: {names}; " + ("as chosen)" if chosen is not None else
                                           "the default: choose with --channel / data.params.channel)"))
    return f"channel: gem3d will read channel {index} ({name!r}), files <case>_{index:04d}{how}"
