"""nnU-Net v2 datasets: raw (`dataset.json`, `imagesTr/<case>_0000.nii.gz`, `labelsTr/<case>.nii.gz`, `imagesTs`)
and preprocessed (`<Dataset>/nnUNetPlans_3d_fullres/<case>.npz` with `data` (C, D, H, W) and `seg` (1, D, H, W))."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .case import Case, labels_as_int16, load_case
from .geometry import Geometry

SPLITS = ("Tr", "Ts")
REQUIRED_KEYS = ("channel_names", "labels", "file_ending")
DEFAULT_PLANS = "nnUNetPlans_3d_fullres"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def read_dataset_json(root: str | Path) -> dict:
    """Parse and validate `<root>/dataset.json` (keys channel_names, labels, file_ending; int labels)."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset.json in {root}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise KeyError(f"{path} lacks {missing}; required keys are {list(REQUIRED_KEYS)}")
    parse_labels(meta["labels"], where=str(path))
    return meta


def parse_labels(labels: dict, where: str = "dataset.json") -> dict[str, int]:
    """dataset.json `labels` (name -> int) -> validated dict; region-based (list) labels are refused."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{where}: 'labels' must be a non-empty object name -> int, got {labels!r}")
    out = {}
    for key, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
            raise ValueError(f"{where}: label {key!r} must be an int (region-based labels unsupported), got {value!r}")
        out[str(key)] = int(value)
    values = sorted(out.values())
    if len(set(values)) != len(values):
        raise ValueError(f"{where}: label values must be unique, got {out}")
    if 0 not in values or min(values) < 0:
        raise ValueError(f"{where}: labels must include background 0 and be >= 0, got {out}")
    return out


class RawDataset:
    """An nnU-Net v2 raw dataset folder (`root` holds dataset.json, imagesTr, labelsTr, optional imagesTs/labelsTs)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        self.dataset_json = read_dataset_json(self.root)
        self.labels: dict[str, int] = parse_labels(self.dataset_json["labels"])
        self.file_ending: str = self.dataset_json["file_ending"]
        self.channel_names: dict[str, str] = {str(k): v for k, v in self.dataset_json["channel_names"].items()}
        for split in SPLITS:
            labels_dir, images = self.root / f"labels{split}", set(self.case_names(split))
            stray = sorted(p.name for p in labels_dir.glob(f"*{self.file_ending}") if p.name[: -len(self.file_ending)] not in images)
            if stray:
                raise ValueError(f"{labels_dir}: {stray[:3]} have no image (expected images{split}/<case>_0000"
                                 f"{self.file_ending}); remove these labels or add their images")

    @property
    def max_label(self) -> int:
        return max(self.labels.values())

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def case_names(self, split: str = "Tr") -> list[str]:
        """Sorted case names: files `images<split>/<case>_0000<file_ending>`."""
        folder = self.root / f"images{_check_split(split)}"
        if not folder.is_dir():
            return []
        suffix = "_0000" + self.file_ending
        return sorted(p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix))

    def image_path(self, name: str, split: str = "Tr", channel: int = 0) -> Path:
        return self.root / f"images{_check_split(split)}" / f"{name}_{channel:04d}{self.file_ending}"

    def label_path(self, name: str, split: str = "Tr") -> Path:
        return self.root / f"labels{_check_split(split)}" / f"{name}{self.file_ending}"

    def load_case(self, name: str, split: str = "Tr", slice_axis: int = 2, channel: int = 0) -> Case:
        """Read one case; the label is required for "Tr" and optional for "Ts"."""
        if str(channel) not in self.channel_names:
            raise ValueError(f"channel {channel} not in dataset.json channel_names {self.channel_names}")
        image_path = self.image_path(name, split, channel)
        if not image_path.is_file():
            raise FileNotFoundError(f"image for case {name!r} not found: {image_path}")
        label_path = self.label_path(name, split)
        if not label_path.is_file():
            if split == "Tr":
                raise FileNotFoundError(f"label for training case {name!r} not found: {label_path}")
            label_path = None
        case = load_case(image_path, label_path, name=name, slice_axis=slice_axis)
        if case.label is not None:
            undeclared = sorted(set(np.unique(case.label).tolist()) - set(self.labels.values()))
            if undeclared:
                raise ValueError(
                    f"case {name!r}: label values {undeclared} are not declared in dataset.json labels {self.labels}"
                )
        return case

    def __repr__(self) -> str:
        return f"RawDataset({str(self.root)!r}, cases={len(self.case_names())}, labels={self.labels})"


def read_preprocessed_case(
    npz_path: str | Path, channel: int = 0, name: str | None = None, slice_axis: int = 0
) -> Case:
    """nnU-Net v2 preprocessed case (`.npz` with `data` (C, D, H, W), `seg` (1, D, H, W); or the unpacked pair
    `<case>.npy` + `<case>_seg.npy`) -> Case with an identity geometry (array axis `slice_axis` becomes the slice
    axis; 0 = nnU-Net's first axis) and seg -1 kept (outside the body)."""
    path = Path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"preprocessed case not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as npz:
            if "data" not in npz.files:
                raise KeyError(f"{path} lacks 'data'; holds {npz.files}")
            data = np.asarray(npz["data"])
            seg = np.asarray(npz["seg"]) if "seg" in npz.files else None
    elif path.suffix == ".npy":
        data = np.load(path)
        seg_path = path.with_name(path.stem + "_seg.npy")
        seg = np.load(seg_path) if seg_path.is_file() else None
    else:
        raise ValueError(f"preprocessed case must be .npz or .npy, got {path.name}")
    if data.ndim != 4:
        raise ValueError(f"{path}: 'data' must be (C, D, H, W), got shape {data.shape}")
    if not 0 <= channel < data.shape[0]:
        raise ValueError(f"{path}: channel {channel} out of range, data has {data.shape[0]} channels")
    image = np.ascontiguousarray(data[channel], dtype=np.float32)
    label = None
    if seg is not None:
        if seg.ndim != 4 or seg.shape[0] != 1 or seg.shape[1:] != data.shape[1:]:
            raise ValueError(f"{path}: 'seg' must be (1, {', '.join(map(str, data.shape[1:]))}), got {seg.shape}")
        label = labels_as_int16(seg[0], where=str(path))
    geometry = Geometry.identity(image.shape, slice_axis=slice_axis)
    if label is not None:
        label = geometry.to_canonical(label)
    return Case(name=name or path.stem, image=geometry.to_canonical(image), label=label, geometry=geometry,
                image_path=path, label_path=path)


class PreprocessedDataset:
    """An nnU-Net v2 preprocessed dataset: `root` is `<Dataset>` (holding `<plans>/`) or the `<plans>` folder itself."""

    def __init__(self, root: str | Path, plans: str = DEFAULT_PLANS):
        root = Path(root)
        folder = root / plans if (root / plans).is_dir() else root
        if not any(folder.glob("*.npz")) and not any(folder.glob("*.npy")):
            raise FileNotFoundError(f"no nnU-Net preprocessed cases (*.npz / *.npy) in {folder}")
        self.root = root
        self.folder = folder
        json_path = next((p / "dataset.json" for p in (root, folder, folder.parent) if (p / "dataset.json").is_file()),
                         None)
        self.dataset_json = json.loads(json_path.read_text()) if json_path else {}
        self.labels = parse_labels(self.dataset_json["labels"]) if "labels" in self.dataset_json else None
        self.file_ending = ".npz"

    @property
    def max_label(self) -> int | None:
        return max(self.labels.values()) if self.labels else None

    def case_names(self, split: str = "Tr") -> list[str]:
        if _check_split(split) == "Ts":
            return []
        names = {p.stem for p in self.folder.glob("*.npz")}
        names |= {p.stem for p in self.folder.glob("*.npy") if not p.stem.endswith("_seg")}
        return sorted(names)

    def image_path(self, name: str, split: str = "Tr") -> Path:
        npz = self.folder / f"{name}.npz"
        return npz if npz.is_file() else self.folder / f"{name}.npy"

    label_path = image_path

    def load_case(self, name: str, split: str = "Tr", slice_axis: int = 2, channel: int = 0) -> Case:
        """nnU-Net keeps arrays in (z, y, x) order, so RAS axis `slice_axis` is array axis `2 - slice_axis`
        (the default, axial, is array axis 0: the canonical array is the stored array)."""
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be one of (0, 1, 2), got {slice_axis!r}")
        return read_preprocessed_case(self.image_path(name, split), channel=channel, name=name,
                                      slice_axis=2 - slice_axis)


def open_dataset(root: str | Path, plans: str = DEFAULT_PLANS) -> RawDataset | PreprocessedDataset:
    """RawDataset when `root` has imagesTr, else PreprocessedDataset."""
    root = Path(root)
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return RawDataset(root)
    if (root / plans).is_dir() or any(root.glob("*.npz")):
        return PreprocessedDataset(root, plans)
    raise FileNotFoundError(
        f"{root} is neither an nnU-Net raw dataset (imagesTr/, dataset.json) nor a preprocessed one ({plans}/*.npz)"
    )
