"""nnU-Net v2 raw dataset export ("dataset enhancement"): real training cases plus the synthetic cases of gem3d output
folders ``OUT/<setting>/``, one channel (GEM-3D generates one modality; a multi-channel real dataset needs the channel
named, and the export holds that channel only). ``dataset.json`` is written last, so a half-written export has none;
``gem3d_sources.json`` says where each case came from; ``splits_final.json`` holds cross-validation folds over the real
cases in which a synthetic case only trains, and only in the folds where its source case trains (no leak into
validation). nnU-Net reads that file from its *preprocessed* folder: copy it to
``$nnUNet_preprocessed/<Dataset>/splits_final.json`` after ``nnUNetv2_plan_and_preprocess`` and before training."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np

from gem3d.data.check import check_dataset
from gem3d.data.nnunet import read_dataset_json, resolve_channel
from gem3d.files import atomic_path, atomic_write_json

__all__ = ["write_nnunet_dataset", "validate_nnunet_dataset", "find_synthetic_cases", "SyntheticCase",
           "crossval_folds", "leak_free_splits"]

SYNTHETIC_IMAGE_PATTERN = re.compile(r"^(?P<case>.+)_s(?P<sample>\d+)_image\.nii\.gz$")
OUTPUT_ENDING = ".nii.gz"
SPLITS_FILE = "splits_final.json"
NNUNET_SPLIT_SEED = 12345  # nnU-Net's own 5-fold split: KFold(5, shuffle=True, random_state=12345) of sorted cases
NNUNET_FOLDS = 5


@dataclass(frozen=True)
class SyntheticCase:
    """One generated sample on disk: source ``case``, ``setting``, ``sample`` index, ``image``/``label`` paths."""

    case: str
    setting: str
    sample: int
    image: Path
    label: Path

    @property
    def name(self) -> str:
        """The case name in the exported dataset: ``<case>_<setting>_s<k>``."""
        return f"{self.case}_{self.setting}_s{self.sample}"


def find_synthetic_cases(folder: str | os.PathLike) -> list[SyntheticCase]:
    """The ``<case>_s<k>_image.nii.gz`` / ``_label.nii.gz`` pairs in one gem3d output folder (the setting is its name),
    sorted; an image without its label or a label without its image is an error that names it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"synthetic folder {folder} does not exist")
    setting = folder.name
    if not re.fullmatch(r"[A-Za-z0-9\-]+", setting):
        raise ValueError(f"setting name {setting!r} (from {folder}) must be letters, digits or '-' so case names stay parseable")
    images = {p.name[: -len("_image.nii.gz")]: p for p in sorted(folder.glob("*_image.nii.gz"))}
    labels = {p.name[: -len("_label.nii.gz")]: p for p in sorted(folder.glob("*_label.nii.gz"))}
    cases, unpaired = [], []
    for stem, image in images.items():
        match = SYNTHETIC_IMAGE_PATTERN.match(image.name)
        if match is None:
            unpaired.append(f"{image.name} (name is not <case>_s<k>_image.nii.gz)")
        elif stem not in labels:
            unpaired.append(f"{image.name} (no {stem}_label.nii.gz)")
        else:
            cases.append(SyntheticCase(match["case"], setting, int(match["sample"]), image, labels[stem]))
    unpaired += [f"{label.name} (no {stem}_image.nii.gz)" for stem, label in labels.items() if stem not in images]
    if unpaired:
        raise ValueError(f"unpaired synthetic files in {folder}: {unpaired}")
    return sorted(cases, key=lambda c: (c.case, c.sample))


def crossval_folds(cases: Sequence[str], n_folds: int = NNUNET_FOLDS, seed: int = NNUNET_SPLIT_SEED) -> list[list[str]]:
    """The validation cases of each fold of nnU-Net's default split of ``cases`` (scikit-learn's ``KFold(n_folds,
    shuffle=True, random_state=seed)``: a legacy ``RandomState(seed)`` shuffle of the indices, then consecutive
    chunks, the first ``len % n_folds`` one longer), so the real cases fall in the folds nnU-Net gives them."""
    if not 2 <= n_folds <= len(cases):
        raise ValueError(f"n_folds must lie in [2, {len(cases)}] for {len(cases)} cases, got {n_folds}")
    order = np.arange(len(cases))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, len(cases) // n_folds)
    sizes[: len(cases) % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [[cases[i] for i in order[lo:hi]] for lo, hi in zip(bounds[:-1], bounds[1:])]


def leak_free_splits(real_cases: Sequence[str], synthetic_sources: dict[str, str],
                     n_folds: int = NNUNET_FOLDS) -> list[dict[str, list[str]]]:
    """nnU-Net ``splits_final.json`` folds ``[{"train": [...], "val": [...]}]`` over the real cases
    (:func:`crossval_folds` of the sorted cases, ``min(n_folds, len)`` folds); a synthetic case (``{name: source
    case}``) is never validated on and trains only in the folds where its source case trains (a source that is not a
    real case trains everywhere)."""
    real = sorted(real_cases)
    folds = []
    for val in crossval_folds(real, min(n_folds, len(real))):
        held_out = set(val)
        train = [c for c in real if c not in held_out]
        train += sorted(name for name, source in synthetic_sources.items() if source not in held_out)
        folds.append({"train": train, "val": sorted(val)})
    return folds


def _transfer(src: Path, dst: Path, copy: bool) -> None:
    """Copy or symlink ``src`` to the new ``dst``; a ``.nii`` source is re-saved as ``.nii.gz`` with its header."""
    if src.name.endswith(OUTPUT_ENDING) == dst.name.endswith(OUTPUT_ENDING):
        if copy:
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        else:
            os.symlink(src.resolve(), dst)
        return
    with atomic_path(dst) as tmp:
        nib.save(nib.load(src), tmp)


def write_nnunet_dataset(real_dir: str | os.PathLike, synthetic_dirs: Sequence[str | os.PathLike],
                         out_dir: str | os.PathLike, dataset_name: str | None = None, copy: bool = True, *,
                         channel: int | str | None = None, overwrite: bool = False,
                         keep: Callable[[SyntheticCase], bool] | None = None) -> Path:
    """Write an enhanced nnU-Net raw dataset (real training cases + every synthetic case kept by the quality filter
    ``keep``) and its leak-free ``splits_final.json`` (:func:`leak_free_splits`; none with fewer than 2 real cases)
    to ``out_dir`` and return it. ``dataset_name``: ``dataset.json['name']`` (default ``out_dir``'s name); ``copy``:
    copy files, else symlink them; ``channel``: the real channel exported (index or name; may be omitted for a
    one-channel dataset: synthetic cases have one modality, so a multi-channel dataset is refused unless one is
    chosen); ``overwrite``: replace an existing export in ``out_dir``."""
    real_dir, out_dir = Path(real_dir), Path(out_dir)
    meta = read_dataset_json(real_dir)
    ending = meta["file_ending"]
    if ending not in (".nii.gz", ".nii"):
        raise ValueError(f"real dataset file_ending {ending!r} is not supported; gem3d exports NIfTI ('.nii.gz' or '.nii')")
    channel_names = {str(k): v for k, v in meta["channel_names"].items()}
    if channel is None and len(channel_names) > 1:
        raise ValueError(
            f"the real dataset {real_dir} has {len(channel_names)} channels {channel_names}, but synthetic cases have "
            f"one modality: choose the channel to export (--channel NAME or index); the enhanced dataset then holds "
            f"that channel only, for real and synthetic cases alike"
        )
    channel = resolve_channel(channel_names, channel, where=f"the real dataset's {real_dir / 'dataset.json'}")
    if out_dir.resolve() == real_dir.resolve():
        raise ValueError(f"out_dir {out_dir} must differ from the real dataset {real_dir}")

    images_out, labels_out = out_dir / "imagesTr", out_dir / "labelsTr"
    existing = [p for p in (out_dir / "dataset.json", images_out, labels_out) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds an export ({[p.name for p in existing]}); "
                              "pass overwrite=True to replace it")
    (out_dir / "dataset.json").unlink(missing_ok=True)
    for folder in (images_out, labels_out):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

    sources: dict[str, dict[str, Any]] = {}

    def add(name: str, image: Path, label: Path, source: dict[str, Any]) -> None:
        _transfer(image, images_out / f"{name}_0000{OUTPUT_ENDING}", copy)
        _transfer(label, labels_out / f"{name}{OUTPUT_ENDING}", copy)
        sources[name] = {**source, "image": str(image), "label": str(label)}

    real_cases = sorted(p.name[: -len(ending)] for p in (real_dir / "labelsTr").iterdir()
                        if p.name.endswith(ending) and not p.name.startswith("."))
    if not real_cases:
        raise ValueError(f"no training labels ending with {ending!r} in {real_dir / 'labelsTr'}")
    for case in real_cases:
        image = real_dir / "imagesTr" / f"{case}_{channel:04d}{ending}"
        label = real_dir / "labelsTr" / f"{case}{ending}"
        if not image.is_file():
            raise FileNotFoundError(f"real case {case!r} has a label but no image {image}")
        add(case, image, label, {"kind": "real"})

    for folder in synthetic_dirs:
        for item in find_synthetic_cases(folder):
            if keep is not None and not keep(item):
                continue
            if item.name in sources:
                raise ValueError(f"synthetic case name {item.name!r} from {item.image} collides with an existing case ({sources[item.name]})")
            add(item.name, item.image, item.label,
                {"kind": "synthetic", "case": item.case, "setting": item.setting, "sample": item.sample})

    out_meta = {k: v for k, v in meta.items() if k not in ("numTraining", "file_ending", "channel_names", "name")}
    num_synthetic = sum(1 for s in sources.values() if s["kind"] == "synthetic")
    out_meta.update(
        name=dataset_name or out_dir.name,
        channel_names={"0": channel_names[str(channel)]},
        numTraining=len(sources),
        file_ending=OUTPUT_ENDING,
        description=f"{meta.get('name', real_dir.name)} enhanced by gem3d: {len(real_cases)} real + {num_synthetic} "
                    "synthetic training cases",
    )
    atomic_write_json(out_dir / "gem3d_sources.json", {"real_dataset": str(real_dir), "channel": channel,
                                                       "cases": sources})
    (out_dir / SPLITS_FILE).unlink(missing_ok=True)
    if len(real_cases) >= 2:
        synthetic_sources = {name: s["case"] for name, s in sources.items() if s["kind"] == "synthetic"}
        atomic_write_json(out_dir / SPLITS_FILE, leak_free_splits(real_cases, synthetic_sources))
    else:
        warnings.warn(f"{out_dir}: one real case cannot be cross-validated, so no {SPLITS_FILE} is written; train "
                      f"nnU-Net with fold 'all'", UserWarning, stacklevel=2)
    atomic_write_json(out_dir / "dataset.json", out_meta)
    return out_dir


def validate_nnunet_dataset(root: str | os.PathLike) -> list[str]:
    """Problems that would stop nnU-Net v2 from training on the raw dataset at ``root`` (empty = valid), one line each:
    :func:`gem3d.data.check.check_dataset` with nnU-Net's folder name required and no minimum slice count."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root} is not a folder"]
    return [str(problem) for problem in check_dataset(root, min_slices=1, nnunet_name=True)]
