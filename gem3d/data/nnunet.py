"""nnU-Net v2 datasets: raw (`dataset.json`, `imagesTr/<case>_0000.nii.gz`, `labelsTr/<case>.nii.gz`, `imagesTs`)
and preprocessed (`<Dataset>/nnUNetPlans_3d_fullres/<case>.{b2nd,npz,npy}` + `<case>.pkl` with its geometry)."""
from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import nibabel as nib
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
    """Parse and validate `<root>/dataset.json` (keys channel_names, labels, file_ending; labels by `parse_labels`)."""
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
    parse_labels(meta["labels"], meta.get("regions_class_order"), where=str(path))
    return meta


def parse_labels(labels: dict, regions_class_order=None, where: str = "dataset.json") -> dict[str, int]:
    """dataset.json `labels` -> {name: its value in label maps}, by nnU-Net v2's rule: plain labels are ints;
    region-based ones (lists of ints, e.g. BraTS) take value regions_class_order[i] for region i (in file order,
    background and "ignore" apart). Values must be unique and consecutive from background 0."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{where}: 'labels' must be a non-empty object name -> int (or list of ints), got {labels!r}")
    named = {}
    for key, value in labels.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).isdigit()
                             for v in values):
            raise ValueError(f"{where}: label {key!r} must be an int >= 0 or a list of them (a region), got {value!r}")
        named[str(key)] = [int(v) for v in values]
    out = {k: v[0] for k, v in named.items()}
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        regions = [k for k, v in named.items() if v != [0] and k != "ignore"]
        if not isinstance(regions_class_order, (list, tuple)) or len(regions_class_order) != len(regions):
            raise ValueError(f"{where}: region-based labels {regions} need 'regions_class_order' with one value per "
                             f"region, got {regions_class_order!r}")
        out.update(zip(regions, (int(v) for v in regions_class_order)))
    values = sorted(out.values())
    held = sorted({v for vs in named.values() for v in vs})
    if len(set(values)) != len(values) or values != held:
        raise ValueError(f"{where}: label values must be unique and each written by one label, got {out} "
                         f"(label maps hold {held})")
    if values != list(range(len(values))):
        raise ValueError(f"{where}: labels must declare background = 0 and values consecutive from 0 (nnU-Net's "
                         f"rule), got {values}")
    return out


def resolve_channel(channel_names: dict, channel: int | str | None, where: str = "dataset.json") -> int:
    """The index of ``channel`` (an index, its digits, or a name of ``channel_names``, e.g. ``"FLAIR"``; exact name
    first, then case-insensitive) in ``channel_names`` (dataset.json's ``{"0": "T1", ...}``); None -> 0. Fails naming
    the value and the allowed ones."""
    names = {int(k): str(v) for k, v in channel_names.items()}
    if channel is None:
        return 0
    if isinstance(channel, bool):
        raise ValueError(f"channel must be an index or a name, got {channel!r}")
    text = str(channel).strip()
    if text.isdigit() and int(text) in names:
        return int(text)
    for match in (lambda n: n == text, lambda n: n.lower() == text.lower()):
        found = [index for index, name in names.items() if match(name)]
        if len(found) == 1:
            return found[0]
    allowed = ", ".join(f"{index} ({name!r})" for index, name in sorted(names.items()))
    raise ValueError(f"channel {channel!r} is not in {where} channel_names; allowed (index or name): {allowed}")


def default_channel_warning(channel_names: dict, where: str) -> None:
    """Warn that a multi-channel dataset is read at channel 0 because no channel was chosen."""
    if len(channel_names) > 1:
        first = channel_names.get("0", channel_names.get(0))
        warnings.warn(f"{where} has {len(channel_names)} channels {dict(channel_names)}; reading channel 0 "
                      f"({first!r}) as none was chosen: pass --channel (inference, check_dataset) or set "
                      f"data.params.channel (training)", UserWarning, stacklevel=3)


class RawDataset:
    """An nnU-Net v2 raw dataset folder (`root` holds dataset.json, imagesTr, labelsTr, optional imagesTs/labelsTs).
    `channel`: the image channel read (index or name in dataset.json's channel_names; None: 0, with a warning when
    the dataset has several). Cases are listed by any channel's file, so a case without the chosen channel fails when
    it is loaded, naming the file."""

    def __init__(self, root: str | Path, channel: int | str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        self.dataset_json = read_dataset_json(self.root)
        self.labels: dict[str, int] = parse_labels(self.dataset_json["labels"],
                                                   self.dataset_json.get("regions_class_order"))
        self.file_ending: str = self.dataset_json["file_ending"]
        self.channel_names: dict[str, str] = {str(k): v for k, v in self.dataset_json["channel_names"].items()}
        self.channel: int = resolve_channel(self.channel_names, channel, where=str(self.root / "dataset.json"))
        if channel is None:
            default_channel_warning(self.channel_names, str(self.root))
        for split in SPLITS:
            labels_dir, images = self.root / f"labels{split}", set(self.case_names(split))
            stray = sorted(p.name for p in labels_dir.glob(f"*{self.file_ending}")
                           if p.name[: -len(self.file_ending)] not in images)
            if stray:
                raise ValueError(f"{labels_dir}: {stray[:3]} have no image (expected images{split}/<case>_"
                                 f"{self.channel:04d}{self.file_ending}); remove these labels or add their images")

    @property
    def channel_name(self) -> str:
        """The name of the channel read (dataset.json's channel_names)."""
        return str(self.channel_names[str(self.channel)])

    @property
    def max_label(self) -> int:
        return max(self.labels.values())

    def case_names(self, split: str = "Tr") -> list[str]:
        """Sorted case names: files `images<split>/<case>_<NNNN><file_ending>` of any channel."""
        pattern = re.compile(r"^(.+)_\d{4}" + re.escape(self.file_ending) + "$")
        folder = self.root / f"images{_check_split(split)}"
        matches = (pattern.match(p.name) for p in folder.glob(f"*{self.file_ending}"))
        return sorted({m.group(1) for m in matches if m})

    def image_path(self, name: str, split: str = "Tr", channel: int | None = None) -> Path:
        channel = self.channel if channel is None else channel
        return self.root / f"images{_check_split(split)}" / f"{name}_{channel:04d}{self.file_ending}"

    def label_path(self, name: str, split: str = "Tr") -> Path:
        return self.root / f"labels{_check_split(split)}" / f"{name}{self.file_ending}"

    def load_case(self, name: str, split: str = "Tr", slice_axis: int = 2, channel: int | str | None = None) -> Case:
        """Read one case (channel: default the dataset's); the label is required for "Tr" and optional for "Ts"."""
        channel = self.channel if channel is None else resolve_channel(self.channel_names, channel)
        image_path = self.image_path(name, split, channel)
        if not image_path.is_file():
            raise FileNotFoundError(f"image of case {name!r} for channel {channel} "
                                    f"({self.channel_names[str(channel)]!r}) not found: {image_path}")
        label_path = self.label_path(name, split)
        if not label_path.is_file():
            if split == "Tr":
                raise FileNotFoundError(f"label for training case {name!r} not found: {label_path}")
            label_path = None
        case = load_case(image_path, label_path, name=name, slice_axis=slice_axis)
        if case.label is not None:
            undeclared = sorted(set(np.unique(case.label).tolist()) - set(self.labels.values()))
            if undeclared:
                raise ValueError(f"case {name!r}: label values {undeclared} are not declared in dataset.json labels "
                                 f"{self.labels}")
        return case


CASE_LAYOUTS = ("<case>.b2nd + <case>_seg.b2nd (nnU-Net >= 2.5, blosc2)", "<case>.npz (data, seg)",
                "<case>.npy + <case>_seg.npy (unpacked)")
CROP_KEYS = ("bbox_used_for_cropping", "shape_after_cropping_and_before_resampling")
_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")} | {
    (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")}


class _PropertiesUnpickler(pickle.Unpickler):
    """nnU-Net's `<case>.pkl` holds containers, numbers and numpy arrays only; anything else is refused, so reading a
    properties file never runs code from it."""

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: nnU-Net case properties hold only "
                                     "containers and numpy arrays")


def read_properties(path: str | Path) -> dict:
    """A case's nnU-Net properties (`<case>.pkl`), read without running code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"nnU-Net case properties not found: {path} (nnU-Net writes one .pkl per case)")
    with path.open("rb") as f:
        properties = _PropertiesUnpickler(f).load()
    if not isinstance(properties, dict):
        raise ValueError(f"{path} must hold a dict of case properties, got {type(properties).__name__}")
    return properties


def reader_affine(properties: dict) -> np.ndarray:
    """(4, 4) voxel -> world (RAS+, mm) affine of nnU-Net's reader array (axes z, y, x), from `sitk_stuff`
    (spacing, origin, direction in x, y, z order, LPS+) or `nibabel_stuff` (`reoriented_affine` or the original)."""
    if "sitk_stuff" in properties:
        sitk = properties["sitk_stuff"]
        spacing = np.asarray(sitk["spacing"], dtype=np.float64)
        if spacing.shape != (3,):
            raise ValueError(f"only 3-D nnU-Net cases are supported, got sitk spacing {tuple(spacing)}")
        lps = nib.affines.from_matvec(np.asarray(sitk["direction"], dtype=np.float64).reshape(3, 3) * spacing,
                                      np.asarray(sitk["origin"], dtype=np.float64))
        xyz_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS+ -> RAS+
    elif "nibabel_stuff" in properties:
        stuff = properties["nibabel_stuff"]
        xyz_affine = np.asarray(stuff.get("reoriented_affine", stuff["original_affine"]), dtype=np.float64)
    else:
        raise KeyError(f"case properties hold neither 'sitk_stuff' nor 'nibabel_stuff' (the reader's geometry); "
                       f"keys: {sorted(properties)}")
    return xyz_affine[:, [2, 1, 0, 3]]  # both readers return the array with axes reversed (z, y, x)


def preprocessed_affine(properties: dict, transpose_forward, shape: tuple[int, int, int]) -> np.ndarray:
    """(4, 4) voxel -> world (RAS+, mm) affine of a preprocessed nnU-Net array of spatial `shape`. It undoes
    nnU-Net's preprocessing: transpose by `transpose_forward`, crop to `bbox_used_for_cropping`, resample from
    `shape_after_cropping_and_before_resampling` to `shape` keeping the outer corners (voxel j lies at cropped
    index (j + 0.5) * before / after - 0.5)."""
    missing = [k for k in CROP_KEYS if k not in properties]
    if missing:
        raise KeyError(f"case properties lack {missing} (nnU-Net's preprocessor writes them); "
                       f"keys: {sorted(properties)}")
    axes = [int(a) for a in transpose_forward]
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"transpose_forward must be a permutation of (0, 1, 2), got {transpose_forward!r}")
    transpose = np.eye(4)[:, [*axes, 3]]  # transposed axis a is the reader's axis axes[a]
    scale = np.asarray(properties["shape_after_cropping_and_before_resampling"], np.float64) / np.asarray(shape)
    offset = [lo for lo, _ in properties["bbox_used_for_cropping"]] + 0.5 * scale - 0.5
    crop_and_resample = nib.affines.from_matvec(np.diag(scale), offset)
    return reader_affine(properties) @ transpose @ crop_and_resample


def find_plans(folder: str | Path) -> Path:
    """`<plans>.json` of a configuration folder `<plans>_<configuration>` (e.g. nnUNetPlans_3d_fullres), next to it
    or inside; `nnUNetPlans.json` when the name gives nothing."""
    folder = Path(folder)
    parts = folder.name.split("_")
    for stem in ["_".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)] + ["nnUNetPlans"]:
        for parent in (folder.parent, folder):
            if (parent / f"{stem}.json").is_file():
                return parent / f"{stem}.json"
    raise FileNotFoundError(f"no nnU-Net plans for {folder}: expected {folder.parent / 'nnUNetPlans.json'} "
                            "(nnUNetv2_plan_and_preprocess writes it next to the preprocessed folder)")


def _read_array(path: Path) -> np.ndarray:
    if path.suffix != ".b2nd":
        return np.load(path)
    try:
        import blosc2  # optional: only the nnU-Net >= 2.5 layout needs it
    except ImportError as exc:
        raise ImportError('reading nnU-Net .b2nd files needs blosc2: pip install blosc2 (or "gem3d[nnunet]")') from exc
    return blosc2.open(str(path), mode="r")[:]


def _seg_path(path: Path) -> Path:
    """Where a preprocessed case keeps its segmentation: in the `.npz` itself, else `<case>_seg.<suffix>`."""
    return path if path.suffix == ".npz" else path.with_name(f"{path.stem}_seg{path.suffix}")


def read_preprocessed_case(image_path: str | Path, transpose_forward, channel: int = 0, name: str | None = None,
                           slice_axis: int = 2) -> Case:
    """One preprocessed case -> Case on the preprocessed grid in world space (`preprocessed_affine`, from
    `<case>.pkl`). Arrays: `data` (C, X0, X1, X2) and `seg` (1, X0, X1, X2) or none, from `<case>.b2nd`
    (+ `<case>_seg.b2nd`), `<case>.npz` (keys data, seg) or `<case>.npy` (+ `<case>_seg.npy`); seg -1 (outside
    nnU-Net's crop mask) is kept. `slice_axis`: RAS axis (2 = axial)."""
    path, seg_path = Path(image_path), _seg_path(Path(image_path))
    if not path.is_file():
        raise FileNotFoundError(f"preprocessed case not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as npz:
            if "data" not in npz.files:
                raise KeyError(f"{path} lacks 'data'; holds {npz.files}")
            data, seg = np.asarray(npz["data"]), (np.asarray(npz["seg"]) if "seg" in npz.files else None)
    elif path.suffix in (".b2nd", ".npy"):
        data, seg = _read_array(path), (_read_array(seg_path) if seg_path.is_file() else None)
    else:
        raise ValueError(f"preprocessed case must be one of {CASE_LAYOUTS}, got {path.name}")
    if data.ndim != 4:
        raise ValueError(f"{path}: 'data' must be (C, X0, X1, X2), got shape {data.shape}")
    if not 0 <= channel < data.shape[0]:
        raise ValueError(f"{path}: channel {channel} out of range, data has {data.shape[0]} channels")
    properties = read_properties(path.with_name(path.stem + ".pkl"))
    geometry = Geometry(preprocessed_affine(properties, transpose_forward, data.shape[1:]), data.shape[1:], slice_axis)
    label = None
    if seg is not None:
        if seg.ndim != 4 or seg.shape[0] != 1 or seg.shape[1:] != data.shape[1:]:
            raise ValueError(f"{path}: 'seg' must be (1, {', '.join(map(str, data.shape[1:]))}), got {seg.shape}")
        label = geometry.to_canonical(labels_as_int16(seg[0], where=str(path)))
    image = geometry.to_canonical(np.asarray(data[channel], dtype=np.float32))
    return Case(name=name or path.stem, image=image, label=label, geometry=geometry, image_path=path,
                label_path=seg_path if seg is not None else None)


class PreprocessedDataset:
    """An nnU-Net v2 preprocessed dataset: `root` is `<Dataset>` (holding the folder `plans`) or that folder.
    Outputs are written on the preprocessed (cropped, resampled) grid."""

    def __init__(self, root: str | Path, plans: str = DEFAULT_PLANS, channel: int | str | None = None):
        self.root = Path(root)
        self.folder = self.root / plans if (self.root / plans).is_dir() else self.root
        if not self.case_names():
            raise FileNotFoundError(f"no nnU-Net preprocessed cases in {self.folder}; looked for "
                                    f"{' / '.join(CASE_LAYOUTS)}")
        self.plans_path = find_plans(self.folder)
        self.plans = json.loads(self.plans_path.read_text())
        if "transpose_forward" not in self.plans:
            raise KeyError(f"{self.plans_path} lacks 'transpose_forward'; is it an nnU-Net v2 plans file?")
        json_path = next((p / "dataset.json" for p in (self.root, self.folder, self.folder.parent)
                          if (p / "dataset.json").is_file()), None)
        self.dataset_json = json.loads(json_path.read_text()) if json_path else {}
        self.labels = (parse_labels(self.dataset_json["labels"], self.dataset_json.get("regions_class_order"))
                       if "labels" in self.dataset_json else None)
        self.channel_names: dict[str, str] = {str(k): str(v) for k, v in
                                              (self.dataset_json.get("channel_names") or {}).items()}
        if self.channel_names:
            self.channel = resolve_channel(self.channel_names, channel, where=f"{json_path}")
            if channel is None:
                default_channel_warning(self.channel_names, str(self.root))
        elif channel is None or str(channel).isdigit():
            self.channel = int(channel or 0)
        else:
            raise ValueError(f"channel {channel!r} is a name, but {self.root} has no dataset.json channel_names to "
                             f"look it up in; pass an index")

    @property
    def channel_name(self) -> str | None:
        """The name of the channel read, where dataset.json names it."""
        return self.channel_names.get(str(self.channel))

    @property
    def max_label(self) -> int | None:
        return max(self.labels.values()) if self.labels else None

    def case_names(self, split: str = "Tr") -> list[str]:
        if _check_split(split) == "Ts":
            return []
        names = {p.stem for pattern in ("*.b2nd", "*.npz", "*.npy") for p in self.folder.glob(pattern)}
        return sorted(n for n in names if not n.endswith("_seg"))

    def image_path(self, name: str, split: str = "Tr") -> Path:
        paths = [self.folder / f"{name}{suffix}" for suffix in (".b2nd", ".npz", ".npy")]
        return next((p for p in paths if p.is_file()), paths[1])

    def label_path(self, name: str, split: str = "Tr") -> Path:
        return _seg_path(self.image_path(name, split))

    def load_case(self, name: str, split: str = "Tr", slice_axis: int = 2, channel: int | str | None = None) -> Case:
        if channel is None:
            channel = self.channel
        elif self.channel_names:
            channel = resolve_channel(self.channel_names, channel)
        return read_preprocessed_case(self.image_path(name, split), self.plans["transpose_forward"],
                                      channel=int(channel), name=name, slice_axis=slice_axis)


def open_dataset(root: str | Path, plans: str = DEFAULT_PLANS,
                 channel: int | str | None = None) -> RawDataset | PreprocessedDataset:
    """RawDataset when `root` has imagesTr (or imagesTs), else PreprocessedDataset; `channel`: the image channel
    read (index or dataset.json name; None: 0)."""
    root = Path(root)
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        return RawDataset(root, channel=channel)
    if (root / plans).is_dir() or any(p.suffix in (".npz", ".npy", ".b2nd") for p in root.glob("*.*")):
        return PreprocessedDataset(root, plans, channel=channel)
    raise FileNotFoundError(f"{root} is neither an nnU-Net raw dataset (imagesTr/, dataset.json) nor a preprocessed "
                            f"one ({plans}/ holding {' / '.join(CASE_LAYOUTS)})")
