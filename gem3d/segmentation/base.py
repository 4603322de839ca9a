"""The segmenter interface shared by label fidelity and the downstream experiment.

A :class:`Segmenter` owns one work folder (``work_dir``): it trains there on :class:`TrainingCase` files and
predicts label NIfTIs from image NIfTIs. A backend registers itself in :data:`BACKENDS` by module path and is
imported only when asked for (nnU-Net is an optional install)."""
from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from gem3d.files import atomic_write_json

# backend name -> "module:Class" (imported on demand)
BACKENDS = {
    "monai": "gem3d.segmentation.monai_backend:MonaiSegmenter",
    "nnunet": "gem3d.segmentation.nnunet_backend:NnUNetSegmenter",
}
SETTINGS_FILE = "segmenter.json"  # in a work folder: the settings and training cases it was trained with
# the one default of a segmenter's training iterations: the label-fidelity segmenter of the evaluation
# (scripts/evaluate.py, enhance_dataset.py --min-dice) and of the demo, whose reported figures were measured with it
# (on 32 x 48 x 48 patches, gem3d.demo.SEGMENTER_OPTIONS; docs/mask-true.md, "The label-fidelity segmenter")
DEFAULT_ITERATIONS = 450


@dataclass(frozen=True)
class TrainingCase:
    """One labelled case: ``image`` (a one-channel NIfTI) and ``label`` (int NIfTI on the image's grid)."""

    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class SegmenterSettings:
    """How to train a segmenter: ``backend`` (a key of :data:`BACKENDS`), ``iterations`` (optimiser steps; nnU-Net:
    epochs x iterations per epoch), ``seed``, ``device`` (cpu, cuda, cuda:N) and backend ``options`` (a flat dict of
    JSON values, e.g. MONAI ``features`` or nnU-Net ``configuration`` / ``fold``)."""

    backend: str = "monai"
    iterations: int = DEFAULT_ITERATIONS
    seed: int = 0
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"segmenter backend {self.backend!r} is not one of {sorted(BACKENDS)}")
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 1:
            raise ValueError(f"segmenter iterations must be an int >= 1, got {self.iterations!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"segmenter seed must be an int, got {self.seed!r}")
        try:
            json.dumps(self.options, sort_keys=True)
        except TypeError as err:
            raise ValueError(f"segmenter options must be JSON values, got {self.options!r}") from err

    def key(self, cases: Sequence[TrainingCase] = ()) -> str:
        """A short stable hash of these settings and the training cases (names and file contents' size/mtime),
        for caching a trained segmenter."""
        files = [(c.name, _file_stamp(c.image), _file_stamp(c.label)) for c in cases]
        text = json.dumps({"settings": asdict(self), "cases": files}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SegmenterSettings":
        """Settings from :meth:`to_dict`'s dict; unknown keys are refused with the allowed ones."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"segmenter settings {unknown} are unknown; allowed: {sorted(allowed)}")
        return cls(**values)


def _file_stamp(path: Path) -> list:
    stat = Path(path).stat()
    return [Path(path).name, stat.st_size, int(stat.st_mtime)]


class Segmenter(ABC):
    """A segmenter in ``work_dir``: :meth:`train` once (a finished training is kept and reused), then
    :meth:`predict`."""

    def __init__(self, settings: SegmenterSettings, work_dir: str | Path):
        self.settings = settings
        self.work_dir = Path(work_dir)

    def save_settings(self, cases: Sequence[TrainingCase] = ()) -> Path:
        """Write ``work_dir/segmenter.json``: the settings, the training cases' names and their key, so that
        :func:`read_settings` can rebuild this segmenter from its folder alone."""
        return atomic_write_json(self.work_dir / SETTINGS_FILE, {
            "settings": self.settings.to_dict(), "cases": [c.name for c in cases],
            "key": self.settings.key(cases)})

    @abstractmethod
    def is_trained(self) -> bool:
        """Whether ``work_dir`` holds a finished training."""

    @abstractmethod
    def train(self, cases: Sequence[TrainingCase], progress: bool = True) -> None:
        """Train on ``cases`` in ``work_dir``; resume an interrupted training; do nothing when already trained."""

    @abstractmethod
    def predict(self, images: Sequence[Path], out_dir: str | Path, progress: bool = True) -> list[Path]:
        """Label NIfTIs (``out_dir/<image name without _0000>.nii.gz``), one per image, each on its image's grid."""


def prediction_name(image: Path) -> str:
    """The prediction file name of an image: ``<name>_0000.nii.gz`` or ``<name>.nii`` -> ``<name>.nii.gz``."""
    stem = Path(image).name.removesuffix(".gz").removesuffix(".nii")
    return stem.removesuffix("_0000") + ".nii.gz"


def read_settings(work_dir: str | Path) -> SegmenterSettings:
    """The settings a work folder was trained with (its ``segmenter.json``)."""
    path = Path(work_dir) / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {work_dir} is not a gem3d segmenter folder")
    return SegmenterSettings.from_dict(json.loads(path.read_text())["settings"])


def get_segmenter(settings: SegmenterSettings, work_dir: str | Path) -> Segmenter:
    """The backend's :class:`Segmenter` for ``settings`` in ``work_dir``."""
    module_name, _, class_name = BACKENDS[settings.backend].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"segmenter backend {settings.backend!r} cannot be imported ({err}); "
                          "see the README's nnU-Net section for the nnunet backend") from err
    return getattr(module, class_name)(settings, work_dir)
