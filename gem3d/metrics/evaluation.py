"""Evaluate synthetic volumes against the real dataset: reconstruction, distribution, 3D consistency, label fidelity,
the informed slice's effect, with reference rows, written as metrics.csv, summary.md, PNG plots and report.html.

    python scripts/evaluate.py --real DATASET --synthetic gem3d=OUT/test --synthetic base=OUT/base \\
        [--autoencoder MODEL_DIR] [--fid-weights-2d RadImageNet-ResNet50.pt] [--fid-weights-3d resnet_10.pth] \\
        [--segmenter-backend monai --segmenter-iterations 450 --segmenter-options JSON | --segmenter TRAINED_FOLDER] \\
        [--metrics reconstruction consistency labels ...] --out REPORT_DIR

Every ``--synthetic [NAME=]FOLDER`` is an inference output folder (``OUT/<setting>`` with ``manifest.json``); its
samples are matched to their real cases through the manifest. NAME (default: the folder's name) names the report
row. Reference rows: ``reference: copy informed slice`` (the real informed slice copied into every slice), with
``--autoencoder``, ``reference: autoencoder`` (the real volume encoded and decoded: the ceiling), and ``reference:
real volume`` (the real volumes themselves); stage 1 alone, ``base`` and GEM-3D are ``--synthetic`` folders. All
volumes are compared in the canonical orientation (axial slices first) on one [0, 1] intensity scale per row
(:class:`.volumes.IntensityScale`: a CT model's training window, from the manifest or ``--window``, both volumes
clipped to it; else the real case's min/max); "body" is the real case's body region plus its labels.

summary.md and report.html also hold each row's intensity scale, the time and memory per setting (from the
manifests), and, for generated informed slices (``ig``, ``igma``; metric group ``informed``), their plane's intensity
distance to real slices at the same position and the segmenter's Dice there, each with its real yardstick.

Label fidelity (metric group ``segmenter``): a segmenter trained on the real training cases (``splits.json``
``train``, never the evaluated cases; cached in ``--segmenter-cache``) labels every synthetic volume and every
evaluated real volume; Dice per label against the mask the volume was made from (``dice_<label>``), their mean
(``dice_mean``) and its ratio to the real volumes' (``dice_ratio``).

After the headline, summary.md and report.html hold a table of each synthetic row's Dice per label as a ratio of
the real volumes' and its through-plane ratio as a ratio of the autoencoder's, with the label-fidelity targets met
or not (:func:`.report.targets_section`); ``python -m gem3d.metrics.report REPORT/metrics.csv`` prints it again from
metrics.csv alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from gem3d.data.case import load_case
from gem3d.data.datasets import default_splits_path, read_splits, split_cases
from gem3d.data.preprocess import PreprocessConfig
from gem3d.export.preview import save_preview, view_slice
from gem3d.files import atomic_write_text
from gem3d.segmentation import (BACKENDS, DEFAULT_ITERATIONS, Segmenter, SegmenterSettings, dataset_training_cases,
                                load_trained_segmenter, trained_segmenter)

from . import distribution, features, labels as label_metrics, references, report
from .consistency import consistency_metrics, intensity_profile, slice_jumps
from .informed import informed_plane, plane_dice, plane_voxels, slice_distances
from .image import MS_SSIM_WEIGHTS, SSIM_WINDOW, ms_ssim_scales, reconstruction_metrics, to_unit_range
from .volumes import (REAL_RANGE, IntensityScale, RealData, SyntheticSample, has_ground_truth, load_samples,
                      scale_from_preprocess)

METRIC_GROUPS = ("reconstruction", "consistency", "labels", "fid", "mmd", "diversity", "frd", "counterfactual",
                 "segmenter", "informed")
COPY_ROW = "reference: copy informed slice"
AUTOENCODER_ROW = "reference: autoencoder"
REAL_VOLUME_ROW = "reference: real volume"
REAL_ROW = "real"  # the real volumes' series in the plots
MMD_GRID = (16, 32, 32)
SUMMARY_METRICS = ("psnr_body", "psnr_axial_body", "ssim_body", "ssim_axial_body", "ms_ssim", "ms_ssim_axial",
                   "slice_jump", "slice_jump_ratio", "through_plane_ratio", "outside_mean", "outside_mean_diff",
                   "label_order_kept", "dice_mean", "dice_ratio", "fid_25d", "fid_3d", "mmd", "ms_ssim_diversity",
                   "frd")
SEGMENTER_DEFAULTS = {"backend": "monai", "iterations": DEFAULT_ITERATIONS, "seed": 0, "device": "cpu"}


def parse_synthetic(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep:
        return Path(spec).name, Path(spec)
    if not name or not folder:
        raise SystemExit(f"--synthetic must be FOLDER or NAME=FOLDER, got {spec!r}")
    return name, Path(folder)


def splits_file(real: RealData, args=None) -> Path:
    """The splits file: ``--splits``, else the dataset's own ``splits.json``, else the one training wrote in the
    dataset's cache folder (:func:`gem3d.data.datasets.default_splits_path`, as inference reads it)."""
    given = getattr(args, "splits", None)
    return Path(given) if given is not None else default_splits_path(real.dataset.root)


def select_cases(spec: str, real: RealData, splits_path: Path | None = None) -> set[str]:
    """``--cases``: ``a,b,c`` or ``split:NAME`` (from ``splits_path``, default :func:`splits_file`)."""
    if spec.startswith("split:"):
        try:
            return set(split_cases(real.dataset.root, spec.split(":", 1)[1], splits_path or splits_file(real)))
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(str(err)) from None
    names = {n.strip() for n in spec.split(",") if n.strip()}
    unknown = sorted(names - set(real.names))
    if unknown:
        raise SystemExit(f"--cases: unknown case(s) {unknown}; the dataset has {real.names}")
    return names


def reference_samples(real: RealData, cases: list[str], test_samples: list[SyntheticSample],
                      first_stage=None, preprocess: PreprocessConfig | None = None,
                      scale: IntensityScale = REAL_RANGE) -> list[SyntheticSample]:
    """Copy-the-informed-slice and autoencoder reference volumes of ``cases`` (the informed slice of a case's
    ``test`` sample where there is one, else the middle slice): the copy on ``scale``, the autoencoder's
    reconstruction on its own preprocessing's scale (:func:`scale_from_preprocess`)."""
    informed = {s.case: s.record.get("informed", {}).get("index") for s in test_samples}
    out = []
    for name in cases:
        case = real.case(name)
        index = informed.get(name)
        record = {"case": name, "setting": "reference", "sample": 0, "files": {"gt": ""},
                  "informed": {"source": "own_middle", "case": name, "index": index}}
        copy = references.copy_slice_volume(real.image(name, scale), index)
        out.append(SyntheticSample(COPY_ROW, record, copy, case.label, case.body, case.image_path, None, scale=scale))
        if first_stage is not None:
            raw = references.autoencoder_reconstruction(first_stage, case.raw, case.label, case.geometry, preprocess)
            own = scale_from_preprocess(dataclasses.asdict(preprocess), "the autoencoder's training window")
            image = to_unit_range(raw, case.raw) if own.window is None else own.to_unit(raw, case.raw_range)
            out.append(SyntheticSample(AUTOENCODER_ROW, dict(record, informed=None), image,
                                       case.label, case.body, case.image_path, None, scale=own))
    return out


def real_volume_samples(real: RealData, cases: list[str],
                        scale: IntensityScale = REAL_RANGE) -> list[SyntheticSample]:
    """The real volumes of ``cases`` on ``scale`` as samples of the ``reference: real volume`` row (their own
    labels)."""
    samples = []
    for name in cases:
        case = real.case(name)
        samples.append(SyntheticSample(REAL_VOLUME_ROW, {"case": name, "setting": "real", "sample": 0},
                                       real.image(name, scale), case.label, case.body, case.image_path,
                                       case.label_path, scale=scale))
    return samples


def sample_row(sample: SyntheticSample, real: RealData, groups: set[str]) -> dict:
    """The per-sample metrics of one volume against its real case."""
    case = real.case(sample.case)
    record = sample.record
    informed = record.get("informed") or {}
    row = {"row": sample.row, "case": sample.case, "setting": record.get("setting", ""),
           "sample": record.get("sample", 0),
           "informed_from": "" if not informed.get("case") else f"{informed.get('case')}:{informed.get('index')}"}
    reference = real.image(sample.case, sample.scale)  # the real volume on the sample's scale
    if "reconstruction" in groups and has_ground_truth(sample):
        row.update(reconstruction_metrics(sample.image, reference, case.body, case.label, real.label_names,
                                          unit_scale=sample.scale.window is not None))
    if "consistency" in groups:
        row.update(consistency_metrics(sample.image, reference, case.body))
    if "labels" in groups:
        row.update(label_metrics.label_fidelity(sample.image, reference, sample.label, sample.body, real.label_names,
                                                real_labels=case.label, real_body=case.body))
    return row


def resample(volume: np.ndarray, grid=MMD_GRID) -> np.ndarray:
    """``(D, H, W)`` -> ``grid`` (trilinear), for set metrics over volumes of different shapes."""
    x = rearrange(torch.as_tensor(np.asarray(volume, np.float32)), "d h w -> 1 1 d h w")
    return F.interpolate(x, size=grid, mode="trilinear", align_corners=False)[0, 0].numpy()


def set_metrics(rows: dict[str, list[SyntheticSample]], real: RealData, cases: list[str], groups: set[str],
                args, out: Path, notes: list[str], scale: IntensityScale = REAL_RANGE) -> dict[str, dict[str, float]]:
    """Distribution metrics per row (synthetic set vs the real cases ``cases``, on ``scale``)."""
    result: dict[str, dict[str, float]] = {name: {} for name in rows}
    real_cases = [dataclasses.replace(real.case(n), image=real.image(n, scale)) for n in cases]
    if "fid" in groups:
        fid_metrics(result, rows, real_cases, args, notes)
    if "mmd" in groups:
        real_set = np.stack([resample(c.image) for c in real_cases])
        for name, samples in rows.items():
            if min(len(samples), len(real_set)) >= 2:
                result[name]["mmd"] = distribution.mmd(real_set, np.stack([resample(s.image) for s in samples]))
        notes.append(f"mmd: MONAI MMDMetric (linear kernel) on volumes resampled to {MMD_GRID}, the larger set cut to "
                     "the smaller one's size")
    if "diversity" in groups:
        for name, samples in rows.items():
            by_case: dict[str, list[np.ndarray]] = {}
            for s in samples:
                by_case.setdefault(s.case, []).append(s.image)
            pairs = [v for v in by_case.values() if len(v) > 1]
            if pairs:
                result[name]["ms_ssim_diversity"] = float(np.nanmean([distribution.ms_ssim_diversity(v)
                                                                      for v in pairs]))
        notes.append("ms_ssim_diversity: mean axial MS-SSIM between samples of the same case (only rows with more "
                     "than one sample per case)")
    if "frd" in groups:
        frd_metrics(result, rows, real_cases, args, out, notes)
    return result


def fid_metrics(result: dict, rows: dict[str, list[SyntheticSample]], real_cases, args, notes: list[str]) -> None:
    """2.5D and 3D FID of every row against ``real_cases`` into ``result`` (skipped without weight files)."""
    nets = {}
    for kind, path in (("2d", args.fid_weights_2d), ("3d", args.fid_weights_3d)):
        if path is None:
            notes.append(f"fid_{'25d' if kind == '2d' else '3d'}: skipped: no --fid-weights-{kind} file given "
                         f"({'RadImageNet ResNet-50' if kind == '2d' else 'MedicalNet ResNet-10/18/50'} weights)")
            continue
        nets[kind] = (features.load_radimagenet_resnet50(path) if kind == "2d"
                      else features.load_medicalnet_resnet(path, args.fid_depth_3d))
    if "2d" in nets:
        real_25d = [features.volume_features_25d(c.image, nets["2d"], c.body) for c in real_cases]
    if "3d" in nets:
        real_3d = np.concatenate([features.volume_features_3d(c.image, nets["3d"]) for c in real_cases])
    for name, samples in rows.items():
        if "2d" in nets:
            fake = [features.volume_features_25d(s.image, nets["2d"], s.body) for s in samples]
            for view in features.VIEWS:
                result[name][f"fid_2d_{view}"] = distribution.frechet_distance(
                    np.concatenate([f[view] for f in real_25d]), np.concatenate([f[view] for f in fake]))
            result[name]["fid_25d"] = float(np.mean([result[name][f"fid_2d_{v}"] for v in features.VIEWS]))
        if "3d" in nets:
            fake3 = np.concatenate([features.volume_features_3d(s.image, nets["3d"]) for s in samples])
            if min(len(fake3), len(real_3d)) >= 2:
                result[name]["fid_3d"] = distribution.frechet_distance(real_3d, fake3)


def frd_metrics(result: dict, rows: dict[str, list[SyntheticSample]], real_cases, args, out: Path,
                notes: list[str]) -> None:
    """The Fréchet Radiomics Distance of every row with >= 2 samples into ``result`` (skipped without frd-score)."""
    ok, reason = distribution.frd_available()
    if not ok:
        notes.append(f"frd: {reason}")
        return
    workdir = out / "frd_inputs"
    try:
        real_files = write_frd_inputs(workdir / REAL_ROW, [(c.name, c.image, c.body) for c in real_cases])
        for index, (name, samples) in enumerate(rows.items()):
            if len(samples) < 2:
                continue
            fake_files = write_frd_inputs(workdir / f"row{index}",
                                          [(f"{s.case}_s{i}", s.image, s.body) for i, s in enumerate(samples)])
            result[name]["frd"] = distribution.frd(real_files[0], fake_files[0], real_files[1], fake_files[1],
                                                   num_workers=args.frd_workers)
        notes.append("frd: " + distribution.FRD_LOG_NOTE + " Features inside the body; -inf = identical sets.")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def write_frd_inputs(folder: Path, volumes) -> tuple[list[Path], list[Path]]:
    """NIfTI files (identity affine, [0, 1] intensities) and body masks for frd-score."""
    folder.mkdir(parents=True, exist_ok=True)
    images, masks = [], []
    for name, image, body in volumes:
        images.append(folder / f"{name}.nii.gz")
        masks.append(folder / f"{name}_mask.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(image, np.float32), np.eye(4)), str(images[-1]))
        nib.save(nib.Nifti1Image(np.asarray(body, np.uint8), np.eye(4)), str(masks[-1]))
    return images, masks


def counterfactual_rows(samples: list[SyntheticSample], real: RealData) -> list[dict]:
    """Pairs of samples of one case, mask and seed (so the same noise) generated with two different real donors'
    informed slices (e.g. two runs with ``--informed-from A`` / ``--informed-from B``)."""
    groups: dict[tuple, list[SyntheticSample]] = {}
    for s in samples:
        informed = s.record.get("informed") or {}
        if informed.get("source") == "other_case" and informed.get("case") is not None:
            key = (s.case, s.record.get("seed"), json.dumps(s.record.get("mask_edits") or [], sort_keys=True))
            groups.setdefault(key, []).append(s)
    rows = []
    for (case, _, _), members in groups.items():
        for a, b in itertools.combinations(members, 2):
            ia, ib = a.record["informed"], b.record["informed"]
            if (ia["case"], ia.get("index")) == (ib["case"], ib.get("index")) or a.label.shape != b.label.shape:
                continue
            donors = []
            for info in (ia, ib):
                donor = real.case(info["case"])
                index = int(info["index"])
                donors += [donor.image[index], np.where(donor.body[index], donor.label[index], -1)]
            row = {"row_a": a.row, "row_b": b.row, "case": case, "donor_a": f"{ia['case']}:{ia['index']}",
                   "donor_b": f"{ib['case']}:{ib['index']}"}
            row.update(references.counterfactual_effect(a.image, b.image, a.label, a.body | b.body, *donors))
            rows.append(row)
    return rows


def plots(out: Path, rows: dict[str, list[SyntheticSample]], real: RealData, cases: list[str],
          scale: IntensityScale = REAL_RANGE) -> list[Path]:
    """Histograms per label, through-plane profiles (first case), slice-jump distributions (the real volumes on
    ``scale``)."""
    paths = []
    real_cases = [dataclasses.replace(real.case(n), image=real.image(n, scale)) for n in cases]
    values = sorted({int(v) for c in real_cases for v in np.unique(c.label) if v > 0})
    names = real.label_names
    for value in [0, *values]:
        title = "body without label" if value == 0 else f"label {value} ({names.get(value, value)})"

        def voxels(image, label, body):
            return image[(label == value) & body] if value else image[body & (label <= 0)]

        series = {REAL_ROW: report.density(np.concatenate([voxels(c.image, c.label, c.body) for c in real_cases]))}
        for name, samples in rows.items():
            if samples:
                series[name] = report.density(np.concatenate([voxels(s.image, s.label, s.body) for s in samples]))
        paths.append(report.line_plot(out / f"histogram_label{value}.png", series, f"intensity histogram: {title}",
                                      "intensity [0, 1]", "density"))
    if cases:
        case = real_cases[0]
        series = {REAL_ROW: (np.arange(case.image.shape[0]), intensity_profile(case.image, case.body))}
        for name, samples in rows.items():
            for s in samples:
                if s.case == case.name:
                    series[name] = (np.arange(s.image.shape[0]), intensity_profile(s.image, s.body))
                    break
        paths.append(report.line_plot(out / "profile_through_plane.png", series,
                                      f"mean intensity per axial slice inside the body: {case.name}", "slice", "mean"))
    real_jumps = np.concatenate([slice_jumps(c.image, c.body) for c in real_cases])
    hi = float(np.nanmax(real_jumps)) * 3 if np.isfinite(real_jumps).any() else 1.0
    series = {REAL_ROW: report.density(real_jumps, 40, (0.0, hi))}
    for name, samples in rows.items():
        if samples:
            series[name] = report.density(np.concatenate([slice_jumps(s.image, s.body) for s in samples]), 40,
                                          (0.0, hi))
    paths.append(report.line_plot(out / "slice_jumps.png", series, "distribution of neighbouring-slice jumps",
                                  "mean |slice difference|", "density"))
    return paths


# ------------------------------------------------------------------------------------------------ label fidelity
def segmenter_training_cases(real: RealData, held_out: list[str], notes: list[str],
                             splits_path: Path | None = None) -> list[str]:
    """The real cases a label-fidelity segmenter trains on: the splits file's ``train`` (``splits_path``, default
    :func:`splits_file`; every case when there is none), never one of ``held_out`` (the evaluated cases)."""
    path = splits_path or splits_file(real)
    names = read_splits(path)["train"] if path.is_file() else real.names
    kept = [n for n in names if n not in set(held_out)]
    if len(kept) < len(names):
        notes.append(f"segmenter: {sorted(set(names) - set(kept))} left out of its training cases: they are evaluated")
    return kept


def fidelity_segmenter(real: RealData, held_out: list[str], args, cache_root: Path, notes: list[str],
                       progress: bool = False) -> Segmenter | None:
    """The label-fidelity segmenter: ``--segmenter FOLDER`` (trained before), else one trained on the real
    training cases (:func:`segmenter_training_cases`) with the ``--segmenter-*`` settings, cached in ``cache_root``.
    None, with the reason in ``notes``, when it cannot run."""
    if args.segmenter is not None:
        try:
            segmenter = load_trained_segmenter(args.segmenter, device=args.segmenter_device, fold=args.segmenter_fold)
        except ImportError as err:
            notes.append(f"dice (--segmenter {args.segmenter}): skipped: {err}")
            return None
        notes.append(f"dice: the trained segmenter in {args.segmenter} ({segmenter.settings.backend})")
        return segmenter
    names = segmenter_training_cases(real, held_out, notes, splits_file(real, args))
    if not names:
        notes.append("dice: skipped: no real training case is left for the segmenter (every case is evaluated)")
        return None
    options = {"num_labels": max(1, real.dataset.max_label)} if args.segmenter_backend == "monai" else {}
    options.update(args.segmenter_options)
    settings = SegmenterSettings(backend=args.segmenter_backend, iterations=args.segmenter_iterations,
                                 seed=args.segmenter_seed, device=args.segmenter_device or "cpu", options=options)
    cases = dataset_training_cases(real.dataset, names)
    try:
        segmenter = trained_segmenter(settings, cases, cache_root, progress=progress)
    except ImportError as err:
        notes.append(f"dice: skipped: {err}")
        return None
    chosen = "".join(f", {key} {value}" for key, value in args.segmenter_options.items())
    notes.append(f"dice: a {settings.backend} segmenter ({settings.iterations} iterations, seed {settings.seed}"
                 f"{chosen}) trained on the {len(names)} real training cases {names}, cached in {segmenter.work_dir}")
    return segmenter


def fidelity_dice(segmenter: Segmenter, rows: dict[str, list[SyntheticSample]], real: RealData, out: Path,
                  zero_outside_body: bool, progress: bool = False,
                  predictions: dict | None = None) -> dict[int, dict[str, float]]:
    """``{id(sample): {dice_<label>: ..., dice_mean: ...}}`` of every sample of ``rows``: the segmenter's labels on
    the sample's volume (written to ``out/segmentations/<row>/``) against the sample's mask. With
    ``zero_outside_body`` each volume is first set to 0 outside its body, as the real (skull-stripped) volumes are.
    ``predictions``, when given, receives ``{id(sample): prediction file}``."""
    num_labels = max(1, real.dataset.max_label)
    result = {}
    with tempfile.TemporaryDirectory(dir=out, prefix=".segmenter_inputs_") as inputs:
        for name, samples in rows.items():
            slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            images: list[Path] = []
            for index, s in enumerate(samples):
                stem = f"{s.case}_s{s.record.get('sample', 0)}"
                path = Path(inputs) / slug / f"{stem}_0000.nii.gz"
                if path in images:  # two samples of one case and index in a row: keep both
                    path = path.with_name(f"{stem}_{index}_0000.nii.gz")
                if zero_outside_body:
                    label_metrics.zero_outside(s.image_path, s.body, path, slice_axis=real.slice_axis)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(s.image_path, path)
                images.append(path)
            paths: list[Path] = []
            scores = label_metrics.segmenter_dice(segmenter, images, [s.label for s in samples], num_labels,
                                                  out / "segmentations" / slug, slice_axis=real.slice_axis,
                                                  progress=progress, prediction_paths=paths)
            for s, score, path in zip(samples, scores, paths):
                result[id(s)] = label_metrics.dice_columns(score, real.label_names)
                if predictions is not None:
                    predictions[id(s)] = path
    return result


def informed_plane_dice(scored: list[tuple[SyntheticSample, dict]], real_samples: list[SyntheticSample],
                        predictions: Mapping[int, Path], real: RealData, notes: list[str]) -> None:
    """Add ``informed_dice`` (the segmenter on the volume at its generated informed slice's plane, against the
    volume's mask there) and ``informed_dice_real`` (on the real volume of its case at that plane, against the real
    label) to the rows of samples with a generated informed slice."""
    real_by_case = {s.case: s for s in real_samples}
    num_labels = max(1, real.dataset.max_label)
    loaded: dict[Path, np.ndarray] = {}

    def prediction(sample: SyntheticSample) -> np.ndarray | None:
        path = predictions.get(id(sample))
        if path is not None and path not in loaded:
            loaded.clear()  # one volume at a time in memory
            loaded[path] = np.rint(load_case(path, slice_axis=real.slice_axis).image).astype(np.int64)
        return None if path is None else loaded[path]

    done = False
    for s, row in scored:
        plane = informed_plane(s.record)
        if plane is None or s.row == REAL_VOLUME_ROW or s.case not in real_by_case:
            continue
        generated = prediction(s)
        if generated is not None:
            row["informed_dice"] = plane_dice(generated, s.label, plane, num_labels)
            done = True
        real_sample = real_by_case[s.case]
        real_prediction = prediction(real_sample)
        if real_prediction is not None:
            row["informed_dice_real"] = plane_dice(real_prediction, real_sample.label, plane, num_labels)
    if done:
        notes.append("informed_dice: the segmenter's labels at the plane of the generated informed slice against the "
                     "mask there (mean over the labels the plane holds); informed_dice_real: the same on the real "
                     "volume of the case at that plane")


def informed_slice_rows(scored: list[tuple[SyntheticSample, dict]], real: RealData, cases: list[str],
                        notes: list[str]) -> None:
    """Add ``informed_w1`` and its real-vs-real yardstick ``informed_w1_real`` (:func:`.informed.slice_distances`)
    to the rows of samples with a generated informed slice (``ig``, ``igma``), against the other evaluated cases."""
    done = False
    for s, row in scored:
        plane = informed_plane(s.record)
        if plane is None or s.case not in cases:
            continue
        case = real.case(s.case)
        others = [(real.image(n, s.scale), real.case(n).body) for n in cases if n != s.case]
        row.update(slice_distances(s.image, s.body, plane, (real.image(s.case, s.scale), case.body), others))
        done = True
    if done:
        notes.append("informed_w1: the generated informed slice is measured where the volume holds it (the plane "
                     "informed.target_index; the engine does not write the slice itself): the 1-D Wasserstein "
                     "distance (scipy) of its body intensities to each other evaluated case's real slice at the same "
                     "relative position, mean; informed_w1_real: the same from the real slice of the sample's own "
                     "case (a real slice scores it exactly)")


def add_dice_ratio(scored: list[tuple[SyntheticSample, dict]]) -> float:
    """Add ``dice_ratio`` (the sample's ``dice_mean`` / the mean ``dice_mean`` of the ``reference: real volume``
    row) to every row with a ``dice_mean``; returns that reference mean (NaN without it)."""
    reference = [row["dice_mean"] for s, row in scored if s.row == REAL_VOLUME_ROW and "dice_mean" in row]
    finite = [v for v in reference if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.nan
    for _, row in scored:
        if "dice_mean" in row:
            row["dice_ratio"] = row["dice_mean"] / mean if mean > 0 else math.nan
    return mean


def add_segmenter_arguments(p: argparse.ArgumentParser, default_cache: str) -> None:
    """The ``--segmenter*`` options of the label-fidelity segmenter (evaluation and the ``--min-dice`` filter)."""
    p.add_argument("--segmenter", type=Path, metavar="TRAINED_FOLDER",
                   help="use a segmenter trained before: a gem3d segmenter folder (segmenter.json, either backend) "
                   "or a trained nnU-Net v2 model folder (needs nnunetv2); default: train one on the real training "
                   "cases with the options below")
    p.add_argument("--segmenter-backend", default=SEGMENTER_DEFAULTS["backend"], choices=sorted(BACKENDS),
                   help="backend of the segmenter trained on the real training cases (default monai)")
    p.add_argument("--segmenter-iterations", type=int, default=SEGMENTER_DEFAULTS["iterations"],
                   help="its training iterations (nnU-Net: epochs x iterations per epoch; default %(default)s, the "
                        "demo's; gem3d.segmentation.DEFAULT_ITERATIONS)")
    p.add_argument("--segmenter-seed", type=int, default=SEGMENTER_DEFAULTS["seed"])
    p.add_argument("--segmenter-options", type=segmenter_options, default={}, metavar="JSON",
                   help="backend options of the segmenter trained on the real training cases, a JSON object, e.g. "
                        "'{\"patch\": [32, 48, 48]}' (MONAI: features, patch, batch_size, learning_rate; "
                        "gem3d/segmentation/monai_backend.py); checked by the backend")
    p.add_argument("--segmenter-device", default=None,
                   help="cpu, cuda, cuda:N (default: cpu, or a trained folder's own)")
    p.add_argument("--segmenter-fold", default=None, help="fold of an nnU-Net model folder: 0..4 or all (default 0)")
    p.add_argument("--segmenter-cache", type=Path, metavar="DIR",
                   help=f"folder of trained segmenters, one per settings and training cases (default {default_cache})")


def segmenter_options(text: str) -> dict:
    """``--segmenter-options``: a JSON object (its keys and values are checked by the backend)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"patch\": [32, 48, 48]}}', got {text!r}")
    return value


def check_segmenter_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.segmenter_iterations < 1:
        p.error(f"--segmenter-iterations must be >= 1, got {args.segmenter_iterations}")
    if args.segmenter_fold is not None and args.segmenter_fold not in ("0", "1", "2", "3", "4", "all"):
        p.error(f"--segmenter-fold must be one of 0, 1, 2, 3, 4, all; got {args.segmenter_fold!r}")


# ------------------------------------------------------------------------------------------------ the command
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", type=Path, required=True, help="nnU-Net raw dataset folder (imagesTr, labelsTr)")
    p.add_argument("--split", default="Tr", choices=("Tr", "Ts"))
    p.add_argument("--synthetic", action="append", default=[], metavar="[NAME=]FOLDER",
                   help="inference output folder OUT/<setting> (repeatable; NAME names the report row)")
    p.add_argument("--splits", type=Path, metavar="FILE",
                   help="splits.json of --cases split:NAME and of the segmenter's training cases (default: the "
                   "dataset's own splits.json, else the one training wrote in the dataset's cache folder)")
    p.add_argument("--cases", help="real cases to evaluate: 'a,b,c' or 'split:val' (from --splits); "
                   "default: the cases of the synthetic samples, or every case")
    p.add_argument("--metrics", nargs="+", default=list(METRIC_GROUPS), choices=METRIC_GROUPS)
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--autoencoder", type=Path, help="autoencoder run or GEM-3D model dir: adds the ceiling row")
    p.add_argument("--fid-weights-2d", type=Path, help="RadImageNet ResNet-50 PyTorch weights (.pt/.pth)")
    p.add_argument("--fid-weights-3d", type=Path, help="MedicalNet resnet_10/18/50 weights (.pth)")
    p.add_argument("--fid-depth-3d", type=int, choices=features.MEDICALNET_DEPTHS,
                   help="MedicalNet depth (default: from the file name)")
    add_segmenter_arguments(p, "OUT/segmenter_cache")
    p.add_argument("--body", default="nonzero", choices=("nonzero", "threshold", "none"),
                   help="body region of the real volumes: nonzero (MRI), threshold (CT), none")
    p.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="evaluate every row inside this intensity window (CT: HU), both volumes clipped to it; "
                   "default: the window each output's manifest records (a model trained with intensity: window), "
                   "else each real case's min/max")
    p.add_argument("--slice-axis", type=int, default=2, choices=(0, 1, 2), help="RAS axis of the slices (2 = axial)")
    p.add_argument("--frd-workers", type=int, default=1)
    p.add_argument("--link-images", action="store_true", help="link the PNGs from report.html instead of embedding")
    p.add_argument("--trust-checkpoint", action="store_true")
    args = p.parse_args(argv)
    check_segmenter_arguments(p, args)
    return args


def load_rows(args, real: RealData) -> tuple[dict[str, list[SyntheticSample]], list[str]]:
    """The ``--synthetic`` rows (cut to ``--cases``) and the evaluated case names."""
    rows: dict[str, list[SyntheticSample]] = {}
    for spec in args.synthetic:
        name, folder = parse_synthetic(spec)
        if name in rows:
            raise SystemExit(f"--synthetic: row name {name!r} given twice; name them NAME=FOLDER")
        rows[name] = load_samples(folder, name, real, window_scale(args))
    cases = sorted({s.case for samples in rows.values() for s in samples}) or real.names
    if args.cases:
        wanted = select_cases(args.cases, real, splits_file(real, args))
        rows = {name: [s for s in samples if s.case in wanted] for name, samples in rows.items()}
        cases = [c for c in real.names if c in wanted]
    return rows, cases


def window_scale(args) -> IntensityScale | None:
    """``--window LO HI`` as a scale (None without it)."""
    window = getattr(args, "window", None)
    return None if window is None else IntensityScale(tuple(window), "--window")


def evaluation_scale(rows: dict[str, list[SyntheticSample]], args, notes: list[str]) -> IntensityScale:
    """The scale of the reference rows, the real volumes' row, the set metrics and the plots: ``--window``, else
    the synthetic rows' one scale (the real case's min/max without rows, or when they differ: then noted)."""
    given = window_scale(args)
    if given is not None:
        return given
    scales = list(dict.fromkeys(s.scale for samples in rows.values() for s in samples))
    if len(scales) > 1:
        notes.append("intensity scale: the rows were generated with different preprocessing; the references, set "
                     "metrics and plots use each real case's min/max (see 'Intensity scale' for each row's)")
    return scales[0] if len(scales) == 1 else REAL_RANGE


def reference_rows(args, real: RealData, rows, cases: list[str], out: Path, notes: list[str],
                   scale: IntensityScale = REAL_RANGE) -> dict[str, list[SyntheticSample]]:
    """The copy-informed-slice and autoencoder reference rows, each sample with its preview."""
    test_samples = [s for samples in rows.values() for s in samples if s.record.get("setting") == "test"]
    first_stage = preprocess = None
    if args.autoencoder is not None:
        first_stage, pre = references.load_first_stage(args.autoencoder, trust=args.trust_checkpoint)
        if pre is None:
            raise SystemExit(f"--autoencoder {args.autoencoder}: its config has no data.params.preprocess")
        preprocess = PreprocessConfig.from_dict(pre)
    else:
        notes.append(f"'{AUTOENCODER_ROW}' row: skipped: no --autoencoder model dir given")
    out_rows: dict[str, list[SyntheticSample]] = {}
    for s in reference_samples(real, cases, test_samples, first_stage, preprocess, scale):
        out_rows.setdefault(s.row, []).append(s)
        case = real.case(s.case)
        slug = re.sub(r"[^a-z0-9]+", "_", s.row.lower()).strip("_")
        s.preview_path = save_preview(out / "previews" / f"{slug}_{s.case}.png",
                                      [("real", real.image(s.case, s.scale)), (s.row, s.image)],
                                      mask=case.label, spacing=case.geometry.spacing, max_label=real.dataset.max_label)
    return out_rows


def ms_ssim_note(real: RealData, cases: list[str], notes: list[str]) -> None:
    shape = real.case(cases[0]).image.shape
    (scales_3d, window_3d), (scales_2d, window_2d) = ms_ssim_scales(shape), ms_ssim_scales(shape[1:])
    if min(scales_3d, scales_2d) < len(MS_SSIM_WEIGHTS) or min(window_3d, window_2d) < SSIM_WINDOW:
        notes.append(f"ms_ssim: volumes of {shape} are too small for 5 scales with an 11-voxel window: 3D uses "
                     f"{scales_3d} scales (window {window_3d}), axial {scales_2d} (window {window_2d}), with the "
                     "first weights of Wang et al. renormalised to sum 1")


def label_fidelity_rows(scored: list[tuple[SyntheticSample, dict]], rows, real_samples, real: RealData,
                        cases: list[str], args, out: Path, notes: list[str]) -> None:
    """Add the segmenter's ``dice_*`` columns and ``dice_ratio`` to the rows of ``scored`` (synthetic rows and the
    real volumes; paired by sample identity)."""
    progress = sys.stderr.isatty()
    segmenter = fidelity_segmenter(real, cases, args, args.segmenter_cache or out / "segmenter_cache", notes,
                                   progress=progress)
    if segmenter is None:
        return
    zero_outside_body = args.body == "nonzero"
    predictions: dict[int, Path] = {}
    dice = fidelity_dice(segmenter, {**rows, REAL_VOLUME_ROW: real_samples}, real, out, zero_outside_body,
                         progress=progress, predictions=predictions)
    for s, row in scored:
        row.update(dice.get(id(s), {}))
    if "informed" in set(args.metrics):
        informed_plane_dice(scored, real_samples, predictions, real, notes)
    reference = add_dice_ratio(scored)
    zeroed = "; every volume is set to 0 outside its body first, as the real volumes are" if zero_outside_body else ""
    notes.append("dice_<label>: Dice (MONAI DiceMetric) of the segmenter's labels on each volume against the mask "
                 "the volume was made from (the real label for 'reference: real volume'); dice_mean: their mean over "
                 "the labels the mask holds; dice_ratio: dice_mean / the real volumes' mean dice_mean "
                 f"({reference:.3g}){zeroed}")


def main(argv=None) -> int:
    args = parse_args(argv)
    groups = set(args.metrics)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    real = RealData(args.real, split=args.split, slice_axis=args.slice_axis, body=args.body)
    notes: list[str] = []
    rows, cases = load_rows(args, real)
    scale = evaluation_scale(rows, args, notes)
    all_rows = {**reference_rows(args, real, rows, cases, out, notes, scale), **rows}
    windowed = any(s.scale.window is not None for samples in all_rows.values() for s in samples)
    notes.insert(0, "all metrics in the canonical orientation (axial slices), on "
                 + ("each row's [0, 1] intensity scale (see 'Intensity scale')" if windowed
                    else "each real case's [0, 1] intensity scale") + "; 'body' = the real body region plus the labels")
    if args.body == "threshold" and not windowed:
        notes.append("intensity scale: CT-like volumes (--body threshold) on each real case's full range: no row "
                     "records an intensity window; pass --window LO HI to evaluate inside the model's window")
    if "reconstruction" in groups:
        ms_ssim_note(real, cases, notes)
    scored = [(s, sample_row(s, real, groups)) for samples in all_rows.values() for s in samples]
    real_samples = real_volume_samples(real, cases, scale)
    if groups & {"consistency", "labels", "segmenter"}:
        scored += [(s, sample_row(s, real, groups - {"reconstruction"})) for s in real_samples]
    if "segmenter" in groups:
        label_fidelity_rows(scored, rows, real_samples, real, cases, args, out, notes)
    if "informed" in groups:
        informed_slice_rows(scored, real, cases, notes)

    set_values = set_metrics(all_rows, real, cases, groups, args, out, notes, scale)
    counterfactual = counterfactual_rows([s for samples in rows.values() for s in samples], real) \
        if "counterfactual" in groups else []
    if "counterfactual" in groups and not counterfactual:
        notes.append("counterfactual: skipped: no two samples of one case, mask and seed with different real donors "
                     "(generate them with --informed-from DONOR into two output folders)")
    sections = report_sections(out, scored, rows, {**all_rows, REAL_VOLUME_ROW: real_samples}, real, cases, groups)
    text = write_report(out, scored, all_rows, set_values, counterfactual, real, cases, notes, args.link_images,
                        sections, scale)
    print(text)
    print(f"report: {out / 'report.html'}")
    return 0


def train_fidelity_segmenter(argv=None) -> Path | None:
    """Train (or find in its cache) the label-fidelity segmenter that ``main(argv)`` would use, without evaluating
    anything (the demo trains it beside its slice model); its folder, or None when it cannot run."""
    args = parse_args(argv)
    real = RealData(args.real, split=args.split, slice_axis=args.slice_axis, body=args.body)
    cases = ([c for c in real.names if c in select_cases(args.cases, real, splits_file(real, args))] if args.cases
             else real.names)
    notes: list[str] = []
    segmenter = fidelity_segmenter(real, cases, args, args.segmenter_cache or args.out / "segmenter_cache", notes)
    print("\n".join(notes))
    return None if segmenter is None else segmenter.work_dir


INFORMED_COLUMNS = ("informed_w1", "informed_w1_real", "informed_dice", "informed_dice_real")


def report_sections(out: Path, scored: list[tuple[SyntheticSample, dict]], rows: dict[str, list[SyntheticSample]],
                    every_row: dict[str, list[SyntheticSample]], real: RealData, cases: list[str],
                    groups: set[str]) -> list[report.Section]:
    """The sections after the headline: each row's intensity scale, the synthetic rows' time and memory (from
    their manifests), and the generated informed slices (rows with ``informed_w1``), with their plot."""
    sections = [report.scale_section({name: samples[0].scale.describe() for name, samples in every_row.items()
                                      if samples})]
    timing = report.time_memory_section({name: [s.record for s in samples] for name, samples in rows.items()})
    if timing is not None:
        sections.append(timing)
    summary = report.summarise([row for _, row in scored if any(c in row for c in INFORMED_COLUMNS)])
    if "informed" in groups and summary:
        lines = [f"`{c}`: {report.describe(c)}" for c in INFORMED_COLUMNS]
        lines.append("these measures see the slice's intensities and the segmenter's labels, not its anatomy: a "
                     "head-shaped cloud with the right histogram scores like a real slice; the picture below "
                     "(informed_slices.png) shows each generated plane above the real slice of its case there")
        table = [(name, str(max(int(summary[name][c][2]) for c in INFORMED_COLUMNS if c in summary[name])),
                  *(report.format_value(*summary[name][c][:3]) if c in summary[name] else report.MISSING
                    for c in INFORMED_COLUMNS)) for name in report.order_rows(summary)]
        sections.append(report.Section("Generated informed slices (ig, igma) against real slices at the same "
                                       "position", ("row", "n", *INFORMED_COLUMNS), table, lines,
                                       informed_plot(out, rows, real, cases),
                                       [p for p in [informed_slices_figure(out, rows, real, cases)] if p]))
    return sections


def generated_planes(samples: list[SyntheticSample], cases: list[str]) -> list[tuple[SyntheticSample, int]]:
    """``(sample, plane)`` of the samples of ``cases`` that hold a generated informed slice, at its plane
    (:func:`.informed.informed_plane`), in their order."""
    planes = [(s, informed_plane(s.record)) for s in samples if s.case in cases]
    return [(s, k) for s, k in planes if k is not None]


INFORMED_PANELS = 8  # samples per row in informed_slices.png: the picture stays readable whatever the run's size


def informed_slices_figure(out: Path, rows: dict[str, list[SyntheticSample]], real: RealData,
                           cases: list[str]) -> Path | None:
    """``informed_slices.png``: for each row with generated informed slices (``ig``, ``igma``), the planes of its
    first :data:`INFORMED_PANELS` volumes at their generated slice (``informed.target_index``) on one line and the
    real volume of the same case at the same plane on the next, axial, anterior up, on the [0, 1] scale of the row;
    None when no sample has such a plane."""
    def title(sample: SyntheticSample, plane: int) -> str:
        position = (sample.record.get("informed") or {}).get("position")
        return (f"{sample.case} s{sample.record.get('sample', 0)}\nplane {plane}"
                + ("" if position is None else f" (pos {position:.2f})"))

    lines, capped = [], False
    for name in report.order_rows(rows):
        planes = generated_planes(rows[name], cases)
        capped |= len(planes) > INFORMED_PANELS
        planes = planes[:INFORMED_PANELS]
        if not planes:
            continue
        lines.append((f"{name}: generated", [(title(s, k), view_slice(s.image, 0, k)) for s, k in planes]))
        lines.append(("real, same plane", [(title(s, k), view_slice(real.image(s.case, s.scale), 0, k))
                                           for s, k in planes]))
    if not lines:
        return None
    return report.image_grid(out / "informed_slices.png", lines,
                             "generated informed slices where the volume holds them, above the real slice of the "
                             "same case at the same plane" + (f" (the first {INFORMED_PANELS} samples of each row)"
                                                              if capped else ""))


def informed_plot(out: Path, rows: dict[str, list[SyntheticSample]], real: RealData, cases: list[str]) -> Path:
    """One panel: the intensity histogram inside the body at the generated informed slices' planes, per row,
    against the real slices of the same cases at the same planes."""
    series, real_values = {}, []
    for name, samples in rows.items():
        values = []
        for s, plane in generated_planes(samples, cases):
            values.append(plane_voxels(s.image, s.body, plane))
            real_values.append(plane_voxels(real.image(s.case, s.scale), real.case(s.case).body, plane))
        if values:
            series[name] = report.density(np.concatenate(values))
    series = {REAL_ROW: report.density(np.concatenate(real_values)), **series}
    return report.line_plot(out / "histogram_informed_slices.png", series,
                            "intensity histogram at the generated informed slices' planes, inside the body",
                            "intensity [0, 1]", "density", panels=False)


def write_report(out: Path, scored: list[tuple[SyntheticSample, dict]], all_rows, set_values, counterfactual,
                 real: RealData, cases: list[str], notes: list[str], link_images: bool,
                 sections: list | None = None, scale: IntensityScale = REAL_RANGE) -> str:
    """metrics.csv, counterfactual.csv, summary.md, the plots and report.html (with the label-fidelity and targets
    table, :func:`.report.targets_section`, then ``sections`` after the headline); returns the summary's text."""
    metric_rows = [row for _, row in scored]
    report.write_csv(out / "metrics.csv", metric_rows)
    if counterfactual:
        report.write_csv(out / "counterfactual.csv", counterfactual)
    summary = report.summarise(metric_rows)
    for name, values in set_values.items():
        n = len(all_rows[name])
        for metric, value in values.items():
            summary.setdefault(name, {})[metric] = (value, math.nan, n)
    if counterfactual:
        cf = report.summarise([{**r, "row": f"counterfactual: {r['row_a']} vs {r['row_b']}"} for r in counterfactual])
        summary.update(cf)
    targets = report.targets_section(summary)
    sections = [*([targets] if targets is not None else []), *(sections or ())]
    present = {m for values in summary.values() for m in values}
    metrics = [m for m in SUMMARY_METRICS if m in present]
    metrics += [m for m in ("mean_abs_diff", "follows_donor", "order_b_is_donor_bs") if m in present]
    metrics += sorted(m for m in present if m.startswith("dice_") and m not in SUMMARY_METRICS)
    per_label = sorted(m for m in present if m.startswith(("psnr_", "ssim_axial_", "mean_diff_", "std_diff_"))
                       and m not in SUMMARY_METRICS)
    text = report.summary_markdown(summary, metrics, notes, {"Per label (inside each label of the mask)": per_label},
                                   sections)
    atomic_write_text(out / "summary.md", text)
    plot_paths = plots(out, all_rows, real, cases, scale)
    columns = [c for c in dict.fromkeys(k for r in metric_rows for k in r) if c not in ("row",)]
    html_samples = [(s.preview_path, row) for s, row in scored if s.row != REAL_VOLUME_ROW]
    report.write_html(out / "report.html", text, plot_paths, html_samples, columns, notes, embed=not link_images,
                      summary=summary, sections=sections)
    return text


# ------------------------------------------------------------------------------------------------ the --min-dice filter
def quality_filter(real_root: Path, synthetic_cases, min_dice: float, args, cache_root: Path,
                   body: str = "nonzero", progress: bool = False) -> dict:
    """FreeTumor-style filter of ``scripts/enhance_dataset.py --min-dice``: the label-fidelity segmenter
    (:func:`fidelity_segmenter`: ``args.segmenter`` or trained on the real training cases) labels every synthetic
    case (``.name``, ``.case``, ``.image``, ``.label``); a case is dropped when the mean Dice over the labels its mask
    holds is below ``min_dice`` (or NaN). Returns ``{"min_dice", "segmenter", "dice": {name: mean Dice}, "dropped",
    "notes"}``. With ``body="nonzero"`` each volume is set to 0 outside its body (its real case's nonzero voxels
    plus its labels) first."""
    if not 0.0 <= min_dice <= 1.0:
        raise ValueError(f"--min-dice must lie in [0, 1], got {min_dice}")
    real = RealData(real_root, body=body)
    notes: list[str] = []
    segmenter = fidelity_segmenter(real, [], args, cache_root, notes, progress=progress)
    if segmenter is None:
        raise ValueError(f"--min-dice: no segmenter: {notes[-1]}")
    unknown = sorted({c.case for c in synthetic_cases} - set(real.names))
    if unknown:
        raise ValueError(f"synthetic cases of {unknown} have no real case in {real_root} (it has {real.names})")
    num_labels = max(1, real.dataset.max_label)
    scores = {}
    with tempfile.TemporaryDirectory(prefix="gem3d_quality_filter_") as work:
        images, masks = [], []
        for c in synthetic_cases:
            if body == "nonzero":
                label = load_case(c.image, c.label).label
                path = label_metrics.zero_outside(c.image, real.case(c.case).body | (label > 0),
                                                  Path(work) / "inputs" / f"{c.name}_0000.nii.gz")
            else:
                path = c.image
            images.append(path)
            masks.append(c.label)
        dice = label_metrics.segmenter_dice(segmenter, images, masks, num_labels, Path(work) / "predictions",
                                            progress=progress)
        for c, d in zip(synthetic_cases, dice):
            scores[c.name] = label_metrics.mean_dice(d)
    dropped = sorted(name for name, d in scores.items() if not d >= min_dice)
    return {"min_dice": min_dice, "segmenter": str(segmenter.work_dir), "dice": scores, "dropped": dropped,
            "notes": notes}
