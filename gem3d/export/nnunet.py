"""nnU-Net v2 raw dataset export: real training cases + gem3d synthetic cases ("dataset enhancement").

Input layouts:

- real: an nnU-Net raw dataset (``dataset.json``, ``imagesTr/<case>_<cccc><ending>``, ``labelsTr/<case><ending>``).
- synthetic: gem3d output folders ``OUT/<setting>/`` holding ``<case>_s<k>_image.nii.gz`` and
  ``<case>_s<k>_label.nii.gz`` (the setting is the folder's name).

Output: ``imagesTr/<name>_0000.nii.gz``, ``labelsTr/<name>.nii.gz``, ``dataset.json`` (written last,
so a half-written export has none) and ``gem3d_sources.json`` (where each case came from).
Synthetic cases are named ``<case>_<setting>_s<k>``. The output has one channel: the real dataset's
channel ``channel`` (GEM-3D generates one modality, e.g. BraTS FLAIR).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from gem3d.files import atomic_path, atomic_write_json

__all__ = [
    "write_nnunet_dataset",
    "validate_nnunet_dataset",
    "find_synthetic_cases",
    "SyntheticCase",
    "DATASET_FOLDER_PATTERN",
    "SYNTHETIC_IMAGE_PATTERN",
]

DATASET_FOLDER_PATTERN = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_\-]+$")
SYNTHETIC_IMAGE_PATTERN = re.compile(r"^(?P<case>.+)_s(?P<sample>\d+)_image\.nii\.gz$")
OUTPUT_ENDING = ".nii.gz"


class SyntheticCase:
    """One generated sample on disk: ``image``/``label`` paths, source ``case``, ``setting``, ``sample`` index."""

    __slots__ = ("case", "setting", "sample", "image", "label")

    def __init__(self, case: str, setting: str, sample: int, image: Path, label: Path):
        self.case, self.setting, self.sample, self.image, self.label = case, setting, sample, image, label

    @property
    def name(self) -> str:
        """The case name in the exported dataset: ``<case>_<setting>_s<k>``."""
        return f"{self.case}_{self.setting}_s{self.sample}"

    def __repr__(self) -> str:
        return f"SyntheticCase({self.name!r}, image={str(self.image)!r})"


def find_synthetic_cases(folder: str | os.PathLike, setting: str | None = None) -> list[SyntheticCase]:
    """The ``<case>_s<k>_image.nii.gz`` / ``_label.nii.gz`` pairs in one gem3d output folder, sorted.

    ``setting`` defaults to the folder's name. An image without its label (or a label without its
    image) is an error that names the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"synthetic folder {folder} does not exist")
    setting = setting or folder.name
    if not re.fullmatch(r"[A-Za-z0-9\-]+", setting):
        raise ValueError(f"setting name {setting!r} (from {folder}) must be letters, digits or '-' so case names stay parseable")
    cases, unpaired = [], []
    for image in sorted(folder.glob("*_image.nii.gz")):
        match = SYNTHETIC_IMAGE_PATTERN.match(image.name)
        if match is None:
            unpaired.append(f"{image.name} (name is not <case>_s<k>_image.nii.gz)")
            continue
        label = image.with_name(image.name[: -len("_image.nii.gz")] + "_label.nii.gz")
        if not label.is_file():
            unpaired.append(f"{image.name} (no {label.name})")
            continue
        cases.append(SyntheticCase(match["case"], setting, int(match["sample"]), image, label))
    for label in sorted(folder.glob("*_label.nii.gz")):
        image = label.with_name(label.name[: -len("_label.nii.gz")] + "_image.nii.gz")
        if not image.is_file():
            unpaired.append(f"{label.name} (no {image.name})")
    if unpaired:
        raise ValueError(f"unpaired synthetic files in {folder}: {unpaired}")
    return sorted(cases, key=lambda c: (c.case, c.sample))


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not an nnU-Net raw dataset: {path} is missing")
    meta = json.loads(path.read_text(encoding="utf-8"))
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise ValueError(f"{path} lacks the required key {key!r} (has {sorted(meta)})")
    return meta


def _label_values(labels: dict[str, Any]) -> set[int]:
    """Integer label values declared in ``dataset.json['labels']`` (region lists flattened)."""
    values: set[int] = set()
    for name, value in labels.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, bool) or int(v) != v:
                raise ValueError(f"label {name!r} has a non-integer value {v!r}")
            values.add(int(v))
    return values


def _case_names(labels_dir: Path, ending: str) -> list[str]:
    return sorted(p.name[: -len(ending)] for p in labels_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))


def _transfer(src: Path, dst: Path, copy: bool) -> None:
    """Copy (or symlink) ``src`` to ``dst``; a ``.nii`` source is re-saved as ``.nii.gz`` with its header."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if src.name.endswith(OUTPUT_ENDING) == dst.name.endswith(OUTPUT_ENDING):
        if copy:
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        else:
            os.symlink(src.resolve(), dst)
        return
    image = nib.load(str(src))
    converted = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, header=image.header)
    with atomic_path(dst) as tmp:
        nib.save(converted, tmp)


def write_nnunet_dataset(
    real_dir: str | os.PathLike,
    synthetic_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    dataset_name: str | None = None,
    copy: bool = True,
    *,
    channel: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write an enhanced nnU-Net raw dataset (real training cases + every synthetic case) to ``out_dir``.

    - ``synthetic_dirs``: gem3d output folders ``OUT/<setting>`` (see ``find_synthetic_cases``).
    - ``dataset_name``: ``dataset.json['name']`` (default: ``out_dir``'s name; nnU-Net wants
      ``DatasetNNN_Name`` folders).
    - ``copy``: copy files (default) or symlink them (absolute links).
    - ``channel``: the real dataset's channel kept as ``_0000``.
    - ``overwrite``: replace an existing export in ``out_dir`` (its imagesTr/labelsTr/dataset.json).
    Returns ``out_dir``.
    """
    real_dir, out_dir = Path(real_dir), Path(out_dir)
    if isinstance(synthetic_dirs, (str, os.PathLike)):
        synthetic_dirs = [synthetic_dirs]
    meta = _read_dataset_json(real_dir)
    ending = meta["file_ending"]
    if ending not in (".nii.gz", ".nii"):
        raise ValueError(f"real dataset file_ending {ending!r} is not supported; gem3d exports NIfTI ('.nii.gz' or '.nii')")
    channel_names = {str(k): v for k, v in meta["channel_names"].items()}
    if str(channel) not in channel_names:
        raise ValueError(f"channel {channel} is not in the real dataset's channel_names {channel_names}")
    if out_dir.resolve() == real_dir.resolve():
        raise ValueError(f"out_dir {out_dir} must differ from the real dataset {real_dir}")

    images_out, labels_out = out_dir / "imagesTr", out_dir / "labelsTr"
    existing = [p for p in (out_dir / "dataset.json", images_out, labels_out) if p.exists()]
    if existing:
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds an export ({[p.name for p in existing]}); pass overwrite=True to replace it")
        (out_dir / "dataset.json").unlink(missing_ok=True)
        for folder in (images_out, labels_out):
            if folder.exists():
                shutil.rmtree(folder)
    images_out.mkdir(parents=True, exist_ok=True)
    labels_out.mkdir(parents=True, exist_ok=True)

    sources: dict[str, dict[str, Any]] = {}
    real_cases = _case_names(real_dir / "labelsTr", ending)
    if not real_cases:
        raise ValueError(f"no training labels ending with {ending!r} in {real_dir / 'labelsTr'}")
    for case in real_cases:
        image = real_dir / "imagesTr" / f"{case}_{channel:04d}{ending}"
        label = real_dir / "labelsTr" / f"{case}{ending}"
        if not image.is_file():
            raise FileNotFoundError(f"real case {case!r} has a label but no image {image}")
        _transfer(image, images_out / f"{case}_0000{OUTPUT_ENDING}", copy)
        _transfer(label, labels_out / f"{case}{OUTPUT_ENDING}", copy)
        sources[case] = {"kind": "real", "image": str(image), "label": str(label)}

    for folder in synthetic_dirs:
        for item in find_synthetic_cases(folder):
            if item.name in sources:
                raise ValueError(f"synthetic case name {item.name!r} from {item.image} collides with an existing case ({sources[item.name]})")
            _transfer(item.image, images_out / f"{item.name}_0000{OUTPUT_ENDING}", copy)
            _transfer(item.label, labels_out / f"{item.name}{OUTPUT_ENDING}", copy)
            sources[item.name] = {
                "kind": "synthetic",
                "case": item.case,
                "setting": item.setting,
                "sample": item.sample,
                "image": str(item.image),
                "label": str(item.label),
            }

    out_meta = {k: v for k, v in meta.items() if k not in ("numTraining", "file_ending", "channel_names", "name")}
    num_synthetic = sum(1 for s in sources.values() if s["kind"] == "synthetic")
    out_meta.update(
        name=dataset_name or out_dir.name,
        channel_names={"0": channel_names[str(channel)]},
        labels=meta["labels"],
        numTraining=len(sources),
        file_ending=OUTPUT_ENDING,
        description=(
            f"{meta.get('name', real_dir.name)} enhanced by gem3d: {len(real_cases)} real + {num_synthetic} synthetic training cases"
        ),
    )
    atomic_write_json(out_dir / "gem3d_sources.json", {"real_dataset": str(real_dir), "cases": sources})
    atomic_write_json(out_dir / "dataset.json", out_meta)
    return out_dir


def validate_nnunet_dataset(
    root: str | os.PathLike,
    check_labels: bool = True,
    check_geometry: bool = True,
    atol: float = 1e-4,
) -> list[str]:
    """Problems that would stop nnU-Net v2 from training on the raw dataset at ``root`` (empty = valid).

    Checks: folder name ``DatasetNNN_Name``; ``dataset.json`` keys; every label has one image per
    channel and every image a label; ``numTraining``; label values declared in ``labels`` (when
    ``check_labels``); image and label shapes and affines agree (when ``check_geometry``, affines to ``atol``).
    """
    root = Path(root)
    problems: list[str] = []
    if not root.is_dir():
        return [f"{root} is not a folder"]
    if not DATASET_FOLDER_PATTERN.match(root.name):
        problems.append(f"folder name {root.name!r} does not match DatasetNNN_Name (nnU-Net will not find it)")
    try:
        meta = _read_dataset_json(root)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        return problems + [f"dataset.json: {err}"]
    ending = meta["file_ending"]
    channels = sorted(int(k) for k in meta["channel_names"])
    if channels != list(range(len(channels))) or not channels:
        problems.append(f"channel_names keys must be 0..n-1, got {sorted(meta['channel_names'])}")
    try:
        declared = _label_values(meta["labels"])
    except (TypeError, ValueError) as err:
        problems.append(f"labels: {err}")
        declared = set()
    if 0 not in declared:
        problems.append(f"labels must declare background = 0, got {meta['labels']}")
    if sorted(declared) != list(range(len(declared))):
        problems.append(f"label values must be consecutive from 0, got {sorted(declared)}")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            problems.append(f"{folder.name}/ is missing")
    if problems and not (images_dir.is_dir() and labels_dir.is_dir()):
        return problems

    cases = _case_names(labels_dir, ending)
    stray_labels = sorted(p.name for p in labels_dir.iterdir() if not p.name.endswith(ending) and not p.name.startswith("."))
    if stray_labels:
        problems.append(f"labelsTr holds files without the ending {ending!r}: {stray_labels[:5]}")
    if meta.get("numTraining") != len(cases):
        problems.append(f"numTraining is {meta.get('numTraining')!r} but labelsTr holds {len(cases)} cases")
    expected_images = {f"{case}_{c:04d}{ending}": case for case in cases for c in channels}
    present_images = {p.name for p in images_dir.iterdir() if not p.name.startswith(".")}
    missing = sorted(set(expected_images) - present_images)
    if missing:
        problems.append(f"{len(missing)} image(s) missing from imagesTr, e.g. {missing[:5]}")
    orphans = sorted(present_images - set(expected_images))
    if orphans:
        problems.append(f"{len(orphans)} image(s) in imagesTr without a label (or with a wrong name), e.g. {orphans[:5]}")

    for case in cases:
        label_path = labels_dir / f"{case}{ending}"
        try:
            label_img = nib.load(str(label_path))
        except Exception as err:  # noqa: BLE001 - report any unreadable file
            problems.append(f"{case}: cannot read label {label_path.name}: {err}")
            continue
        if check_labels:
            values = set(int(v) for v in np.unique(np.asanyarray(label_img.dataobj)))
            undeclared = sorted(values - declared)
            if undeclared:
                problems.append(f"{case}: label values {undeclared} are not declared in dataset.json labels {sorted(declared)}")
        if not check_geometry:
            continue
        for c in channels:
            image_path = images_dir / f"{case}_{c:04d}{ending}"
            if not image_path.is_file():
                continue
            try:
                image_img = nib.load(str(image_path))
            except Exception as err:  # noqa: BLE001
                problems.append(f"{case}: cannot read image {image_path.name}: {err}")
                continue
            if image_img.shape[:3] != label_img.shape[:3]:
                problems.append(f"{case}: image {image_path.name} shape {image_img.shape} != label shape {label_img.shape}")
            elif not np.allclose(image_img.affine, label_img.affine, atol=atol):
                diff = float(np.abs(image_img.affine - label_img.affine).max())
                problems.append(f"{case}: image {image_path.name} affine differs from the label's (max difference {diff:.3g})")
    return problems

