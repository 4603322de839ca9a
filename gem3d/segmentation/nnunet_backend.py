"""The nnU-Net v2 segmenter (``backend="nnunet"``), driven through nnU-Net's Python API.

``work_dir`` holds one nnU-Net world of its own: ``nnUNet_raw/Dataset001_gem3d`` (the training cases, one channel,
NIfTI), ``nnUNet_preprocessed`` and ``nnUNet_results``; the three nnU-Net path variables point there during each
call and are restored after. Training plans and preprocesses one configuration (``2d`` or ``3d_fullres``), then
runs :class:`Gem3dTrainer`, nnU-Net's default trainer with ``settings.iterations`` split into epochs of
``iterations_per_epoch``. nnU-Net needs ``pip install --no-deps nnunetv2 dynamic-network-architectures`` plus their
other requirements (``make nnunet``, see the README), and an ``if __name__ == "__main__":`` guard in any script that
trains with it (its data augmentation runs in worker processes).

Options (``settings.options``):

- ``configuration``: ``"3d_fullres"`` (default) or ``"2d"``;
- ``iterations_per_epoch``: default ``min(iterations, 250)``; ``iterations`` must be a multiple of it;
- ``val_iterations_per_epoch``: nnU-Net's per-epoch pseudo-Dice batches (default 1; only logged);
- ``fold``: ``"all"`` (default, every case trains: right for tiny data) or ``0``-``4`` (nnU-Net's 5-fold split);
- ``labels``: ``dataset.json`` labels (name -> value); default ``label_1`` .. ``label_<max>`` from the cases;
- ``mirroring``: test-time mirroring in :meth:`predict` (default true, as nnU-Net);
- ``processes``: worker processes of fingerprinting and preprocessing (default 1).

Data augmentation workers: ``nnUNet_n_proc_DA`` from the environment, else 2. Seeded: the seed is set before the
network is built and before training; the augmentation workers draw their own random numbers, so two runs with one
seed are alike, not bit-identical. Resumable: a checkpoint after every epoch; an interrupted :meth:`train` continues
from nnU-Net's ``checkpoint_latest.pth``; a finished one (``checkpoint_final.pth``) is kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import nibabel as nib
import numpy as np
import torch
# nnU-Net is an optional install: importing this module without it fails here, and get_segmenter says how to fix it
from nnunetv2.experiment_planning.plan_and_preprocess_api import (
    extract_fingerprint_dataset, plan_experiment_dataset, preprocess_dataset)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from gem3d.files import atomic_path, atomic_write_json

from .base import SETTINGS_FILE, Segmenter, SegmenterSettings, TrainingCase, prediction_name

__all__ = ["NnUNetSegmenter", "Gem3dTrainer", "CONFIGURATIONS"]

CONFIGURATIONS = ("2d", "3d_fullres")
DATASET_ID = 1
DATASET_NAME = "Dataset001_gem3d"
PLANS = "nnUNetPlans"
ENDING = ".nii.gz"
PREPROCESSED_STAMP = "preprocessed.done"
OPTION_KEYS = ("configuration", "iterations_per_epoch", "val_iterations_per_epoch", "fold", "labels", "mirroring",
               "processes")


class Gem3dTrainer(nnUNetTrainer):
    """nnU-Net's default trainer with gem3d's schedule: :meth:`NnUNetSegmenter.train` sets ``num_epochs``,
    ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch`` after construction (before ``initialize``),
    and a checkpoint is written after every epoch so that an interrupted training loses at most one epoch."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1


@contextlib.contextmanager
def nnunet_paths(work_dir: Path) -> Iterator[None]:
    """Point nnU-Net's path variables into ``work_dir`` (and ``nnUNet_n_proc_DA`` at 2 unless set) for a block."""
    values = {"nnUNet_raw": work_dir / "nnUNet_raw", "nnUNet_preprocessed": work_dir / "nnUNet_preprocessed",
              "nnUNet_results": work_dir / "nnUNet_results"}
    saved = {key: os.environ.get(key) for key in [*values, "nnUNet_n_proc_DA"]}
    os.environ.update({key: str(value) for key, value in values.items()})
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def quiet(log_path: Path, enabled: bool) -> Iterator[None]:
    """Send nnU-Net's prints to ``log_path`` (appended) when ``enabled``; else leave them on the console."""
    if not enabled:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NnUNetSegmenter(Segmenter):
    """An nnU-Net v2 segmenter in ``work_dir`` (see the module docstring for its layout and options)."""

    def __init__(self, settings: SegmenterSettings, work_dir: str | Path):
        super().__init__(settings, work_dir)
        self.work_dir = self.work_dir.resolve()
        options = dict(settings.options)
        unknown = sorted(set(options) - set(OPTION_KEYS))
        if unknown:
            raise ValueError(f"nnunet segmenter options {unknown} are unknown; allowed: {list(OPTION_KEYS)}")
        self.configuration = options.get("configuration", "3d_fullres")
        if self.configuration not in CONFIGURATIONS:
            raise ValueError(f"nnunet configuration {self.configuration!r} is not one of {list(CONFIGURATIONS)}")
        self.iterations_per_epoch = options.get("iterations_per_epoch", min(settings.iterations, 250))
        self.val_iterations = options.get("val_iterations_per_epoch", 1)
        for key, value in (("iterations_per_epoch", self.iterations_per_epoch),
                           ("val_iterations_per_epoch", self.val_iterations)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"nnunet option {key} must be an int >= 1, got {value!r}")
        if settings.iterations % self.iterations_per_epoch:
            raise ValueError(f"nnunet: iterations ({settings.iterations}) must be a multiple of iterations_per_epoch "
                             f"({self.iterations_per_epoch})")
        self.epochs = settings.iterations // self.iterations_per_epoch
        self.fold = options.get("fold", "all")
        if self.fold != "all" and self.fold not in range(5):
            raise ValueError(f"nnunet fold must be 'all' or 0-4, got {self.fold!r}")
        self.labels = options.get("labels")
        self.mirroring = bool(options.get("mirroring", True))
        self.processes = int(options.get("processes", 1))
        self.device = torch.device(settings.device)

    # -- folders -------------------------------------------------------------------------------------------------
    @property
    def raw_dir(self) -> Path:
        return self.work_dir / "nnUNet_raw" / DATASET_NAME

    @property
    def preprocessed_dir(self) -> Path:
        return self.work_dir / "nnUNet_preprocessed" / DATASET_NAME

    @property
    def model_dir(self) -> Path:
        """nnU-Net's training output folder (``plans.json``, ``dataset.json``, ``fold_<f>/``)."""
        name = f"{Gem3dTrainer.__name__}__{PLANS}__{self.configuration}"
        return self.work_dir / "nnUNet_results" / DATASET_NAME / name

    @property
    def fold_dir(self) -> Path:
        return self.model_dir / f"fold_{self.fold}"

    def is_trained(self) -> bool:
        return (self.fold_dir / "checkpoint_final.pth").is_file()

    # -- training ------------------------------------------------------------------------------------------------
    def _check_work_dir(self, cases: Sequence[TrainingCase]) -> None:
        """A work folder holds one training: its ``segmenter.json`` (the settings and case names) must match these
        (the device may differ); a new folder gets one."""
        path = self.work_dir / SETTINGS_FILE
        if path.is_file():
            held = json.loads(path.read_text())
            mine = json.loads(json.dumps(self.settings.to_dict()))
            same = {k: v for k, v in held["settings"].items() if k != "device"} == \
                {k: v for k, v in mine.items() if k != "device"}
            if not same or sorted(held["cases"]) != sorted(c.name for c in cases):
                raise ValueError(f"{self.work_dir} holds an nnU-Net training with other settings or cases "
                                 f"({held['settings']}, {held['cases']}); asked for {mine}, "
                                 f"{[c.name for c in cases]}: use another work folder")
            return
        self.save_settings(cases)

    def _labels(self, cases: Sequence[TrainingCase]) -> dict[str, Any]:
        if self.labels is not None:
            return dict(self.labels)
        top = max(int(np.asarray(nib.load(str(c.label)).dataobj).max()) for c in cases)
        if top < 1:
            raise ValueError("nnunet: the training labels hold no foreground (every label map is 0)")
        return {"background": 0, **{f"label_{k}": k for k in range(1, top + 1)}}

    def _write_raw(self, cases: Sequence[TrainingCase]) -> None:
        """The nnU-Net raw dataset of ``cases`` (images re-saved as ``.nii.gz`` where they are ``.nii``)."""
        if os.path.exists(self.raw_dir):
            shutil.rmtree(self.raw_dir)
        for sub in ("imagesTr", "labelsTr"):
            (self.raw_dir / sub).mkdir(parents=True)
        for case in cases:
            for src, dst in ((case.image, self.raw_dir / "imagesTr" / f"{case.name}_0000{ENDING}"),
                             (case.label, self.raw_dir / "labelsTr" / f"{case.name}{ENDING}")):
                if str(src).endswith(ENDING):
                    shutil.copyfile(src, dst)
                else:
                    nib.save(nib.load(str(src)), str(dst))
        atomic_write_json(self.raw_dir / "dataset.json", {
            "channel_names": {"0": "image"},  # not "CT": nnU-Net z-scores each case
            "labels": self._labels(cases), "numTraining": len(cases), "file_ending": ENDING,
            "overwrite_image_reader_writer": "NibabelIO", "name": DATASET_NAME})

    def _preprocess(self, cases: Sequence[TrainingCase], progress: bool) -> None:
        """Write the raw dataset, fingerprint, plan and preprocess ``self.configuration`` (once; a stamp says so)."""
        stamp = self.work_dir / PREPROCESSED_STAMP
        if stamp.is_file():
            return
        if os.path.exists(self.preprocessed_dir):
            shutil.rmtree(self.preprocessed_dir)
        self._write_raw(cases)
        extract_fingerprint_dataset(DATASET_ID, num_processes=self.processes, check_dataset_integrity=False,
                                    clean=True, verbose=False, show_progress_bar=progress)
        planning_threads = os.environ["nnUNet_n_proc_DA"]
        os.environ["nnUNet_n_proc_DA"] = str(max(1, int(planning_threads)))  # the planner sets torch threads to it
        try:
            plan_experiment_dataset(DATASET_ID)
        finally:
            os.environ["nnUNet_n_proc_DA"] = planning_threads
        preprocess_dataset(DATASET_ID, PLANS, (self.configuration,), (self.processes,), show_progress_bar=progress)
        stamp.write_text("done\n")

    def _trainer(self, continue_training: bool) -> Gem3dTrainer:
        plans = json.loads((self.preprocessed_dir / f"{PLANS}.json").read_text())
        plans["continue_training"] = continue_training  # as nnU-Net's run_training does
        dataset_json = json.loads((self.preprocessed_dir / "dataset.json").read_text())
        trainer = Gem3dTrainer(plans, self.configuration, self.fold, dataset_json, self.device)
        trainer.num_epochs = self.epochs
        trainer.num_iterations_per_epoch = self.iterations_per_epoch
        trainer.num_val_iterations_per_epoch = self.val_iterations
        return trainer

    def train(self, cases: Sequence[TrainingCase], progress: bool = True) -> None:
        names = [c.name for c in cases]
        if not names:
            raise ValueError("nnunet: no training cases")
        if len(set(names)) != len(names):
            raise ValueError(f"nnunet: training case names must be unique, got {sorted(names)}")
        if self.fold != "all" and len(cases) < 5:
            raise ValueError(f"nnunet fold {self.fold} needs >= 5 cases for nnU-Net's 5-fold split, got "
                             f"{len(cases)}; use fold 'all'")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._check_work_dir(cases)
        if self.is_trained():
            return
        with nnunet_paths(self.work_dir), quiet(self.work_dir / "nnunet.log", not progress):
            self._preprocess(cases, progress)
            latest = self.fold_dir / "checkpoint_latest.pth"
            resume = latest.is_file()
            seed_everything(self.settings.seed)
            trainer = self._trainer(continue_training=resume)
            if resume:
                trainer.load_checkpoint(str(latest))
            try:
                trainer.run_training()
            finally:
                for loader in (trainer.dataloader_train, trainer.dataloader_val):
                    if loader is not None and hasattr(loader, "_finish"):
                        loader._finish()  # stop the augmentation workers even when training failed

    # -- prediction ----------------------------------------------------------------------------------------------
    def _predictor(self) -> nnUNetPredictor:
        """An nnU-Net predictor with the final weights (built by :class:`Gem3dTrainer`, which nnU-Net's own
        ``initialize_from_trained_model_folder`` cannot find by name outside its package)."""
        plans_manager = PlansManager(json.loads((self.model_dir / "plans.json").read_text()))
        dataset_json = json.loads((self.model_dir / "dataset.json").read_text())
        checkpoint = torch.load(self.fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        configuration = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
        label_manager = plans_manager.get_label_manager(dataset_json)
        network = Gem3dTrainer.build_network_architecture(
            plans_manager, configuration, len(dataset_json["channel_names"]), label_manager.num_segmentation_heads,
            enable_deep_supervision=False)
        network.load_state_dict(checkpoint["network_weights"])
        predictor = nnUNetPredictor(use_mirroring=self.mirroring, device=self.device, allow_tqdm=False)
        predictor.manual_initialization(network, plans_manager, configuration, [checkpoint["network_weights"]],
                                        dataset_json, Gem3dTrainer.__name__,
                                        checkpoint["inference_allowed_mirroring_axes"])
        return predictor

    def predict(self, images: Sequence[Path], out_dir: str | Path, progress: bool = True) -> list[Path]:
        if not self.is_trained():
            raise RuntimeError(f"nnunet segmenter in {self.work_dir} is not trained (no {self.fold_dir.name}/"
                               "checkpoint_final.pth): call train first")
        out_dir = Path(out_dir)
        names = [prediction_name(Path(image)) for image in images]
        if len(set(names)) != len(names):
            raise ValueError(f"nnunet: two images would write one prediction: {sorted(names)}")
        scratch = self.work_dir / "predict_scratch"
        if os.path.exists(scratch):
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        outputs = []
        with nnunet_paths(self.work_dir), quiet(self.work_dir / "nnunet.log", not progress):
            predictor = self._predictor()
            truncated = [str(scratch / name[: -len(ENDING)]) for name in names]
            predictor.predict_from_files_sequential([[str(Path(image).resolve())] for image in images], truncated,
                                                    save_probabilities=False, overwrite=True)
        for image, name in zip(images, names):
            outputs.append(self._on_image_grid(scratch / name, Path(image), out_dir / name))
        shutil.rmtree(scratch)
        return outputs

    @staticmethod
    def _on_image_grid(prediction: Path, image: Path, out: Path) -> Path:
        """Re-save nnU-Net's ``prediction`` with ``image``'s affine (the voxel grid is the image's already) as
        uint8/int16 at ``out``, atomically."""
        reference = nib.load(str(image))
        labels = np.asarray(nib.load(str(prediction)).dataobj)
        if labels.shape != reference.shape[:3]:
            raise RuntimeError(f"nnU-Net's prediction for {image} has shape {labels.shape}, the image "
                               f"{reference.shape[:3]}")
        dtype = np.uint8 if labels.max() < 256 else np.int16
        header = reference.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(1, 0)
        with atomic_path(out) as tmp:
            nib.save(nib.Nifti1Image(labels.astype(dtype), reference.affine, header), str(tmp))
        return out
