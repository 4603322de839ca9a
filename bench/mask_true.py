"""Mask-true synthesis: which training and sampling choices let GEM-3D draw the mask's structures (docs/mask-true.md).

On the demo dataset (16 cases: 8 train, 2 val, 6 test), every model trains for a FIXED number of steps (not minutes,
so the comparison does not depend on the machine's load), and every choice is scored on the VAL cases only (never
on the test cases the demo reports):

1. the autoencoder; stage-1 variants (informed slice shown / hidden, contrast variants on / off, informed slice from
   the clip / the volume, label-weighted loss) and the baseline's stage 1;
2. stage 2 on the chosen stage 1, and the baseline's stage 2;
3. sampling variants on stage 2 (informed start, slice noise correlation);
4. label fidelity (mean Dice of the evaluation's segmenter, trained on the real train cases, against the masks;
   ``gem3d.metrics.evaluation``) and the through-plane / in-plane gradient ratio (stripes), beside the same
   segmenter on the real val volumes.

    python bench/mask_true.py --out bench_out/mask_true [--quick] [--write docs/mask-true.md]

``--quick``: a few steps per model (checks the script, no meaningful figures). The table is printed and, with
``--write``, replaces the generated block of that file. About an hour on 2 CPU cores at the default steps.

``--only vpred --demo-out DIR`` (DIR: a finished ``make demo``'s output) is the v-prediction experiment instead
(issue 21, item 6): the demo's stage 1 (``configs/latent-diffusion/demo_stage1.yaml`` as it is, on the demo's
autoencoder ``DIR/models/demo_autoencoder``) trained twice for the steps the demo's own stage 1 got (or
``--vpred-steps``), same seed, side by side with one thread each: eps-prediction, and v-prediction on the
zero-terminal-SNR schedule. Each samples the ``test`` setting alone (the evaluation's "stage1-alone" row) on the
val cases at informed start 1.0 (pure noise) and 0.7, with two sampling seeds, with the demo's other sampler
options; scored by the demo's cached segmenter (``DIR/report/segmenter_cache``), with PSNR and the through-plane
ratio. Its table goes into its own block (``--write``); about 15 minutes on 2 CPU cores.

    python bench/mask_true.py --only vpred --demo-out demo_out --out bench_out/mask_true [--write docs/mask-true.md]

``--only starts --demo-out DIR`` samples with the demo's own trained GEM-3D (``DIR/models/demo``, stage 2) the
``test`` and ``ic`` settings on the val cases at several informed starts (the SDEdit strength; 1.0 = pure noise)
and with the labelled structures started earlier (``label_start``), two sampling seeds each, and scores every
label: Dice per label over the real val volumes' (the non-enhancing core is the label the demo draws worst), the
core's mean intensity minus the real one's, the label intensity order, PSNR and the through-plane ratio. No
training; a few minutes on 2 CPU cores.

    python bench/mask_true.py --only starts --demo-out demo_out --out bench_out/mask_true [--write docs/mask-true.md]

``--only encoding --demo-out DIR`` asks how the mask should reach the model. First, does the paper's encoding (the
grey mask image through the frozen autoencoder) keep every label: the demo autoencoder's decode(encode(mask)), Dice
per label against the mask, over the demo's cases. Then the demo's stage 1 and stage 2 are trained twice, side by
side with one thread each, for the steps the demo's own models got and with the same seed: with the paper's mask
encoding, and with ``mask_encoding: label_fractions`` (each label's share of every latent pixel). Both sample the
``test`` setting, with two sampling seeds, on 12 tuning cases of their own: a second demo dataset drawn with
another seed (``--seed`` + 1), which no model trained on and no earlier choice saw. The demo's ``base`` samples
them too (one seed), as the peer. All are scored by the demo's segmenter (``DIR/report/segmenter_cache``), with each
label's Dice over the real volumes', the core's brightness, the label order, PSNR and the through-plane ratio.
About 20 minutes on 2 CPU cores.

    python bench/mask_true.py --only encoding --demo-out demo_out --out bench_out/mask_true [--write docs/mask-true.md]

``--only label-weight --demo-out DIR`` trains the demo's stage 1 and stage 2 (label fractions) as ``--only encoding``
does, once with the paper's plain loss and once with ``label_loss_weight: 4``, the demo's (each latent pixel's loss
weighted by 1 + 4 x its share inside the labelled structures), and scores both in the same way on the same 12
tuning cases. About 20 minutes on 2 CPU cores.

    python bench/mask_true.py --only label-weight --demo-out demo_out --out bench_out/mask_true [--write docs/mask-true.md]

``--only segmenter --demo-out DIR`` asks how to train the label-fidelity segmenter itself, the instrument every
label-fidelity figure rests on: on whole volumes (as before) or on random 32 x 48 x 48 patches, for 300 or 450
iterations, two training seeds each, on the demo's real training cases. Each is timed and scored (Dice per label) on
the real volumes of the 12 tuning cases of ``--only encoding`` (another seed's demo dataset; no test case). About 10
minutes on 2 CPU cores.

    python bench/mask_true.py --only segmenter --demo-out demo_out --out bench_out/mask_true [--write docs/mask-true.md]

``--only steps --demo-out DIR`` asks what the sampler's step count costs in label fidelity: the demo's own trained
GEM-3D and ``base`` (no training) sample ``test``, ``ic`` and ``base`` on the 12 tuning cases of ``--only encoding``
with DDIM 25 (the demo's until this bench), 20 and 15 steps, the demo's sampler otherwise, two sampling seeds each,
scored by the demo's segmenter like the modes above, with each run's seconds per volume. About 15 minutes on 2 CPU
cores.

    python bench/mask_true.py --only steps --demo-out demo_out --out bench_out/mask_true [--write docs/mask-true.md]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from gem3d.checkpoint import load_checkpoint  # noqa: E402
from gem3d.data.demo import build_demo_dataset  # noqa: E402
from gem3d.demo import SEGMENTER_OPTIONS  # noqa: E402
from gem3d.export.manifest import Manifest  # noqa: E402
from gem3d.inference.cli import load_inference_config  # noqa: E402
from gem3d.inference.engine import InferenceConfig, run_inference  # noqa: E402
from gem3d.inference.volume import SamplerOptions  # noqa: E402
from gem3d.data.nnunet import RawDataset  # noqa: E402
from gem3d.data.preprocess import PreprocessConfig, prepare_case  # noqa: E402
from gem3d.metrics import evaluation  # noqa: E402
from gem3d.metrics import labels as label_metrics  # noqa: E402
from gem3d.models.autoencoder import FirstStage  # noqa: E402
from gem3d.data.datasets import split_cases  # noqa: E402
from gem3d.segmentation import DEFAULT_ITERATIONS, SegmenterSettings  # noqa: E402
from gem3d.segmentation.cache import dataset_training_cases, trained_segmenter as cached_segmenter  # noqa: E402

HIDDEN = "data.params.preprocess.informed_labels=hidden"
NO_VARIANTS = "data.params.contrast_variants=[]"
SHOWN = "data.params.preprocess.informed_labels=shown"
VARIANTS = ("data.params.contrast_variants=[{invert: true}, {gamma: 0.6}, {gamma: 1.6}, {invert: true, gamma: 0.7}]")
# stage-1 variant -> its overrides of configs/latent-diffusion/demo_stage1.yaml
STAGE1 = {
    "shown, contrast variants (the earlier demo)": [SHOWN, VARIANTS],
    "hidden, contrast variants": [HIDDEN, VARIANTS],
    "hidden, contrast variants, informed from the volume, label weight 4": [
        HIDDEN, VARIANTS, "data.params.informed_slices=volume", "model.params.label_loss_weight=4"],
    "shown, no contrast variants": [SHOWN, NO_VARIANTS],
    "hidden, no contrast variants (the demo)": [HIDDEN, NO_VARIANTS],
    "hidden, no contrast variants, informed from the volume": [
        HIDDEN, NO_VARIANTS, "data.params.informed_slices=volume"],
    "hidden, no contrast variants, label weight 4": [HIDDEN, NO_VARIANTS, "model.params.label_loss_weight=4"],
}
CHOSEN = "hidden, no contrast variants (the demo)"
# sampling variant -> SamplerOptions changes (stage 2)
SAMPLING = {
    "informed start 0.5": {"informed_start": 0.5},
    "informed start 0.7": {"informed_start": 0.7},
    "informed start 1.0 (pure noise)": {"informed_start": 1.0},
    "informed start 0.7, slice noise correlation 0.8 (the demo)": {"informed_start": 0.7,
                                                                   "slice_noise_correlation": 0.8},
}
BEGIN, END = "<!-- bench:mask_true:begin -->", "<!-- bench:mask_true:end -->"
# --only vpred: stage-1 objective -> its overrides of demo_stage1.yaml; informed starts; sampling seeds
VPRED = {
    "eps (the demo)": [],
    "v-prediction, zero terminal SNR": ["model.params.prediction_type=v_prediction",
                                        "model.params.zero_terminal_snr=true"],
}
VPRED_STARTS = (1.0, 0.7)
VPRED_SEEDS = (0, 1)
VPRED_DEFAULT_STEPS = 600  # where the demo's stage 1 left no checkpoint to read its steps from
STAGE2_DEFAULT_STEPS = 300  # the same for the demo's stage 2 (--only encoding)
# the demo's label-fidelity segmenter (its cache key): DEFAULT_ITERATIONS iterations with gem3d.demo.SEGMENTER_OPTIONS
DEMO_SEGMENTER = f"{DEFAULT_ITERATIONS} iterations, options {json.dumps(SEGMENTER_OPTIONS)}"
VPRED_BEGIN, VPRED_END = "<!-- bench:mask_true:vpred:begin -->", "<!-- bench:mask_true:vpred:end -->"
# --only starts: informed starts of the demo's stage 2, settings, sampling seeds, the labels (demo dataset) scored
STARTS = ((0.7, None), (0.85, None), (1.0, None), (0.7, 0.85), (0.7, 1.0))  # (informed_start, label_start)
STARTS_SETTINGS = ("test", "ic")
STARTS_SEEDS = (0, 1)
LABELS = {"edema": "edema", "non-enhancing_tumor": "core", "enhancing_tumour": "enhancing"}  # dice_<key> -> shown
CORE_MEAN = "mean_diff_non-enhancing tumor"
STARTS_BEGIN, STARTS_END = "<!-- bench:mask_true:starts:begin -->", "<!-- bench:mask_true:starts:end -->"
# --only encoding: mask encoding -> its overrides of demo_stage1.yaml / demo_stage2.yaml; tuning cases; seeds
ENCODINGS = {
    "autoencoder (the paper)": ["model.params.mask_encoding=autoencoder", "model.params.unet_config.params.in_channels=12"],
    "label fractions": ["model.params.mask_encoding=label_fractions", "model.params.max_label=3",
                        "model.params.unet_config.params.in_channels=13"],
}
ENCODING_TUNING_CASES = 12
# --only label-weight: the demo's label-fraction stages without and with a loss weighted inside the labels
LABEL_WEIGHTS = {"label fractions, plain loss (the paper's)": ["model.params.label_loss_weight=0"],
                 "label fractions, label loss weight 4 (the demo's)": ["model.params.label_loss_weight=4"]}
LABEL_WEIGHT_BEGIN, LABEL_WEIGHT_END = ("<!-- bench:mask_true:label_weight:begin -->",
                                        "<!-- bench:mask_true:label_weight:end -->")
ENCODING_SEEDS = (0, 1)
ENCODING_BEGIN, ENCODING_END = "<!-- bench:mask_true:encoding:begin -->", "<!-- bench:mask_true:encoding:end -->"
# --only segmenter: the label-fidelity segmenter's training -> (backend options, iterations); training seeds
SEGMENTER_VARIANTS = {
    "whole volumes, 300 iterations (before)": ({}, 300),
    "32 x 48 x 48 patches, 300 iterations": ({"patch": [32, 48, 48]}, 300),
    f"32 x 48 x 48 patches, {DEFAULT_ITERATIONS} iterations (the demo's)": (SEGMENTER_OPTIONS, DEFAULT_ITERATIONS),
}
SEGMENTER_SEEDS = (0, 1)
# --only steps: DDIM step counts of the demo's sampler, on the demo's trained models
STEP_COUNTS = (25, 20, 15)
STEP_SETTINGS = ("test", "ic", "base")
STEPS_BEGIN, STEPS_END = "<!-- bench:mask_true:steps:begin -->", "<!-- bench:mask_true:steps:end -->"
SEGMENTER_BEGIN, SEGMENTER_END = "<!-- bench:mask_true:segmenter:begin -->", "<!-- bench:mask_true:segmenter:end -->"


def train(name: str, config: str, out: Path, dataset: Path, steps: int, overrides: list[str],
          threads: int | None = None) -> Path:
    """One main.py training for exactly ``steps`` steps (no time budget); its run folder (kept on a rerun).
    ``threads``: the child's OpenMP / torch threads (1 when two trainings share 2 cores)."""
    logs = out / "logs"
    runs = sorted(logs.glob(f"*_{name}"))
    if runs and (runs[-1] / "checkpoints" / "last.ckpt").is_file() and (runs[-1] / "done").is_file():
        return runs[-1]
    cmd = [sys.executable, "main.py", "--base", f"configs/latent-diffusion/{config}.yaml", "-t", "-n", name,
           "-l", str(logs), f"data.params.dataset_dir={dataset}", "lightning.trainer.max_time=null",
           f"lightning.trainer.max_steps={steps}", *overrides]
    log = out / "train_logs" / f"{name}.log"
    threads_env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **threads_env})
    run = sorted(logs.glob(f"*_{name}"))[-1]
    (run / "done").touch()
    print(f"[mask_true] trained {name} ({steps} steps) in {time.perf_counter() - t0:.0f} s", flush=True)
    return run


def synthesise(out: Path, dataset: Path, name: str, setting: str, model: Path, sampler: dict, seed: int,
               slice_model: Path | None = None, samples_per_case: int = 2) -> Path:
    """The ``setting``'s volumes of the val cases (2 samples each) in ``out/synthetic/<name>/<setting>``."""
    cfg = InferenceConfig(setting=setting, data=dataset, out=out / "synthetic" / name, model=model,
                          slice_model=slice_model, split="Tr", cases="split:val", samples_per_case=samples_per_case,
                          sampler=SamplerOptions(**sampler), seed=seed, device="cpu", progress=False, previews=False,
                          mask_edit=dict(load_inference_config("demo").get("mask_edit") or {}))
    run_inference(cfg)
    return cfg.setting_dir


def score(out: Path, dataset: Path, rows: dict[str, Path], iterations: int, metrics: tuple[str, ...] = ("consistency",
          "segmenter"), keys: tuple[str, ...] = ("dice_mean", "dice_ratio", "through_plane_ratio"),
          segmenter_cache: Path | None = None, segmenter: Path | None = None,
          extra: list[str] | None = None) -> dict[str, dict[str, float]]:
    """``{row: {key: mean}}`` of ``keys`` on the val cases (the evaluation's label-fidelity segmenter, trained on the
    real train cases, in ``segmenter_cache`` or ``out/report/segmenter_cache``; or the trained ``segmenter`` folder),
    plus the real volumes' row. ``extra``: more evaluate.py arguments."""
    report = out / "report"
    cache = [] if segmenter_cache is None else ["--segmenter-cache", str(segmenter_cache)]
    cache += [] if segmenter is None else ["--segmenter", str(segmenter)]
    evaluation.main(["--real", str(dataset), "--cases", "split:val", "--out", str(report), "--metrics", *metrics,
                     "--segmenter-iterations", str(iterations), "--segmenter-options", json.dumps(SEGMENTER_OPTIONS),
                     *cache, *(extra or []),
                     *[a for name, folder in rows.items() for a in ("--synthetic", f"{name}={folder}")]])
    values: dict[str, dict[str, list[float]]] = {}
    with open(report / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            for key in keys:
                if row.get(key) not in (None, "", "nan"):
                    values.setdefault(row["row"], {}).setdefault(key, []).append(float(row[key]))
    return {row: {k: sum(v) / len(v) for k, v in metrics.items()} for row, metrics in values.items()}


def table(results: dict[str, dict[str, float]], steps: dict[str, int]) -> str:
    def cell(row: str, key: str) -> str:
        value = results.get(row, {}).get(key)
        return "—" if value is None else f"{value:.2f}"

    lines = [f"Val cases, 2 samples each; steps: autoencoder {steps['ae']}, stage 1 {steps['stage1']}, stage 2 "
             f"{steps['stage2']}, slice model {steps['slice']}; segmenter {steps['segmenter']} iterations.", "",
             "| row | label fidelity (mean Dice) | ratio to real | through-plane / in-plane |", "|---|---|---|---|"]
    lines += [f"| {row} | {cell(row, 'dice_mean')} | {cell(row, 'dice_ratio')} | {cell(row, 'through_plane_ratio')} |"
              for row in results]
    return "\n".join(lines)


def write_block(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between ``begin`` and ``end`` of the markdown file ``path`` with ``text`` (appended when
    the file has no such block)."""
    page = path.read_text()
    block = f"{begin}\n{text}\n{end}"
    page = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, page, flags=re.S) \
        if begin in page else page + "\n" + block + "\n"
    path.write_text(page)


def vpred_table(results: dict[str, dict[str, float]], steps: int, sampler: dict) -> str:
    """The v-prediction table: per objective and informed start, each seed's label fidelity and their mean, the
    ratio to the real volumes, PSNR and the through-plane ratio (means over both seeds)."""
    def mean(rows: list[str], key: str) -> float | None:
        values = [results[r][key] for r in rows if key in results.get(r, {})]
        return sum(values) / len(values) if values else None

    def fmt(value: float | None, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    about = (f"Stage 1 alone, `test` setting, the 2 val cases, 1 sample per case and sampling seed; both models "
             f"trained {steps} steps with main.py's default seed, on the demo's autoencoder; the demo's sampler "
             f"({sampler['sampler']} {sampler['steps']}, eta {sampler['eta']}, slice noise correlation "
             f"{sampler['slice_noise_correlation']}; the eps model on its default spacing, the v model on trailing); "
             f"segmenter: the demo's ({DEMO_SEGMENTER}).")
    lines = [*textwrap.wrap(about, width=116), "",
             "| stage 1 | informed start | label fidelity, seed " + " / ".join(map(str, VPRED_SEEDS))
             + " | mean | ratio to real | PSNR body (dB) | through-plane / in-plane |",
             "|---|---|---|---|---|---|---|"]
    for objective in VPRED:
        for start in VPRED_STARTS:
            rows = [vpred_row(objective, start, seed) for seed in VPRED_SEEDS]
            seeds = " / ".join(fmt(results.get(r, {}).get("dice_mean")) for r in rows)
            lines.append(f"| {objective} | {start} | {seeds} | {fmt(mean(rows, 'dice_mean'))} | "
                         f"{fmt(mean(rows, 'dice_ratio'))} | {fmt(mean(rows, 'psnr_body'), 1)} | "
                         f"{fmt(mean(rows, 'through_plane_ratio'))} |")
    real, copy = results.get(evaluation.REAL_VOLUME_ROW, {}), results.get(evaluation.COPY_ROW, {})
    lines.append(f"| copying the informed slice to every slice | | | | | {fmt(copy.get('psnr_body'), 1)} | |")
    lines.append(f"| real val volumes | | | {fmt(real.get('dice_mean'))} | 1.00 | | "
                 f"{fmt(real.get('through_plane_ratio'))} |")
    return "\n".join(lines)


def segmenter_cache_copy(demo: Path, out: Path) -> Path:
    """A copy of a demo's segmenter cache in ``out`` (made once; none where the demo has none): copytree's copy2
    keeps the files' sizes and times, which key the cache, so the demo's segmenter is reused, not retrained."""
    cache = demo / "report" / "segmenter_cache"
    if cache.is_dir() and not (out / "segmenter_cache").is_dir():
        shutil.copytree(cache, out / "segmenter_cache")
    return out / "segmenter_cache"


def demo_copies(demo: Path, out: Path) -> tuple[Path, Path]:
    """Copies of a demo's dataset and segmenter cache in ``out`` (made once), for the modes that train on the
    demo's dataset, so that nothing is written into the demo's folder (training caches latents in its dataset).
    -> (dataset, segmenter cache)."""
    if not (out / "dataset" / "dataset.json").is_file():
        shutil.copytree(demo / "dataset", out / "dataset", dirs_exist_ok=True)
    return out / "dataset", segmenter_cache_copy(demo, out)


def trained_steps(model_dir: Path, default: int) -> int:
    """The global step of a demo model's ``checkpoints/last.ckpt``, or ``default`` where it has none."""
    checkpoint = model_dir / "checkpoints" / "last.ckpt"
    return int(load_checkpoint(checkpoint).get("global_step", 0)) if checkpoint.is_file() else default


def vpred_row(objective: str, start: float, seed: int) -> str:
    return f"stage 1 {objective}, informed start {start}, seed {seed}"


def run_vpred(args: argparse.Namespace) -> str:
    """The v-prediction experiment (``--only vpred``, see the module docstring); returns its table."""
    if args.demo_out is None:
        raise SystemExit("--only vpred needs --demo-out DIR (the output of `make demo`: DIR/dataset, "
                         "DIR/models/demo_autoencoder, DIR/report/segmenter_cache)")
    demo = args.demo_out.resolve()
    dataset, autoencoder = demo / "dataset", demo / "models" / "demo_autoencoder" / "checkpoints" / "last.ckpt"
    missing = [str(p) for p in (dataset / "dataset.json", autoencoder) if not p.is_file()]
    if missing:
        raise SystemExit(f"--demo-out {demo}: missing {missing} (run `make demo` first)")
    steps = args.vpred_steps or trained_steps(demo / "models" / "demo_stage1", VPRED_DEFAULT_STEPS)
    if args.quick:
        steps = 4
    out = args.out.resolve() / "vpred"
    dataset, cache = demo_copies(demo, out)
    first_stage = f"model.params.first_stage_config.params.ckpt_path={autoencoder}"
    with ThreadPoolExecutor(max_workers=len(VPRED)) as pool:  # side by side, one thread each
        futures = {objective: pool.submit(train, f"s1_{i}", "demo_stage1", out, dataset, steps,
                                          [first_stage, *overrides], 1)
                   for i, (objective, overrides) in enumerate(VPRED.items())}
        runs = {objective: future.result() for objective, future in futures.items()}
    sampler = dict(load_inference_config("demo")["sampler"])
    rows: dict[str, Path] = {}
    for i, (objective, run) in enumerate(runs.items()):
        for start in VPRED_STARTS:
            for seed in VPRED_SEEDS:
                rows[vpred_row(objective, start, seed)] = synthesise(
                    out, dataset, f"s1_{i}_start{start}_seed{seed}", "test", run,
                    {**sampler, "informed_start": start}, seed, samples_per_case=1)
    results = score(out, dataset, rows, 2 if args.quick else DEFAULT_ITERATIONS,
                    metrics=("reconstruction", "consistency", "segmenter"),
                    keys=("dice_mean", "dice_ratio", "through_plane_ratio", "psnr_body"),
                    segmenter_cache=None if args.quick else cache)
    return vpred_table(results, steps, sampler)


def table_cells(results: dict[str, dict[str, float]]):
    """The cells of a table over ``results``: ``(real row, mean(rows, key), fmt(value, digits), ratio(rows, key))``;
    ``mean`` over the rows that hold the key, ``ratio`` to the real volumes' row, "—" where there is nothing."""
    real = results.get(evaluation.REAL_VOLUME_ROW, {})

    def mean(rows: list[str], key: str) -> float | None:
        values = [results[r][key] for r in rows if key in results.get(r, {})]
        return sum(values) / len(values) if values else None

    def fmt(value: float | None, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    def ratio(rows: list[str], key: str) -> str:
        value, reference = mean(rows, key), real.get(key)
        return "—" if value is None or not reference else f"{value / reference:.2f}×"

    return real, mean, fmt, ratio


def starts_table(results: dict[str, dict[str, float]], sampler: dict, prediction: str) -> str:
    """The informed-start table: per setting and start, the mean over both seeds of each label's Dice over the real
    volumes', the core's mean intensity difference, the label order kept, PSNR (``test``) and the stripes."""
    real, mean, fmt, ratio = table_cells(results)

    about = (f"The demo's trained GEM-3D (stage 2, {prediction}), the 2 val cases, 1 sample per case and sampling "
             f"seed {' and '.join(map(str, STARTS_SEEDS))} (means over both); the demo's sampler otherwise "
             f"({sampler['sampler']} {sampler['steps']}, eta {sampler['eta']}, slice noise correlation "
             f"{sampler['slice_noise_correlation']}); segmenter: the demo's ({DEMO_SEGMENTER}). "
             "Label start: where the labelled structures start (`=`: the informed start). "
             "Dice per label as a ratio of the same segmenter's on the real val volumes; core mean: the "
             "non-enhancing core's mean intensity minus the real volume's ([0, 1] scale; the real core is dark).")
    lines = [*textwrap.wrap(about, width=116), "",
             "| setting | informed start | label start | Dice mean | " + " | ".join(f"{v} ×real" for v in LABELS.values())
             + " | core mean − real | label order kept | PSNR body (dB) | through-plane / in-plane |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting in STARTS_SETTINGS:
        for start, label_start in STARTS:
            rows = [starts_row(setting, start, label_start, seed) for seed in STARTS_SEEDS]
            lines.append(f"| `{setting}` | {start} | {label_start or '='} | {fmt(mean(rows, 'dice_mean'))} | "
                         + " | ".join(ratio(rows, f"dice_{k}") for k in LABELS)
                         + f" | {fmt(mean(rows, CORE_MEAN), 3)} | {fmt(mean(rows, 'label_order_kept'))} | "
                         f"{fmt(mean(rows, 'psnr_body'), 1) if setting == 'test' else ''} | "
                         f"{fmt(mean(rows, 'through_plane_ratio'))} |")
    copy = results.get(evaluation.COPY_ROW, {})
    lines.append(f"| copying the informed slice | | | | | | | | | {fmt(copy.get('psnr_body'), 1)} | |")
    lines.append(f"| real val volumes | | | {fmt(real.get('dice_mean'))} | 1 | 1 | 1 | 0 | 1 | | "
                 f"{fmt(real.get('through_plane_ratio'))} |")
    return "\n".join(lines)


def starts_row(setting: str, start: float, label_start: float | None, seed: int) -> str:
    return f"{setting}, informed start {start}, label start {label_start}, seed {seed}"


def run_starts(args: argparse.Namespace) -> str:
    """The informed-start experiment (``--only starts``, see the module docstring); returns its table."""
    if args.demo_out is None:
        raise SystemExit("--only starts needs --demo-out DIR (the output of `make demo`: DIR/dataset, DIR/models/demo, "
                         "DIR/report/segmenter_cache)")
    demo = args.demo_out.resolve()
    model = demo / "models" / "demo"
    missing = [str(p) for p in (demo / "dataset" / "dataset.json", model / "checkpoints" / "last.ckpt")
               if not p.is_file()]
    if missing:
        raise SystemExit(f"--demo-out {demo}: missing {missing} (run `make demo` first)")
    out = args.out.resolve() / "starts"
    dataset, cache = demo_copies(demo, out)
    sampler = dict(load_inference_config("demo")["sampler"])
    if args.quick:
        sampler["steps"] = 2
    rows: dict[str, Path] = {}
    for setting in STARTS_SETTINGS:
        for start, label_start in STARTS:
            for seed in STARTS_SEEDS:
                rows[starts_row(setting, start, label_start, seed)] = synthesise(
                    out, dataset, f"{setting}_start{start}_label{label_start}_seed{seed}", setting, model,
                    {**sampler, "informed_start": start, "label_start": label_start}, seed, samples_per_case=1)
    results = score(out, dataset, rows, 2 if args.quick else DEFAULT_ITERATIONS,
                    metrics=("reconstruction", "consistency", "segmenter", "labels"),
                    keys=("dice_mean", *(f"dice_{k}" for k in LABELS), CORE_MEAN, "label_order_kept", "psnr_body",
                          "through_plane_ratio"),
                    segmenter_cache=None if args.quick else cache)
    project = sorted((model / "configs").glob("*-project.yaml"))
    params = OmegaConf.load(project[-1]).model.params if project else {}
    return starts_table(results, sampler, str(params.get("prediction_type", "epsilon")))


def variants_table(about: str, what: str, variants: dict[str, list[str]], base_name: str,
                   results: dict[str, dict[str, float]], sampler: dict) -> str:
    """The table of :func:`compare_variants`: per variant (means over the seeds) each label's Dice over the real
    volumes', the core's brightness, the label order, PSNR and the stripes; ``about`` starts its caption."""
    real, mean, fmt, ratio = table_cells(results)
    about += (f", sampled ({sampler['sampler']} {sampler['steps']}, informed start {sampler['informed_start']}) on "
              f"{ENCODING_TUNING_CASES} tuning cases that no model or choice saw, sampling seeds "
              f"{' and '.join(map(str, ENCODING_SEEDS))} (means over both; `base`: the demo's, seed 0). Dice per label "
              f"as a ratio of the demo's segmenter's on the real tuning volumes (segmenter: {DEMO_SEGMENTER}); core "
              f"mean: the non-enhancing core's mean intensity minus the real volume's ([0, 1] scale).")
    seeds = " / ".join(map(str, ENCODING_SEEDS))
    lines = [*textwrap.wrap(about, width=116), "",
             f"| `test`, {what} | Dice mean | seed {seeds} | " + " | ".join(f"{v} ×real" for v in LABELS.values())
             + f" | core ×real, seed {seeds} | core mean − real | label order kept | PSNR body (dB) | "
             "through-plane / in-plane |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    named = {**{name: [encoding_row(name, seed) for seed in ENCODING_SEEDS] for name in variants},
             base_name: ["base"], "the autoencoder's reconstruction (ceiling)": [evaluation.AUTOENCODER_ROW],
             "copying the informed slice": [evaluation.COPY_ROW]}
    core = f"dice_{next(k for k, v in LABELS.items() if v == 'core')}"
    for name, rows in named.items():
        each = len(rows) > 1  # a variant: one row per sampling seed, shown one by one beside their mean
        lines.append(f"| {name} | {fmt(mean(rows, 'dice_mean'))} | "
                     + (" / ".join(fmt(mean([r], "dice_mean")) for r in rows) if each else "") + " | "
                     + " | ".join(ratio(rows, f"dice_{k}") for k in LABELS) + " | "
                     + (" / ".join(ratio([r], core) for r in rows) if each else "")
                     + f" | {fmt(mean(rows, CORE_MEAN), 3)} | {fmt(mean(rows, 'label_order_kept'))} | "
                     f"{fmt(mean(rows, 'psnr_body'), 1)} | {fmt(mean(rows, 'through_plane_ratio'))} |")
    lines.append(f"| real tuning volumes | {fmt(real.get('dice_mean'))} | | 1 | 1 | 1 | | 0 | 1 | | "
                 f"{fmt(real.get('through_plane_ratio'))} |")
    return "\n".join(lines)


def encoding_row(encoding: str, seed: int) -> str:
    return f"test, {encoding}, seed {seed}"


def trained_segmenter(cache: Path) -> Path:
    """The one trained segmenter folder (``segmenter.json``) in a segmenter cache."""
    found = sorted(p.parent for p in cache.glob("*/segmenter.json"))
    if len(found) != 1:
        raise SystemExit(f"{cache}: expected one trained segmenter (*/segmenter.json), found {len(found)}")
    return found[0]


def tuning_dataset(args: argparse.Namespace, out: Path) -> Path:
    """``out/tuning``: the tuning cases of the ``--demo-out`` modes, a demo dataset drawn with ``--seed`` + 1 (made
    once): :data:`ENCODING_TUNING_CASES` val cases that no demo model or choice saw (2 with ``--quick``)."""
    tuning = out / "tuning"
    if not (tuning / "dataset.json").is_file():
        build_demo_dataset(tuning, cases=4 if args.quick else ENCODING_TUNING_CASES + 2, seed=args.seed + 1,
                           val=2 if args.quick else ENCODING_TUNING_CASES, test=1)
    return tuning


def demo_models(args: argparse.Namespace, mode: str) -> tuple[Path, Path]:
    """The demo output of ``--demo-out`` and its models folder, checked for what ``--only MODE`` reads."""
    if args.demo_out is None:
        raise SystemExit(f"--only {mode} needs --demo-out DIR (the output of `make demo`: DIR/dataset, DIR/models, "
                         "DIR/report/segmenter_cache)")
    demo = args.demo_out.resolve()
    models = demo / "models"
    needed = [demo / "dataset" / "dataset.json", models / "demo_autoencoder" / "checkpoints" / "last.ckpt",
              models / "demo_base" / "checkpoints" / "last.ckpt"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(f"--demo-out {demo}: missing {missing} (run `make demo` first)")
    return demo, models


def compare_variants(args: argparse.Namespace, demo: Path, out: Path, variants: dict[str, list[str]],
                     prefix: str) -> tuple[dict[str, dict[str, float]], dict[str, int], dict]:
    """Train the demo's stage 1 and stage 2 once per variant (``name -> overrides`` of both configs), side by side
    with one thread each, for the demo models' steps and the same seed; sample ``test`` on the tuning cases with
    each of :data:`ENCODING_SEEDS` (and the demo's ``base``, seed 0); score them with the demo's segmenter.
    -> (results by row, the steps, the sampler)."""
    models = demo / "models"
    dataset, cache = demo_copies(demo, out)
    segmenter = None if args.quick else trained_segmenter(cache)
    steps = {"stage1": trained_steps(models / "demo_stage1", VPRED_DEFAULT_STEPS),
             "stage2": trained_steps(models / "demo", STAGE2_DEFAULT_STEPS)}
    if args.quick:
        steps = {"stage1": 4, "stage2": 4}
    autoencoder = models / "demo_autoencoder" / "checkpoints" / "last.ckpt"
    first_stage = f"model.params.first_stage_config.params.ckpt_path={autoencoder}"
    with ThreadPoolExecutor(max_workers=len(variants)) as pool:  # side by side, one thread each
        stage1 = {name: pool.submit(train, f"{prefix}{i}_s1", "demo_stage1", out, dataset, steps["stage1"],
                                    [first_stage, *overrides], 1)
                  for i, (name, overrides) in enumerate(variants.items())}
        stage1 = {name: future.result() for name, future in stage1.items()}
        stage2 = {name: pool.submit(train, f"{prefix}{i}_s2", "demo_stage2", out, dataset, steps["stage2"],
                                    [first_stage, *overrides,
                                     f"model.params.ckpt_path={stage1[name]}/checkpoints/last.ckpt"], 1)
                  for i, (name, overrides) in enumerate(variants.items())}
        stage2 = {name: future.result() for name, future in stage2.items()}

    tuning = tuning_dataset(args, out)
    sampler = dict(load_inference_config("demo")["sampler"])
    if args.quick:
        sampler["steps"] = 2
    rows: dict[str, Path] = {}
    for i, (name, run) in enumerate(stage2.items()):
        for seed in ENCODING_SEEDS:
            rows[encoding_row(name, seed)] = synthesise(out, tuning, f"{prefix}{i}_seed{seed}", "test", run, sampler,
                                                        seed, samples_per_case=1)
    rows["base"] = synthesise(out, tuning, "base", "base", models / "demo_base", sampler, 0, samples_per_case=1)
    results = score(out, tuning, rows, 2 if args.quick else DEFAULT_ITERATIONS,
                    metrics=("reconstruction", "consistency", "segmenter", "labels"),
                    keys=("dice_mean", *(f"dice_{k}" for k in LABELS), CORE_MEAN, "label_order_kept", "psnr_body",
                          "through_plane_ratio"),
                    segmenter=segmenter, extra=["--autoencoder", str(models / "demo_autoencoder")])
    return results, steps, sampler


def run_encoding(args: argparse.Namespace) -> str:
    """The mask-encoding experiment (``--only encoding``, see the module docstring); returns its table."""
    demo, models = demo_models(args, "encoding")
    out = args.out.resolve() / "encoding"
    dataset, _ = demo_copies(demo, out)
    preprocess = PreprocessConfig.from_dict(OmegaConf.to_container(
        OmegaConf.load(ROOT / "configs" / "latent-diffusion" / "demo_stage1.yaml").data.params.preprocess))
    first = FirstStage.from_run(models / "demo_autoencoder" / "checkpoints" / "last.ckpt").eval()
    volumes = RawDataset(dataset)
    scores: dict[int, list[float]] = {}
    for name in volumes.case_names():
        prepared = prepare_case(volumes.load_case(name), preprocess)
        for label, value in label_metrics.autoencoder_mask_dice(first, prepared.label, preprocess.max_label).items():
            if value == value:  # NaN: the case lacks the label
                scores.setdefault(label, []).append(value)
    label_names = {value: name for name, value in volumes.labels.items()}
    roundtrip = {label_names.get(k, str(k)): sum(v) / len(v) for k, v in sorted(scores.items())}
    results, steps, sampler = compare_variants(args, demo, out, ENCODINGS, "enc")
    about = (f"The paper's mask encoding through the demo's autoencoder: decode(encode(grey mask)) read back as the "
             f"nearest grey level, Dice per label against the mask, mean over the demo's cases: "
             + ", ".join(f"{name} {value:.2f}" for name, value in roundtrip.items()) + ". "
             f"Then stage 1 ({steps['stage1']} steps) and stage 2 ({steps['stage2']} steps) trained once per mask "
             f"encoding, same seed")
    return variants_table(about, "mask encoding", ENCODINGS, "`base` (the peer, autoencoder)", results, sampler)


def run_label_weight(args: argparse.Namespace) -> str:
    """The label-weighted loss experiment (``--only label-weight``, see the module docstring); returns its table."""
    demo, _ = demo_models(args, "label-weight")
    results, steps, sampler = compare_variants(args, demo, args.out.resolve() / "label_weight", LABEL_WEIGHTS, "lw")
    about = (f"The demo's stage 1 ({steps['stage1']} steps) and stage 2 ({steps['stage2']} steps), label fractions, "
             f"trained once without and once with a loss weighted inside the labelled structures (both stages), "
             f"same seed")
    return variants_table(about, "loss", LABEL_WEIGHTS, "`base` (the peer)", results, sampler)


def run_segmenter(args: argparse.Namespace) -> str:
    """The label-fidelity segmenter experiment (``--only segmenter``, see the module docstring); returns its table."""
    if args.demo_out is None:
        raise SystemExit("--only segmenter needs --demo-out DIR (the output of `make demo`: DIR/dataset)")
    dataset = args.demo_out.resolve() / "dataset"
    if not (dataset / "dataset.json").is_file():
        raise SystemExit(f"--demo-out {args.demo_out}: missing {dataset / 'dataset.json'} (run `make demo` first)")
    out = args.out.resolve() / "segmenter"
    tuning = tuning_dataset(args, out)
    real, held_out = RawDataset(dataset), split_cases(tuning, "val")
    cases = dataset_training_cases(real, split_cases(dataset, "train"))
    torch.set_num_threads(1)  # two trainings side by side, one core each

    def one(name: str, seed: int) -> tuple[float, dict[int, float]]:
        options, iterations = SEGMENTER_VARIANTS[name]
        settings = SegmenterSettings(backend="monai", iterations=2 if args.quick else iterations, seed=seed,
                                     device="cpu", options={"num_labels": real.max_label, **options})
        timing = out / "cache" / settings.key(cases) / "bench_seconds.json"  # the training's time, beside it
        timed = not timing.is_file()  # trained (or loaded) now: its time is recorded once, on the first run
        start = time.perf_counter()
        segmenter = cached_segmenter(settings, cases, out / "cache", progress=False)
        if timed:
            timing.write_text(json.dumps({"seconds": time.perf_counter() - start}))
        images = [tuning / "imagesTr" / f"{case}_0000.nii.gz" for case in held_out]
        predictions = segmenter.predict(images, segmenter.work_dir / "tuning_predictions", progress=False)
        scores: dict[int, list[float]] = {}
        for case, prediction in zip(held_out, predictions):
            label = np.asarray(nib.load(tuning / "labelsTr" / f"{case}.nii.gz").dataobj)
            for k, value in label_metrics.dice_per_label(np.asarray(nib.load(prediction).dataobj), label,
                                                         real.max_label).items():
                if value == value:  # NaN: the case lacks the label
                    scores.setdefault(k, []).append(value)
        return json.loads(timing.read_text())["seconds"], {k: sum(v) / len(v) for k, v in sorted(scores.items())}

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {(name, seed): pool.submit(one, name, seed)
                   for name in SEGMENTER_VARIANTS for seed in SEGMENTER_SEEDS}
        results = {key: future.result() for key, future in futures.items()}
    names = {value: name for name, value in real.labels.items()}
    labels = sorted(results[next(iter(results))][1])
    seeds = " / ".join(map(str, SEGMENTER_SEEDS))
    about = (f"MONAI BasicUNet (features 8-64), trained on the demo's {len(cases)} real training cases, one thread "
             f"each (two trainings side by side); Dice (MONAI) on the real volumes of {len(held_out)} tuning cases "
             f"(a demo dataset drawn with seed {args.seed + 1}: no test case of the demo), per label the mean over "
             f"the cases that hold it and over the seeds {seeds}.")
    lines = [*textwrap.wrap(about, width=116), "",
             f"| segmenter training | training s, seed {seeds} | "
             + " | ".join(names.get(k, str(k)) for k in labels) + f" | mean Dice, seed {seeds} |",
             "|---|---|" + "---|" * len(labels) + "---|"]
    for name in SEGMENTER_VARIANTS:
        runs = [results[(name, seed)] for seed in SEGMENTER_SEEDS]
        per_label = [sum(r[1][k] for r in runs) / len(runs) for k in labels]
        lines.append(f"| {name} | " + " / ".join(f"{r[0]:.0f}" for r in runs) + " | "
                     + " | ".join(f"{v:.2f}" for v in per_label) + " | "
                     + " / ".join(f"{sum(r[1].values()) / len(r[1]):.2f}" for r in runs) + " |")
    return "\n".join(lines)


def steps_row(setting: str, steps: int, seed: int) -> str:
    return f"{setting}, DDIM {steps}, seed {seed}"


def run_steps(args: argparse.Namespace) -> str:
    """The sampling-steps experiment (``--only steps``, see the module docstring); returns its table."""
    demo, models = demo_models(args, "steps")
    out = args.out.resolve() / "steps"
    cache = segmenter_cache_copy(demo, out)  # it samples the tuning cases only: the demo's dataset is not needed
    segmenter = None if args.quick else trained_segmenter(cache)
    tuning = tuning_dataset(args, out)
    sampler = dict(load_inference_config("demo")["sampler"])
    counts = (4, 2) if args.quick else STEP_COUNTS
    rows: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for setting in STEP_SETTINGS:
        model = models / ("demo_base" if setting == "base" else "demo")
        for steps in counts:
            for seed in ENCODING_SEEDS:
                row = steps_row(setting, steps, seed)
                rows[row] = synthesise(out, tuning, f"{setting}_steps{steps}_seed{seed}", setting, model,
                                       {**sampler, "steps": steps}, seed, samples_per_case=1)
                records = Manifest(rows[row] / "manifest.json").records
                seconds[row] = sum(r["seconds"] for r in records) / len(records)
    results = score(out, tuning, rows, 2 if args.quick else DEFAULT_ITERATIONS,
                    metrics=("reconstruction", "consistency", "segmenter", "labels"),
                    keys=("dice_mean", *(f"dice_{k}" for k in LABELS), CORE_MEAN, "label_order_kept", "psnr_body",
                          "through_plane_ratio"),
                    segmenter=segmenter, extra=["--autoencoder", str(models / "demo_autoencoder")])
    real, mean, fmt, ratio = table_cells(results)
    seeds = " / ".join(map(str, ENCODING_SEEDS))
    about = (f"The demo's trained GEM-3D (stage 2, {trained_steps(models / 'demo', 0)} steps) and `base` "
             f"({trained_steps(models / 'demo_base', 0)} steps), the {ENCODING_TUNING_CASES} tuning cases (a demo "
             f"dataset drawn with seed {args.seed + 1}: no test case of the demo), 1 sample per case, sampling seeds "
             f"{seeds}; the demo's sampler but for the step count ({sampler['sampler']}, eta {sampler['eta']}, "
             f"informed start {sampler['informed_start']}: the last {sampler['informed_start']:.0%} of the steps "
             f"run); segmenter: the demo's ({DEMO_SEGMENTER}). Dice per label as a ratio of the same segmenter's on "
             "the real tuning volumes, means over the seeds; s / volume: the manifests' wall time per volume "
             "(loading, sampling, decoding, writing; one process, torch's threads), mean over the seeds' runs.")
    lines = [*textwrap.wrap(about, width=116), "",
             f"| setting | DDIM steps | s / volume | Dice mean, seed {seeds} | "
             + " | ".join(f"{v} ×real" for v in LABELS.values())
             + " | label order kept | PSNR body (dB) | through-plane / in-plane |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for setting in STEP_SETTINGS:
        for steps in counts:
            named = [steps_row(setting, steps, seed) for seed in ENCODING_SEEDS]
            per_seed = " / ".join(fmt(results.get(r, {}).get("dice_mean")) for r in named)
            lines.append(f"| `{setting}` | {steps} | {sum(seconds[r] for r in named) / len(named):.1f} | {per_seed} | "
                         + " | ".join(ratio(named, f"dice_{k}") for k in LABELS)
                         + f" | {fmt(mean(named, 'label_order_kept'))} | "
                         f"{fmt(mean(named, 'psnr_body'), 1) if setting == 'test' else ''} | "
                         f"{fmt(mean(named, 'through_plane_ratio'))} |")
    copy, autoencoder = results.get(evaluation.COPY_ROW, {}), results.get(evaluation.AUTOENCODER_ROW, {})
    lines.append(f"| copying the informed slice | | | | | | | | {fmt(copy.get('psnr_body'), 1)} | |")
    lines.append(f"| the autoencoder (ceiling) | | | | | | | | {fmt(autoencoder.get('psnr_body'), 1)} | "
                 f"{fmt(autoencoder.get('through_plane_ratio'))} |")
    lines.append(f"| real tuning volumes | | | {fmt(real.get('dice_mean'))} | 1 | 1 | 1 | 1 | | "
                 f"{fmt(real.get('through_plane_ratio'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "mask_true")
    p.add_argument("--quick", action="store_true", help="a few steps per model: checks the script only")
    p.add_argument("--write", type=Path, help="replace the generated block of this markdown file with the table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("all", "vpred", "starts", "encoding", "label-weight", "segmenter", "steps"),
                   default="all",
                   help="all: the whole experiment above; vpred: the v-prediction experiment; starts: informed "
                        "starts of the demo's stage 2; encoding: the mask encoding; label-weight: a loss weighted "
                        "inside the labels; segmenter: the label-fidelity segmenter's training; steps: the sampler's "
                        "step count (all six need --demo-out)")
    p.add_argument("--demo-out", type=Path, help="every --only mode: a finished `make demo` output folder")
    p.add_argument("--vpred-steps", type=int, help="vpred: stage-1 steps (default: what the demo's stage 1 got)")
    args = p.parse_args(argv)
    if args.only != "all":
        run, begin, end = {"vpred": (run_vpred, VPRED_BEGIN, VPRED_END), "starts": (run_starts, STARTS_BEGIN, STARTS_END),
                           "encoding": (run_encoding, ENCODING_BEGIN, ENCODING_END),
                           "label-weight": (run_label_weight, LABEL_WEIGHT_BEGIN, LABEL_WEIGHT_END),
                           "segmenter": (run_segmenter, SEGMENTER_BEGIN, SEGMENTER_END),
                           "steps": (run_steps, STEPS_BEGIN, STEPS_END)}[args.only]
        text = run(args)
        print(text)
        if args.write is not None:
            write_block(args.write, text, begin, end)
        return 0
    steps = ({"ae": 4, "stage1": 4, "stage2": 4, "slice": 4, "segmenter": 2} if args.quick else
             {"ae": 1500, "stage1": 1600, "stage2": 850, "slice": 800, "segmenter": 300})
    out = args.out.resolve()
    dataset = out / "dataset"
    if not (dataset / "dataset.json").is_file():
        build_demo_dataset(dataset, cases=8 if args.quick else 16, seed=args.seed,
                           **({"val": 2, "test": 2} if args.quick else {}))
    ae = train("ae", "demo_autoencoder", out, dataset, steps["ae"], [])
    first_stage = f"model.params.first_stage_config.params.ckpt_path={ae / 'checkpoints' / 'last.ckpt'}"
    stage1 = {name: train(f"s1_{i}", "demo_stage1", out, dataset, steps["stage1"], [first_stage, *overrides])
              for i, (name, overrides) in enumerate(STAGE1.items())}
    base1 = train("b1", "demo_base_stage1", out, dataset, steps["stage1"], [first_stage])
    chosen_ckpt = stage1[CHOSEN] / "checkpoints" / "last.ckpt"
    stage2 = train("s2", "demo_stage2", out, dataset, steps["stage2"],
                   [first_stage, *STAGE1[CHOSEN], f"model.params.ckpt_path={chosen_ckpt}"])
    base2 = train("b2", "demo_base_stage2", out, dataset, steps["stage2"],
                  [first_stage, f"model.params.ckpt_path={base1 / 'checkpoints' / 'last.ckpt'}"])
    slice_model = train("slice", "demo_slice", out, dataset, steps["slice"], [first_stage])

    sampler = dict(load_inference_config("demo")["sampler"])
    rows: dict[str, Path] = {}
    for i, (name, run) in enumerate(stage1.items()):
        for setting in ("test", "ic"):
            rows[f"stage 1 alone, {name}: {setting}"] = synthesise(out, dataset, f"s1_{i}", setting, run,
                                                                    {**sampler, "informed_start": 0.5}, args.seed)
    rows["base stage 1: base"] = synthesise(out, dataset, "b1", "base", base1, {**sampler, "informed_start": 0.5},
                                            args.seed)
    for i, (name, change) in enumerate(SAMPLING.items()):
        for setting in ("test", "ic"):
            rows[f"stage 2, {name}: {setting}"] = synthesise(out, dataset, f"s2_{i}", setting, stage2,
                                                              {**sampler, **change}, args.seed)
    for setting in ("ig", "igma", "icma"):
        rows[f"stage 2, the demo's sampling: {setting}"] = synthesise(out, dataset, "s2_demo", setting, stage2,
                                                                       sampler, args.seed, slice_model)
    rows["base stage 2 (the demo's sampling): base"] = synthesise(out, dataset, "b2", "base", base2, sampler, args.seed)
    results = score(out, dataset, rows, steps["segmenter"])
    text = table(results, steps)
    print(text)
    if args.write is not None:
        write_block(args.write, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
