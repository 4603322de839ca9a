"""What the evaluation compares: real cases of an nnU-Net raw dataset and the synthetic samples of inference output
folders (``OUT/<setting>/manifest.json``), matched through the manifest's ``case``. All are canonical ``(D, H, W)``
arrays mapped to [0, 1] on one :class:`IntensityScale` per row, so every metric reads on that scale: the real case's
min/max (MRI), or the intensity window the model was trained in (CT, HU), both volumes clipped to it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from gem3d.data.case import load_case
from gem3d.data.geometry import Geometry
from gem3d.data.nnunet import RawDataset
from gem3d.data.preprocess import PreprocessConfig, compute_body_mask
from gem3d.export.manifest import Manifest

from .image import reconstruction_metrics, to_unit_range


@dataclass(frozen=True)
class IntensityScale:
    """How raw intensities map to the evaluation's [0, 1]. ``window`` None: with the real case's min/max, not clipped
    (the default; MRI, whose preprocessing is per volume); ``(lo, hi)``: ``(clip(x, lo, hi) - lo) / (hi - lo)`` for
    the synthetic and the real volume alike (a CT model's training window in HU: outside it the model saw, and
    draws, only the window's edges). ``source`` says where the window came from."""

    window: tuple[float, float] | None = None
    source: str = ""

    def __post_init__(self):
        if self.window is not None:
            lo, hi = (float(v) for v in self.window)
            if not lo < hi:
                raise ValueError(f"an intensity window must be (lo, hi) with lo < hi, got {self.window}")
            object.__setattr__(self, "window", (lo, hi))

    def to_unit(self, volume, real_range) -> np.ndarray:
        """``volume`` (raw intensities) on this scale; ``real_range``: the real case's ``(min, max)``."""
        if self.window is None:
            return to_unit_range(volume, real_range)
        lo, hi = self.window
        return (np.clip(np.asarray(volume, dtype=np.float64), lo, hi) - lo) / (hi - lo)

    def describe(self) -> str:
        if self.window is None:
            return "each real case's min/max (not clipped)" + (f" ({self.source})" if self.source else "")
        lo, hi = self.window
        return f"the window [{lo:g}, {hi:g}], both volumes clipped to it" + (f" ({self.source})" if self.source else "")


REAL_RANGE = IntensityScale()


def scale_from_preprocess(preprocess: Mapping | None, source: str = "") -> IntensityScale:
    """The evaluation scale of a model's preprocessing (a ``preprocess`` dict: a manifest record's or a model
    config's ``data.params.preprocess``): its window where it normalised with one (``intensity: window``), else the
    real case's min/max (``minmax``, ``percentile``, or no preprocessing recorded)."""
    if preprocess is None or PreprocessConfig.from_dict(preprocess).intensity != "window":
        return REAL_RANGE
    return IntensityScale(tuple(PreprocessConfig.from_dict(preprocess).window), source)


@dataclass
class RealCase:
    """A real case: image ``(D, H, W)`` in [0, 1], label int and body bool ``(D, H, W)``, the source file's geometry,
    the raw intensities' ``(min, max)``, and the NIfTI files."""

    name: str
    image: np.ndarray
    label: np.ndarray
    body: np.ndarray
    geometry: Geometry
    raw_range: tuple[float, float]
    image_path: Path
    label_path: Path

    @property
    def raw(self) -> np.ndarray:
        """The raw intensities ``(D, H, W)``."""
        lo, hi = self.raw_range
        return (self.image * (hi - lo) + lo).astype(np.float32)


@dataclass
class SyntheticSample:
    """One manifest record's volume in report row ``row``: image ``(D, H, W)`` on the real case's [0, 1] scale, its
    conditioning label (or the real label), body, and its files."""

    row: str
    record: dict
    image: np.ndarray
    label: np.ndarray
    body: np.ndarray
    image_path: Path
    label_path: Path | None
    preview_path: Path | None = None
    scale: IntensityScale = REAL_RANGE

    @property
    def case(self) -> str:
        return str(self.record["case"])


class RealData:
    """The real cases of a raw nnU-Net dataset, loaded on demand (``body``: how the body region is found:
    ``nonzero`` (MRI), ``threshold`` (CT), ``none``)."""

    def __init__(self, root: str | Path, split: str = "Tr", slice_axis: int = 2, body: str = "nonzero"):
        self.dataset = RawDataset(root)
        self.split, self.slice_axis = split, slice_axis
        self.body_config = PreprocessConfig(body=body, max_label=max(1, self.dataset.max_label), size=None)
        self._cache: dict[str, RealCase] = {}
        self._scaled: dict[tuple[str, tuple[float, float]], np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return self.dataset.case_names(self.split)

    @property
    def label_names(self) -> dict[int, str]:
        return {v: k for k, v in self.dataset.labels.items() if v > 0}

    def case(self, name: str) -> RealCase:
        if name not in self._cache:
            case = self.dataset.load_case(name, split=self.split, slice_axis=self.slice_axis)
            raw = np.asarray(case.image, dtype=np.float32)
            label = np.asarray(case.label)
            body = compute_body_mask(raw, self.body_config) | (label > 0)
            self._cache[name] = RealCase(
                name, to_unit_range(raw, raw), label, body, case.geometry,
                (float(raw.min()), float(raw.max())), case.image_path, case.label_path)
        return self._cache[name]

    def image(self, name: str, scale: IntensityScale = REAL_RANGE) -> np.ndarray:
        """The real case's image ``(D, H, W)`` on ``scale`` (its ``image`` itself for the min/max scale)."""
        case = self.case(name)
        if scale.window is None:
            return case.image
        key = (name, scale.window)
        if key not in self._scaled:
            self._scaled[key] = scale.to_unit(case.raw, case.raw_range)
        return self._scaled[key]


def folder_scale(folder: Path, records: list[dict], window: IntensityScale | None = None) -> IntensityScale:
    """The scale of one output folder: ``window`` when given (``--window``), else its records' ``preprocess`` (all
    alike; records of older runs have none: the real case's min/max)."""
    if window is not None:
        return window
    recorded = {json.dumps(r.get("preprocess"), sort_keys=True) for r in records}
    if len(recorded) > 1:
        raise ValueError(f"{folder / 'manifest.json'}: its records ran with different preprocessing "
                         f"{sorted(recorded)}; evaluate them as separate folders")
    preprocess = records[0].get("preprocess") if records else None
    return scale_from_preprocess(preprocess, "the model's training window, from the manifest")


def load_samples(folder: str | Path, row: str, real: RealData,
                 window: IntensityScale | None = None) -> list[SyntheticSample]:
    """The samples of one inference output folder (``manifest.json`` + files), each on the folder's
    :func:`folder_scale`."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"--synthetic {folder}: no manifest.json (an inference output folder OUT/<setting>)")
    samples = []
    records = Manifest(path).records
    scale = folder_scale(folder, records, window)
    for record in records:
        files = record.get("files", {})
        if record["case"] not in real.names:
            raise ValueError(f"{path}: case {record['case']!r} is not in the real dataset {real.dataset.root}")
        case = real.case(record["case"])
        image_path = folder / files["image"]
        label_path = folder / files["label"] if "label" in files else None
        synthetic = load_case(image_path, label_path, slice_axis=real.slice_axis)
        image01 = scale.to_unit(synthetic.image, case.raw_range)
        if image01.shape != case.image.shape:
            raise ValueError(f"{image_path}: shape {image01.shape} differs from the real case's {case.image.shape}")
        label = case.label if label_path is None else synthetic.label
        body = case.body | (label > 0)
        preview = folder / files["preview"] if "preview" in files else None
        samples.append(SyntheticSample(row, record, image01, np.asarray(label), body, image_path, label_path,
                                       preview if preview is not None and preview.is_file() else None, scale))
    return samples


def has_ground_truth(sample: SyntheticSample) -> bool:
    """Whether the real case is the pixel-wise ground truth of the sample (own mask, no edits: ``test``-like)."""
    record = sample.record
    return "gt" in record.get("files", {}) or (record.get("setting") == "test" and not record.get("mask_edits"))


def reconstruction_quality(setting_dir: str | Path, records: list[dict]) -> dict[str, float] | None:
    """Mean :func:`gem3d.metrics.image.reconstruction_metrics` (inside the nonzero body, axial slices) of the records
    of ``setting_dir`` that have a ground truth (``files["gt"]``, the ``test`` setting); None without any."""
    setting_dir = Path(setting_dir)
    config = PreprocessConfig(body="nonzero", size=None)
    scores: list[dict[str, float]] = []
    for record in records:
        files = record.get("files", {})
        if "gt" not in files:
            continue
        real = load_case(setting_dir / files["gt"], setting_dir / files["label"] if "label" in files else None)
        fake = load_case(setting_dir / files["image"]).image
        region = compute_body_mask(real.image, config)
        if real.label is not None:
            region |= real.label > 0
        scores.append(reconstruction_metrics(fake, real.image, region, real.label))
    if not scores:
        return None
    keys = [k for k in scores[0] if all(k in s for s in scores)]
    return {k: float(np.mean([s[k] for s in scores])) for k in keys}
