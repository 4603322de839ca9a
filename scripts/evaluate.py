"""Evaluate synthetic volumes against the real dataset: reconstruction, distribution, 3D consistency, label fidelity,
the informed slice's effect, with reference rows, written as metrics.csv, summary.md, PNG plots and report.html.

    python scripts/evaluate.py --real DATASET --synthetic gem3d=OUT/test --synthetic base=OUT/base \\
        [--autoencoder MODEL_DIR] [--fid-weights-2d RadImageNet-ResNet50.pt] [--fid-weights-3d resnet_10.pth] \\
        [--segmenter NNUNET_MODEL_FOLDER] [--metrics reconstruction consistency labels ...] --out REPORT_DIR

Every ``--synthetic [NAME=]FOLDER`` is an inference output folder (``OUT/<setting>`` with ``manifest.json``); its
samples are matched to their real cases through the manifest. NAME (default: the folder's name) names the report
row. Reference rows: ``reference: copy informed slice`` (the real informed slice copied into every slice) and, with
``--autoencoder``, ``reference: autoencoder`` (the real volume encoded and decoded: the ceiling); stage 1 alone,
``base`` and GEM-3D are ``--synthetic`` folders. All volumes are compared in the canonical orientation (axial slices
first) on the real case's [0, 1] intensity scale; "body" is the real case's body region plus its labels.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

from gem3d.data.datasets import read_splits  # noqa: E402
from gem3d.data.preprocess import PreprocessConfig  # noqa: E402
from gem3d.export.preview import save_preview  # noqa: E402
from gem3d.files import atomic_write_text  # noqa: E402
from gem3d.metrics import distribution, features, labels as label_metrics, references, report  # noqa: E402
from gem3d.metrics.consistency import consistency_metrics, intensity_profile, slice_jumps  # noqa: E402
from gem3d.metrics.image import MS_SSIM_WEIGHTS, SSIM_WINDOW, ms_ssim_scales, reconstruction_metrics, to_unit_range  # noqa: E402,E501
from gem3d.metrics.volumes import RealData, SyntheticSample, has_ground_truth, load_samples  # noqa: E402

METRIC_GROUPS = ("reconstruction", "consistency", "labels", "fid", "mmd", "diversity", "frd", "counterfactual",
                 "segmenter")
COPY_ROW = "reference: copy informed slice"
AUTOENCODER_ROW = "reference: autoencoder"
REAL_ROW = "real"
MMD_GRID = (16, 32, 32)
SUMMARY_METRICS = ("psnr_body", "psnr_axial_body", "ssim_body", "ssim_axial_body", "ms_ssim", "ms_ssim_axial",
                   "slice_jump", "slice_jump_ratio", "through_plane_ratio", "outside_mean", "outside_mean_diff",
                   "label_order_kept", "fid_25d", "fid_3d", "mmd", "ms_ssim_diversity", "frd")


def parse_synthetic(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep:
        return Path(spec).name, Path(spec)
    if not name or not folder:
        raise SystemExit(f"--synthetic must be FOLDER or NAME=FOLDER, got {spec!r}")
    return name, Path(folder)


def select_cases(spec: str, real: RealData) -> set[str]:
    """``--cases``: ``a,b,c`` or ``split:NAME`` (from the dataset's ``splits.json``)."""
    if spec.startswith("split:"):
        path = real.dataset.root / "splits.json"
        if not path.is_file():
            raise SystemExit(f"--cases {spec}: {path} does not exist (training writes it)")
        splits = read_splits(path)
        which = spec.split(":", 1)[1]
        if which not in splits:
            raise SystemExit(f"--cases {spec}: splits.json has {sorted(splits)}, not {which!r}")
        return set(splits[which])
    names = {n.strip() for n in spec.split(",") if n.strip()}
    unknown = sorted(names - set(real.names))
    if unknown:
        raise SystemExit(f"--cases: unknown case(s) {unknown}; the dataset has {real.names}")
    return names


def reference_samples(real: RealData, cases: list[str], test_samples: list[SyntheticSample],
                      first_stage=None, preprocess: PreprocessConfig | None = None) -> list[SyntheticSample]:
    """Copy-the-informed-slice and autoencoder reference volumes of ``cases`` (the informed slice of a case's
    ``test`` sample where there is one, else the middle slice)."""
    informed = {s.case: s.record.get("informed", {}).get("index") for s in test_samples}
    out = []
    for name in cases:
        case = real.case(name)
        index = informed.get(name)
        record = {"case": name, "setting": "reference", "sample": 0, "files": {"gt": ""},
                  "informed": {"source": "own_middle", "case": name, "index": index}}
        copy = references.copy_slice_volume(case.image, index)
        out.append(SyntheticSample(COPY_ROW, record, copy, case.label, case.body, case.image_path, None))
        if first_stage is not None:
            raw = references.autoencoder_reconstruction(first_stage, case.raw, case.label, case.geometry, preprocess)
            out.append(SyntheticSample(AUTOENCODER_ROW, dict(record, informed=None), to_unit_range(raw, case.raw),
                                       case.label, case.body, case.image_path, None))
    return out


def sample_row(sample: SyntheticSample, real: RealData, groups: set[str]) -> dict:
    """The per-sample metrics of one volume against its real case."""
    case = real.case(sample.case)
    record = sample.record
    informed = record.get("informed") or {}
    row = {"row": sample.row, "case": sample.case, "setting": record.get("setting", ""), "sample": record.get("sample", 0),
           "informed_from": "" if not informed.get("case") else f"{informed.get('case')}:{informed.get('index')}"}
    if "reconstruction" in groups and has_ground_truth(sample):
        row.update(reconstruction_metrics(sample.image, case.image, case.body, case.label, real.label_names))
    if "consistency" in groups:
        row.update(consistency_metrics(sample.image, case.image, case.body))
    if "labels" in groups:
        row.update(label_metrics.label_fidelity(sample.image, case.image, sample.label, sample.body, real.label_names,
                                                real_labels=case.label, real_body=case.body))
    return row


def resample(volume: np.ndarray, grid=MMD_GRID) -> np.ndarray:
    """``(D, H, W)`` -> ``grid`` (trilinear), for set metrics over volumes of different shapes."""
    x = rearrange(torch.as_tensor(np.asarray(volume, np.float32)), "d h w -> 1 1 d h w")
    return F.interpolate(x, size=grid, mode="trilinear", align_corners=False)[0, 0].numpy()


def set_metrics(rows: dict[str, list[SyntheticSample]], real: RealData, cases: list[str], groups: set[str],
                args, out: Path, notes: list[str]) -> dict[str, dict[str, float]]:
    """Distribution metrics per row (synthetic set vs the real cases ``cases``)."""
    result: dict[str, dict[str, float]] = {name: {} for name in rows}
    real_cases = [real.case(n) for n in cases]
    if "fid" in groups:
        nets = {}
        for kind, path in (("2d", args.fid_weights_2d), ("3d", args.fid_weights_3d)):
            if path is None:
                notes.append(f"fid_{'25d' if kind == '2d' else '3d'}: skipped: no --fid-weights-{kind} file given "
                             f"({'RadImageNet ResNet-50' if kind == '2d' else 'MedicalNet ResNet-10/18/50'} weights)")
                continue
            nets[kind] = (features.load_radimagenet_resnet50(path) if kind == "2d"
                          else features.load_medicalnet_resnet(path, args.fid_depth_3d))
        if nets:
            real_25d = [features.volume_features_25d(c.image, nets["2d"], c.body) for c in real_cases] if "2d" in nets else []
            real_3d = np.concatenate([features.volume_features_3d(c.image, nets["3d"]) for c in real_cases]) if "3d" in nets else None
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
                result[name]["ms_ssim_diversity"] = float(np.nanmean([distribution.ms_ssim_diversity(v) for v in pairs]))
        notes.append("ms_ssim_diversity: mean axial MS-SSIM between samples of the same case (only rows with more "
                     "than one sample per case)")
    if "frd" in groups:
        ok, reason = distribution.frd_available()
        if not ok:
            notes.append(f"frd: {reason}")
        else:
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
    return result


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


def plots(out: Path, rows: dict[str, list[SyntheticSample]], real: RealData, cases: list[str]) -> list[Path]:
    """Histograms per label, through-plane profiles (first case), slice-jump distributions."""
    paths = []
    real_cases = [real.case(n) for n in cases]
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
        case = real.case(cases[0])
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
            series[name] = report.density(np.concatenate([slice_jumps(s.image, s.body) for s in samples]), 40, (0.0, hi))
    paths.append(report.line_plot(out / "slice_jumps.png", series, "distribution of neighbouring-slice jumps",
                                  "mean |slice difference|", "density"))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", type=Path, required=True, help="nnU-Net raw dataset folder (imagesTr, labelsTr)")
    p.add_argument("--split", default="Tr", choices=("Tr", "Ts"))
    p.add_argument("--synthetic", action="append", default=[], metavar="[NAME=]FOLDER",
                   help="inference output folder OUT/<setting> (repeatable; NAME names the report row)")
    p.add_argument("--cases", help="real cases to evaluate: 'a,b,c' or 'split:val' (splits.json of the dataset); "
                   "default: the cases of the synthetic samples, or every case")
    p.add_argument("--metrics", nargs="+", default=list(METRIC_GROUPS), choices=METRIC_GROUPS)
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--autoencoder", type=Path, help="autoencoder run or GEM-3D model dir: adds the ceiling row")
    p.add_argument("--fid-weights-2d", type=Path, help="RadImageNet ResNet-50 PyTorch weights (.pt/.pth)")
    p.add_argument("--fid-weights-3d", type=Path, help="MedicalNet resnet_10/18/50 weights (.pth)")
    p.add_argument("--fid-depth-3d", type=int, choices=features.MEDICALNET_DEPTHS,
                   help="MedicalNet depth (default: from the file name)")
    p.add_argument("--segmenter", type=Path, help="trained nnU-Net model folder (needs nnunetv2)")
    p.add_argument("--body", default="nonzero", choices=("nonzero", "threshold", "none"),
                   help="body region of the real volumes: nonzero (MRI), threshold (CT), none")
    p.add_argument("--slice-axis", type=int, default=2, choices=(0, 1, 2), help="RAS axis of the slices (2 = axial)")
    p.add_argument("--frd-workers", type=int, default=1)
    p.add_argument("--link-images", action="store_true", help="link the PNGs from report.html instead of embedding")
    p.add_argument("--trust-checkpoint", action="store_true")
    args = p.parse_args(argv)
    groups = set(args.metrics)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    real = RealData(args.real, split=args.split, slice_axis=args.slice_axis, body=args.body)
    notes: list[str] = ["all metrics in the canonical orientation (axial slices), on each real case's [0, 1] "
                        "intensity scale; 'body' = the real body region plus the labels"]

    rows: dict[str, list[SyntheticSample]] = {}
    for spec in args.synthetic:
        name, folder = parse_synthetic(spec)
        if name in rows:
            raise SystemExit(f"--synthetic: row name {name!r} given twice; name them NAME=FOLDER")
        rows[name] = load_samples(folder, name, real)
    cases = sorted({s.case for samples in rows.values() for s in samples}) or real.names
    if args.cases:
        wanted = select_cases(args.cases, real)
        rows = {name: [s for s in samples if s.case in wanted] for name, samples in rows.items()}
        cases = [c for c in real.names if c in wanted]
    test_samples = [s for samples in rows.values() for s in samples if s.record.get("setting") == "test"]
    first_stage = preprocess = None
    if args.autoencoder is not None:
        first_stage, pre = references.load_first_stage(args.autoencoder, trust=args.trust_checkpoint)
        if pre is None:
            raise SystemExit(f"--autoencoder {args.autoencoder}: its config has no data.params.preprocess")
        preprocess = PreprocessConfig.from_dict(pre)
    else:
        notes.append(f"'{AUTOENCODER_ROW}' row: skipped: no --autoencoder model dir given")
    reference_rows: dict[str, list[SyntheticSample]] = {}
    for s in reference_samples(real, cases, test_samples, first_stage, preprocess):
        reference_rows.setdefault(s.row, []).append(s)
        case = real.case(s.case)
        slug = re.sub(r"[^a-z0-9]+", "_", s.row.lower()).strip("_")
        s.preview_path = save_preview(out / "previews" / f"{slug}_{s.case}.png", [("real", case.image), (s.row, s.image)],
                                      mask=case.label, spacing=case.geometry.spacing, max_label=real.dataset.max_label)
    all_rows = {**reference_rows, **rows}

    if "reconstruction" in groups:
        shape = real.case(cases[0]).image.shape
        (scales_3d, window_3d), (scales_2d, window_2d) = ms_ssim_scales(shape), ms_ssim_scales(shape[1:])
        if min(scales_3d, scales_2d) < len(MS_SSIM_WEIGHTS) or min(window_3d, window_2d) < SSIM_WINDOW:
            notes.append(f"ms_ssim: volumes of {shape} are too small for 5 scales with an 11-voxel window: 3D uses "
                         f"{scales_3d} scales (window {window_3d}), axial {scales_2d} (window {window_2d}), with the "
                         "first weights of Wang et al. renormalised to sum 1")
    metric_rows = [sample_row(s, real, groups) for samples in all_rows.values() for s in samples]
    if "consistency" in groups or "labels" in groups:
        for name in cases:
            case = real.case(name)
            own = SyntheticSample(REAL_ROW, {"case": name, "setting": "real", "sample": 0}, case.image, case.label,
                                  case.body, case.image_path, None)
            metric_rows.append(sample_row(own, real, groups - {"reconstruction"}))
    if "segmenter" in groups:
        synthetic = [s for samples in rows.values() for s in samples if s.label_path is not None]
        dice, status = label_metrics.segmenter_dice(args.segmenter, [s.image_path for s in synthetic],
                                                    [s.label_path for s in synthetic], max(1, real.dataset.max_label))
        if dice is None:
            notes.append(f"dice (--segmenter): {status}")
        else:
            lookup = {id(s): d for s, d in zip(synthetic, dice)}
            index = 0
            for samples in all_rows.values():
                for s in samples:
                    if id(s) in lookup:
                        metric_rows[index].update({f"dice_{real.label_names.get(k, k)}": v for k, v in lookup[id(s)].items()})
                    index += 1

    set_values = set_metrics(all_rows, real, cases, groups, args, out, notes)
    counterfactual = counterfactual_rows([s for samples in rows.values() for s in samples], real) \
        if "counterfactual" in groups else []
    if "counterfactual" in groups and not counterfactual:
        notes.append("counterfactual: skipped: no two samples of one case, mask and seed with different real donors "
                     "(generate them with --informed-from DONOR into two output folders)")

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
    present = {m for values in summary.values() for m in values}
    metrics = [m for m in SUMMARY_METRICS if m in present]
    metrics += [m for m in ("mean_abs_diff", "follows_donor", "order_b_is_donor_bs") if m in present]
    metrics += sorted(m for m in present if m.startswith("dice_"))
    per_label = sorted(m for m in present if m.startswith(("psnr_", "ssim_axial_", "mean_diff_", "std_diff_"))
                       and m not in SUMMARY_METRICS)
    text = report.summary_markdown(summary, metrics, notes, {"Per label (inside each label of the mask)": per_label})
    atomic_write_text(out / "summary.md", text)
    plot_paths = plots(out, all_rows, real, cases)
    columns = [c for c in dict.fromkeys(k for r in metric_rows for k in r) if c not in ("row",)]
    html_samples = [(s.preview_path, row) for s, row in zip((s for v in all_rows.values() for s in v), metric_rows)]
    report.write_html(out / "report.html", text, plot_paths, html_samples, columns, notes, embed=not args.link_images,
                      summary=summary)
    print(text)
    print(f"report: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
