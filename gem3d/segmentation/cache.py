"""Trained segmenters kept in a cache folder, and the training cases of a raw dataset.

``trained_segmenter(settings, cases, cache_root)`` trains once in ``cache_root/<settings.key(cases)>/`` and reuses
that folder afterwards (an interrupted training resumes there). The key hashes the settings and every training
case's name, file size and modification time, so new settings or changed files train a new segmenter. Keep the
cache outside the dataset (e.g. ``<report folder>/segmenter_cache``): a dataset can then stay read-only.

``load_trained_segmenter(folder)`` opens a folder trained before: a gem3d segmenter folder (``segmenter.json``, either
backend) or a trained nnU-Net v2 model folder (``plans.json`` + ``fold_*``), which is only predicted with.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from gem3d.data.nnunet import RawDataset

from .base import (SETTINGS_FILE, Segmenter, SegmenterSettings, TrainingCase, get_segmenter, prediction_name,
                   read_settings)

NNUNET_MODEL_FILES = ("plans.json", "dataset.json")


def dataset_training_cases(dataset: str | Path | RawDataset, names: Sequence[str], channel: int = 0
                           ) -> list[TrainingCase]:
    """:class:`TrainingCase` files of the cases ``names`` of a raw nnU-Net dataset (``imagesTr``/``labelsTr``)."""
    raw = dataset if isinstance(dataset, RawDataset) else RawDataset(dataset)
    unknown = sorted(set(names) - set(raw.case_names("Tr")))
    if unknown:
        raise ValueError(f"training cases {unknown} are not in {raw.root} (it has {raw.case_names('Tr')})")
    return [TrainingCase(name, raw.image_path(name, "Tr", channel), raw.label_path(name, "Tr")) for name in names]


def trained_segmenter(settings: SegmenterSettings, cases: Sequence[TrainingCase], cache_root: str | Path,
                      progress: bool = True) -> Segmenter:
    """A segmenter trained on ``cases`` with ``settings``: loaded from ``cache_root/<settings.key(cases)>/`` when
    trained there before, else trained there now."""
    segmenter = get_segmenter(settings, Path(cache_root) / settings.key(cases))
    if not segmenter.is_trained():
        segmenter.save_settings(cases)
        segmenter.train(cases, progress=progress)
    return segmenter


def load_trained_segmenter(folder: str | Path, device: str | None = None, fold: str | None = None) -> Segmenter:
    """The trained segmenter in ``folder``: a gem3d segmenter folder (``segmenter.json``) or an nnU-Net v2 model
    folder; ``device`` (and ``fold`` for nnU-Net folders: ``0``..``4`` or ``all``) override its settings."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"segmenter folder {folder} does not exist")
    if (folder / SETTINGS_FILE).is_file():
        values = read_settings(folder).to_dict()
        if device is not None:
            values["device"] = device
        if fold is not None and values["backend"] != "nnunet":
            raise ValueError(f"a fold applies to nnU-Net segmenters; {folder} holds a {values['backend']} segmenter")
        if fold is not None:
            values["options"] = {**values["options"], "fold": fold}
        segmenter = get_segmenter(SegmenterSettings.from_dict(values), folder)
        if not segmenter.is_trained():
            raise ValueError(f"segmenter folder {folder} holds no finished training")
        return segmenter
    if all((folder / name).is_file() for name in NNUNET_MODEL_FILES):
        return NnUNetModelFolder(folder, device or "cpu", "0" if fold is None else fold)
    raise ValueError(f"{folder} is neither a gem3d segmenter folder ({SETTINGS_FILE}) nor an nnU-Net model folder "
                     f"({' + '.join(NNUNET_MODEL_FILES)} + fold_*)")


class NnUNetModelFolder(Segmenter):
    """A trained nnU-Net v2 model folder (trained outside gem3d), used for prediction only (needs ``nnunetv2``)."""

    def __init__(self, folder: Path, device: str = "cpu", fold: str = "0"):
        super().__init__(SegmenterSettings(backend="nnunet", device=device, options={"fold": fold}), folder)
        self.fold = fold if fold == "all" else int(fold)

    def is_trained(self) -> bool:
        return True

    def train(self, cases: Sequence[TrainingCase], progress: bool = True) -> None:
        raise ValueError(f"{self.work_dir} is a trained nnU-Net model folder: it predicts, it does not train")

    def predict(self, images: Sequence[Path], out_dir: str | Path, progress: bool = True) -> list[Path]:
        import torch  # noqa: PLC0415
        try:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: PLC0415  (optional)
        except ImportError as err:
            raise ImportError(f"the nnU-Net model folder {self.work_dir} needs nnunetv2 ({err}); see the README's "
                              "nnU-Net section") from err
        predictor = nnUNetPredictor(device=torch.device(self.settings.device), verbose=False,
                                    allow_tqdm=progress)
        predictor.initialize_from_trained_model_folder(str(self.work_dir), use_folds=(self.fold,))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs = [out_dir / prediction_name(Path(image)) for image in images]
        # nnU-Net reads and writes the files itself, each prediction on its image's grid
        predictor.predict_from_files([[str(image)] for image in images],
                                     [str(path)[: -len(".nii.gz")] for path in outputs], save_probabilities=False,
                                     overwrite=True, num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)
        missing = [str(path) for path in outputs if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"nnU-Net wrote no prediction for {missing}")
        return outputs

