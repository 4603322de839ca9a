"""The downstream experiment: does a segmenter trained on real + synthetic cases beat one trained on real cases only?

Given a real nnU-Net raw dataset with ``splits.json`` (``train`` / ``val`` / ``test``) and gem3d output folders
``SYNTHETIC/<setting>/`` (``<case>_s<k>_image.nii.gz`` + ``_label.nii.gz``), it trains one segmenter (any backend of
:mod:`gem3d.segmentation`) per (regime, condition, seed) and scores each on the real ``test`` cases only.

- **Regime** ``k``: the first ``k`` cases of the sorted ``train`` split (``all``: every one). The synthetic cases of
  a regime are those made from these ``k`` cases' masks.
- **Conditions**: ``real``; ``real+<setting>`` (real + that setting's synthetic cases); ``<setting>-only``
  (synthetic cases alone); ``real+filtered`` (real + the synthetic cases of the filter settings whose label-fidelity
  Dice, by the ``real`` segmenter of the same regime and seed, is at least ``min_dice``).
- **Scores**: Dice per label of every test case (MONAI, :func:`gem3d.metrics.labels.dice_per_label`); per condition
  the mean +/- std over seeds of the per-seed mean over test cases, and the paired difference against ``real``
  (paired by test case and seed, mean Dice over labels) with a percentile bootstrap 95 % interval.

**Synthesis** (optional, :class:`Synthesis`, ``--model``): the synthetic cases must come from the regimes'
training masks, never from a test case's. Given the model folders, the experiment first runs the settings its
conditions need on the largest regime's training cases (``samples_per_case`` each, ``icma``/``igma`` with freshly
edited masks), into ``synthetic``; finished samples are skipped on a rerun.

Layout of ``out``: ``runs/<regime>/<condition>/seed<k>/`` (``segmenter/`` the backend's work folder,
``predictions/``, ``result.json`` written last: the done-stamp), ``results.csv`` (one row per run, test case and
label), ``summary.md``, ``summary.json``, ``downstream.png`` and ``downstream.html``. A rerun skips every run with a
``result.json`` and lets the backend resume an interrupted training.

**Parallel runs** (``jobs`` > 1, ``--jobs N``): up to N runs train at once, each in a worker process of its own
(``spawn``, one torch thread, ``OMP_NUM_THREADS=1``, progress bars off); a ``real+filtered`` run starts only after
the ``real`` run of its regime and seed has finished (it scores the synthetic cases with that segmenter). Every run
seeds itself, so its result does not depend on ``jobs``; log lines are printed as runs finish, and the results are
summarised in run order. ``jobs`` = 1 trains every run in this process, one after another.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import html
import json
import math
import multiprocessing
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch
from scipy import stats

from gem3d.data.datasets import default_splits_path, read_splits
from gem3d.data.nnunet import RawDataset
from gem3d.export.nnunet import SyntheticCase, find_synthetic_cases
from gem3d.files import atomic_path, atomic_write_json, atomic_write_text
from gem3d.metrics.labels import dice_per_label, mean_dice
from gem3d.segmentation import BACKENDS, Segmenter, SegmenterSettings, TrainingCase, get_segmenter

__all__ = ["DownstreamConfig", "Run", "RunFailed", "Synthesis", "synthesise", "needed_settings", "parse_condition",
           "plan_runs", "run_experiment", "bootstrap_ci", "paired_differences", "summarise", "main"]

SETTINGS = ("ic", "icma", "ig", "igma", "base")
GEM3D_SETTINGS = ("ic", "icma", "ig", "igma")
REAL = "real"
FILTERED = "real+filtered"
RESULT_FILE = "result.json"
MEAN = "mean"  # the per-(case, seed) mean Dice over the labels the test case holds
# the MONAI segmenter's optimiser steps per run by default (whole volumes); `make downstream` trains as the demo's
# label-fidelity segmenter instead (450 iterations on patches; the Makefile's DOWNSTREAM_SEGMENTER). Every run
# prints its seconds an iteration; the README's Downstream section gives what `make downstream` took on 2 cores.
DEMO_ITERATIONS = 200


@dataclass(frozen=True)
class DownstreamConfig:
    """One experiment: where the data are, what to train, how (``segmenter``: backend, iterations, device, options;
    its seed is replaced by each run's seed); ``jobs``: runs trained at once, each in its own worker process;
    ``real_share``: the share of real cases in a real + synthetic training set, reached by repeating the real cases
    (:func:`real_copies`; None: every case once)."""

    real: Path
    synthetic: Path
    out: Path
    conditions: tuple[str, ...] = (REAL, "real+icma", "real+base", "icma-only")
    real_counts: tuple[str, ...] = ("2",)
    seeds: tuple[int, ...] = (0, 1, 2)
    segmenter: SegmenterSettings = field(default_factory=SegmenterSettings)
    splits: Path | None = None
    min_dice: float | None = None
    filter_settings: tuple[str, ...] = GEM3D_SETTINGS
    resamples: int = 10000
    progress: bool = True
    jobs: int = 1
    real_share: float | None = None

    def __post_init__(self):
        if not isinstance(self.jobs, int) or isinstance(self.jobs, bool) or self.jobs < 1:
            raise ValueError(f"jobs must be an int >= 1 (runs trained at once), got {self.jobs!r}")
        if self.real_share is not None and not 0.0 < self.real_share < 1.0:
            raise ValueError(f"real_share must be in (0, 1) or None (every case once), got {self.real_share!r}")


@dataclass(frozen=True)
class Synthesis:
    """How to make the synthetic cases from the regimes' training masks: ``models`` maps ``gem3d`` (the stage-2
    folder for ic/icma/ig/igma) and ``base`` (the baseline's) to model folders; ``slice_model`` for ig/igma;
    ``inference_config``: the packaged inference defaults (sampler, mask edits) by dataset name."""

    models: dict[str, Path]
    slice_model: Path | None = None
    samples_per_case: int = 4
    inference_config: str = "demo"
    seed: int = 0
    device: str = "cpu"

    def model_for(self, setting: str) -> Path:
        key = "base" if setting == "base" else "gem3d"
        if key not in self.models:
            raise ValueError(f"setting {setting!r} needs --model {key}=FOLDER (given: {sorted(self.models)})")
        return Path(self.models[key])


@dataclass(frozen=True)
class Run:
    """One training: ``regime`` (``"2"``, ``"all"``), ``condition``, ``seed``, its real and synthetic cases."""

    regime: str
    condition: str
    seed: int
    real_cases: tuple[TrainingCase, ...]
    synthetic_cases: tuple[SyntheticCase, ...]

    def folder(self, out: Path) -> Path:
        return out / "runs" / f"n{self.regime}" / self.condition / f"seed{self.seed}"


def parse_condition(condition: str) -> tuple[bool, str | None]:
    """``(uses real cases, synthetic setting or None)``: ``real`` -> ``(True, None)``, ``real+icma`` ->
    ``(True, "icma")``, ``icma-only`` -> ``(False, "icma")``, ``real+filtered`` -> ``(True, "filtered")``."""
    match = re.fullmatch(r"real(?:\+(?P<added>[A-Za-z0-9]+))?|(?P<alone>[A-Za-z0-9]+)-only", condition)
    if match is None:
        raise ValueError(f"condition {condition!r} is not one of: real, real+<setting>, <setting>-only, "
                         f"real+filtered (settings: {list(SETTINGS)})")
    if match["alone"]:
        return False, match["alone"]
    return True, match["added"]


def regime_cases(train: Sequence[str], regime: str) -> list[str]:
    """The first ``regime`` names of the sorted training split (``all``: every one)."""
    names = sorted(train)
    if regime == "all":
        return names
    if not regime.isdigit() or not 1 <= int(regime) <= len(names):
        raise ValueError(f"real count {regime!r} must be 'all' or an int in [1, {len(names)}] (the training split "
                         f"has {len(names)} cases)")
    return names[: int(regime)]


def _splits_path(config: DownstreamConfig) -> Path:
    return Path(config.splits) if config.splits else default_splits_path(config.real)


def needed_settings(config: DownstreamConfig) -> list[str]:
    """The synthetic settings the conditions read, in condition order."""
    wanted: list[str] = []
    for condition in config.conditions:
        _, setting = parse_condition(condition)
        wanted += list(config.filter_settings) if setting == "filtered" else [setting] if setting else []
    return list(dict.fromkeys(wanted))


def synthesise(config: DownstreamConfig, synthesis: Synthesis, log: Callable[[str], None] = print) -> list[Path]:
    """Run every setting the conditions need on the training cases of the largest regime (the first k of the
    sorted ``train`` split; every regime takes its own from these), ``synthesis.samples_per_case`` samples each, into
    ``config.synthetic/<setting>``; returns the manifests. Test cases are never synthesised."""
    from gem3d.inference.cli import config_from_args, parse_args  # noqa: PLC0415  (only when synthesising)
    from gem3d.inference.engine import run_inference  # noqa: PLC0415

    if synthesis.samples_per_case < 1:
        raise ValueError(f"samples_per_case must be >= 1, got {synthesis.samples_per_case!r}")
    train = read_splits(_splits_path(config))["train"]
    names = sorted({n for regime in config.real_counts for n in regime_cases(train, regime)})
    manifests = []
    for setting in needed_settings(config):
        start = time.perf_counter()
        # the inference scripts' own command line over the packaged config: its defaults live in one place
        argv = ["--data", str(config.real), "--out", str(config.synthetic), "--cases", ",".join(names),
                "--model", str(synthesis.model_for(setting)), "--samples-per-case", str(synthesis.samples_per_case),
                "--seed", str(synthesis.seed), "--device", synthesis.device]
        argv += ["--slice-model", str(synthesis.slice_model)] if synthesis.slice_model else []
        argv += [] if config.progress else ["--no-progress"]
        cfg = config_from_args(synthesis.inference_config, setting,
                               parse_args(synthesis.inference_config, setting, argv))
        manifests.append(run_inference(cfg))
        log(f"[downstream] {setting}: {synthesis.samples_per_case} samples of each of {len(names)} training masks "
            f"in {time.perf_counter() - start:.0f} s -> {cfg.setting_dir}")
    return manifests


def plan_runs(config: DownstreamConfig) -> tuple[list[Run], list[str], RawDataset]:
    """Every run of the experiment (regime, seed, condition order; ``real`` first in each), the test case names, and
    the real dataset. Fails before any training when a condition has no cases."""
    dataset = RawDataset(config.real)
    splits = read_splits(_splits_path(config))
    if not splits["test"]:
        raise ValueError(f"{_splits_path(config)} has no test cases: the downstream "
                         "experiment scores on the real test split only")
    overlap = sorted(set(splits["test"]) & set(splits["train"]))
    if overlap:
        raise ValueError(f"test cases {overlap} are in the training split too")
    conditions = list(dict.fromkeys(config.conditions))
    if FILTERED in conditions:
        if config.min_dice is None or not 0.0 <= config.min_dice <= 1.0:
            raise ValueError(f"condition {FILTERED} needs min_dice in [0, 1], got {config.min_dice!r}")
        if REAL not in conditions:
            conditions.insert(0, REAL)  # its segmenter scores the synthetic cases
    if REAL in conditions:
        conditions.insert(0, conditions.pop(conditions.index(REAL)))
    synthetic: dict[str, list[SyntheticCase]] = {}
    for condition in conditions:
        _, setting = parse_condition(condition)
        wanted = list(config.filter_settings) if setting == "filtered" else [setting] if setting else []
        for name in wanted:
            if name not in synthetic:
                folder = config.synthetic / name
                if not folder.is_dir():
                    raise FileNotFoundError(f"condition {condition}: no synthetic folder {folder} (have "
                                            f"{sorted(p.name for p in config.synthetic.iterdir() if p.is_dir())})")
                synthetic[name] = find_synthetic_cases(folder)
    runs = []
    for regime in config.real_counts:
        names = regime_cases(splits["train"], regime)
        real = tuple(TrainingCase(n, dataset.image_path(n), dataset.label_path(n)) for n in names)
        for condition in conditions:
            uses_real, setting = parse_condition(condition)
            wanted = list(config.filter_settings) if setting == "filtered" else [setting] if setting else []
            added = tuple(c for s in wanted for c in synthetic[s] if c.case in names)
            if setting and not added:
                made_from = sorted({c.case for s in wanted for c in synthetic[s]})
                raise ValueError(f"condition {condition}, {regime} real cases {names}: no synthetic case was made "
                                 f"from their masks (the synthetic cases come from {made_from})")
            for seed in config.seeds:
                runs.append(Run(regime, condition, seed, real if uses_real else (), added))
    return runs, list(splits["test"]), dataset


def _segmenter(config: DownstreamConfig, run: Run, factory: Callable[..., Segmenter],
               labels: dict[str, int]) -> Segmenter:
    """The run's segmenter: ``config.segmenter`` with the run's seed, and every label of the real dataset (a regime
    whose few cases lack one still predicts them all): MONAI ``num_labels``, nnU-Net ``labels``, unless given."""
    base = config.segmenter
    options = dict(base.options)
    if base.backend == "monai":
        options.setdefault("num_labels", max(labels.values()))
    elif base.backend == "nnunet":
        options.setdefault("labels", dict(labels))
    settings = SegmenterSettings(backend=base.backend, iterations=base.iterations, seed=run.seed,
                                 device=base.device, options=options)
    return factory(settings, run.folder(config.out) / "segmenter")


def _dice_rows(predictions: Sequence[Path], labels: Sequence[Path], num_labels: int) -> list[dict[int, float]]:
    out = []
    for prediction, label in zip(predictions, labels):
        predicted = np.asarray(nib.load(str(prediction)).dataobj)
        reference = np.asarray(nib.load(str(label)).dataobj)
        out.append(dice_per_label(predicted, reference, num_labels))
    return out


def filter_scores(config: DownstreamConfig, real_run: Run, segmenter: Segmenter,
                  candidates: Sequence[SyntheticCase], num_labels: int) -> dict[str, float]:
    """Label-fidelity Dice (mean over the mask's labels) of each candidate synthetic case by the ``real``
    segmenter of the same regime and seed; cached in that run's ``filter_scores.json``."""
    path = real_run.folder(config.out) / "filter_scores.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    missing = [c for c in candidates if c.name not in scores]
    for setting in dict.fromkeys(c.setting for c in missing):  # one folder per setting: file names repeat
        batch = [c for c in missing if c.setting == setting]
        predicted = segmenter.predict([c.image for c in batch],
                                      real_run.folder(config.out) / "filter_predictions" / setting,
                                      progress=config.progress)
        for case, dice in zip(batch, _dice_rows(predicted, [c.label for c in batch], num_labels)):
            scores[case.name] = mean_dice(dice)
        atomic_write_json(path, scores)
    return {c.name: scores[c.name] for c in candidates}


def real_copies(n_real: int, n_synthetic: int, share: float | None) -> int:
    """How many times each real case enters a training set of ``n_real`` real and ``n_synthetic`` synthetic cases so
    that the real ones make up about ``share`` of it (>= 1; 1 without a share, real or synthetic cases)."""
    if share is None or n_real == 0 or n_synthetic == 0:
        return 1
    return max(1, round(share / (1.0 - share) * n_synthetic / n_real))


def repeated(cases: Sequence[TrainingCase], copies: int) -> list[TrainingCase]:
    """``cases`` and ``copies - 1`` more of each, named ``<name>_copy<k>`` (the same files)."""
    return [*cases, *(TrainingCase(f"{c.name}_copy{k}", c.image, c.label) for k in range(1, copies) for c in cases)]


def run_one(config: DownstreamConfig, run: Run, test_cases: Sequence[str], dataset: RawDataset,
            factory: Callable[..., Segmenter], real_segmenters: dict) -> dict[str, Any]:
    """Train (or resume) one run, predict the test cases, write and return its ``result.json``."""
    folder = run.folder(config.out)
    synthetic = list(run.synthetic_cases)
    scores = None
    if run.condition == FILTERED:
        real_run, real_segmenter = real_segmenters[(run.regime, run.seed)]
        scores = filter_scores(config, real_run, real_segmenter, synthetic, dataset.max_label)
        synthetic = [c for c in synthetic if math.isfinite(scores[c.name]) and scores[c.name] >= config.min_dice]
    copies = real_copies(len(run.real_cases), len(synthetic), config.real_share)
    cases = [*repeated(run.real_cases, copies), *(TrainingCase(c.name, c.image, c.label) for c in synthetic)]
    segmenter = _segmenter(config, run, factory, dataset.labels)
    start = time.perf_counter()
    if cases:
        segmenter.train(cases, progress=config.progress)
    train_seconds = time.perf_counter() - start
    if run.condition == REAL:
        real_segmenters[(run.regime, run.seed)] = (run, segmenter)
    images = [dataset.image_path(n) for n in test_cases]
    predictions = segmenter.predict(images, folder / "predictions", progress=config.progress) if cases else []
    dice = _dice_rows(predictions, [dataset.label_path(n) for n in test_cases], dataset.max_label)
    result = {
        "regime": run.regime, "condition": run.condition, "seed": run.seed,
        "real_cases": [c.name for c in run.real_cases], "synthetic_cases": [c.name for c in synthetic],
        "filter_scores": scores, "min_dice": config.min_dice if scores is not None else None,
        "real_share": config.real_share, "real_copies": copies,
        "dice": {name: {str(k): v for k, v in d.items()} for name, d in zip(test_cases, dice)},
        "train_seconds": round(train_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
        "segmenter": {"backend": segmenter.settings.backend, "iterations": segmenter.settings.iterations,
                      "device": segmenter.settings.device, "options": segmenter.settings.options},
    }
    atomic_write_json(folder / RESULT_FILE, result)
    return result


class RunFailed(RuntimeError):
    """A run failed in its worker process (``jobs`` > 1); the message names the run and the worker's error."""


def _tag(index: int, total: int, run: Run) -> str:
    return f"[downstream {index}/{total}] {run.regime} real, {run.condition}, seed {run.seed}"


def _finished_result(config: DownstreamConfig, run: Run, factory: Callable[..., Segmenter],
                     dataset: RawDataset) -> dict[str, Any] | None:
    """The run's ``result.json`` when it is finished (trained with the asked segmenter settings), else None."""
    path = run.folder(config.out) / RESULT_FILE
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    wanted = _segmenter(config, run, factory, dataset.labels).settings
    held = done["segmenter"]
    if (held["backend"], held["iterations"], held["options"]) != (wanted.backend, wanted.iterations,
                                                                  json.loads(json.dumps(wanted.options))):
        raise ValueError(f"{path} was trained with other segmenter settings ({held}); asked for "
                         f"{wanted.backend}, {wanted.iterations} iterations, options {wanted.options}: "
                         "use another --out")
    if done.get("real_share") != config.real_share:
        raise ValueError(f"{path} was trained with real share {done.get('real_share')!r}; asked for "
                         f"{config.real_share!r}: use another --out")
    return done


def _training_line(tag: str, run: Run) -> str:
    candidates = " candidate (before the filter)" if run.condition == FILTERED else ""
    return f"{tag}: training on {len(run.real_cases)} real + {len(run.synthetic_cases)}{candidates} synthetic cases"


def _finished_line(tag: str, config: DownstreamConfig, result: dict[str, Any]) -> str:
    per_iteration = result["train_seconds"] / max(1, config.segmenter.iterations)
    return (f"{tag}: mean Dice {np.nanmean(list(_case_means(result).values())):.3f} in {result['seconds']:.0f} s "
            f"({per_iteration:.2f} s an iteration)")


def run_experiment(config: DownstreamConfig, factory: Callable[..., Segmenter] = get_segmenter,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every run's result in run order (finished runs read from their ``result.json``), then the summary files.
    ``config.jobs`` > 1 trains in worker processes, so ``factory`` must then pickle (a module-level function or
    class); a run that fails there raises :class:`RunFailed`."""
    runs, test_cases, dataset = plan_runs(config)
    start = time.perf_counter()
    if config.jobs == 1:
        results = _run_in_process(config, runs, test_cases, dataset, factory, log)
    else:
        results = _run_in_workers(config, runs, test_cases, dataset, factory, log)
    write_summary(config, results, dataset, time.perf_counter() - start)
    return results


def _run_in_process(config: DownstreamConfig, runs: Sequence[Run], test_cases: Sequence[str], dataset: RawDataset,
                    factory: Callable[..., Segmenter], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``jobs`` = 1: every run in this process, one after another, in run order."""
    results, real_segmenters = [], {}
    for index, run in enumerate(runs, 1):
        tag = _tag(index, len(runs), run)
        done = _finished_result(config, run, factory, dataset)
        if done is not None:
            results.append(done)
            if run.condition == REAL:
                real_segmenters[(run.regime, run.seed)] = (run, _segmenter(config, run, factory, dataset.labels))
            log(f"{tag}: done before, skipped")
            continue
        log(_training_line(tag, run))
        result = run_one(config, run, test_cases, dataset, factory, real_segmenters)
        results.append(result)
        log(_finished_line(tag, config, result))
    return results


def _start_worker(backends: dict[str, str]) -> None:
    """Set up a worker process: one OpenMP and torch thread (two one-thread trainings on two cores are faster than
    one two-thread training after the other), and the parent's segmenter backends (those registered at run time
    included)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # and for the processes it starts (nnU-Net's augmentation workers)
    torch.set_num_threads(1)
    BACKENDS.update(backends)


def _train_in_worker(config: DownstreamConfig, run: Run, real_run: Run | None, test_cases: Sequence[str],
                     dataset: RawDataset, factory: Callable[..., Segmenter]) -> dict[str, Any]:
    """One run in a worker process; a ``real+filtered`` run reads the trained segmenter of ``real_run`` from its
    folder."""
    real_segmenters = {}
    if real_run is not None:
        real_segmenters[(real_run.regime, real_run.seed)] = (
            real_run, _segmenter(config, real_run, factory, dataset.labels))
    return run_one(config, run, test_cases, dataset, factory, real_segmenters)


def _check_picklable(factory: Callable[..., Segmenter], jobs: int) -> None:
    try:
        pickle.dumps(factory)
    except Exception as err:  # noqa: BLE001  (PicklingError, AttributeError, TypeError: whatever pickle raises)
        raise ValueError(f"jobs={jobs} trains each run in a worker process, which needs a segmenter factory that "
                         f"pickles (a module-level function or class, or an instance of one); {factory!r} does "
                         f"not: {err}") from err


def _run_in_workers(config: DownstreamConfig, runs: Sequence[Run], test_cases: Sequence[str], dataset: RawDataset,
                    factory: Callable[..., Segmenter], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``jobs`` > 1: finished runs are skipped here; the others train in up to ``jobs`` spawned worker processes,
    started in run order as soon as a worker is free (``real+filtered`` once its ``real`` run has finished). After a
    failure no run starts; the runs in flight finish (and keep their ``result.json``), then :class:`RunFailed`."""
    results: dict[int, dict[str, Any]] = {}
    pending: list[int] = []
    real_finished: set[tuple[str, int]] = set()
    for index, run in enumerate(runs):
        done = _finished_result(config, run, factory, dataset)
        if done is None:
            pending.append(index)
            continue
        results[index] = done
        if run.condition == REAL:
            real_finished.add((run.regime, run.seed))
        log(f"{_tag(index + 1, len(runs), run)}: done before, skipped")
    if not pending:
        return [results[i] for i in sorted(results)]
    _check_picklable(factory, config.jobs)
    real_runs = {(r.regime, r.seed): r for r in runs if r.condition == REAL}
    worker_config = replace(config, progress=False)  # one progress bar per worker would interleave
    failures: list[tuple[int, BaseException]] = []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or locks
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(config.jobs, len(pending)), mp_context=context,
                                                initializer=_start_worker, initargs=(dict(BACKENDS),)) as pool:
        running: dict[concurrent.futures.Future, int] = {}
        while running or (pending and not failures):
            ready = [i for i in pending if runs[i].condition != FILTERED
                     or (runs[i].regime, runs[i].seed) in real_finished]
            for index in ([] if failures else ready[: config.jobs - len(running)]):
                run = runs[index]
                pending.remove(index)
                real_run = real_runs[(run.regime, run.seed)] if run.condition == FILTERED else None
                log(_training_line(_tag(index + 1, len(runs), run), run))
                future = pool.submit(_train_in_worker, worker_config, run, real_run, test_cases, dataset, factory)
                running[future] = index
            if not running:  # cannot happen: a real run is always ready, and it is planned before its filtered run
                raise RuntimeError(f"no run can start: {[_tag(i + 1, len(runs), runs[i]) for i in pending]}")
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in sorted(finished, key=running.__getitem__):
                index = running.pop(future)
                run, tag = runs[index], _tag(index + 1, len(runs), runs[index])
                try:
                    results[index] = future.result()
                except BaseException as err:  # noqa: BLE001  (a worker's KeyboardInterrupt included)
                    failures.append((index, err))
                    log(f"{tag}: failed ({type(err).__name__}: {err}); starting no more runs, "
                        f"{len(running)} still in flight")
                    continue
                if run.condition == REAL:
                    real_finished.add((run.regime, run.seed))
                log(_finished_line(tag, config, results[index]))
    if failures:
        index, err = failures[0]
        others = [_tag(i + 1, len(runs), runs[i]) for i, _ in failures[1:]]
        also = f" (failed too: {'; '.join(others)})" if others else ""
        raise RunFailed(f"{_tag(index + 1, len(runs), runs[index])}: failed in its worker process: "
                        f"{type(err).__name__}: {err}{also}; finished runs keep their result.json, a rerun "
                        "resumes the others") from err
    return [results[i] for i in sorted(results)]


# -- statistics ----------------------------------------------------------------------------------------------------
def _case_means(result: dict[str, Any]) -> dict[str, float]:
    """``{test case: mean Dice over its labels}`` of one run's result."""
    return {case: mean_dice({int(k): v for k, v in dice.items()}) for case, dice in result["dice"].items()}


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 10000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (``scipy.stats.bootstrap``); NaN for < 2 values."""
    values = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if values.size < 2:
        return math.nan, math.nan
    found = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=resamples,
                            method="percentile", rng=np.random.default_rng(seed))
    return float(found.confidence_interval.low), float(found.confidence_interval.high)


def paired_differences(results: Sequence[dict[str, Any]], regime: str, condition: str) -> list[float]:
    """``condition`` - ``real`` mean Dice, paired by (test case, seed), of one regime (pairs where both exist)."""
    def by_pair(name: str) -> dict[tuple[str, int], float]:
        return {(case, r["seed"]): value for r in results if r["regime"] == regime and r["condition"] == name
                for case, value in _case_means(r).items()}
    real, other = by_pair(REAL), by_pair(condition)
    return [other[key] - real[key] for key in sorted(set(real) & set(other))
            if math.isfinite(other[key]) and math.isfinite(real[key])]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(results: Sequence[dict[str, Any]], label_names: dict[int, str], resamples: int = 10000
              ) -> list[dict[str, Any]]:
    """One row per (regime, condition) in run order: Dice per label and ``mean`` as mean +/- std over seeds (each
    seed's value is its mean over test cases), the paired difference against ``real`` and its bootstrap 95 % CI."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for result in results:
        rows.setdefault((result["regime"], result["condition"]), {"runs": []})["runs"].append(result)
    out = []
    for (regime, condition), row in rows.items():
        runs = row["runs"]
        dice = {}
        for value, name in [*label_names.items(), (None, MEAN)]:
            per_seed = []
            for r in runs:
                cases = _case_means(r) if value is None else {c: d[str(value)] for c, d in r["dice"].items()}
                finite = [v for v in cases.values() if math.isfinite(v)]
                per_seed.append(float(np.mean(finite)) if finite else math.nan)
            dice[name] = _mean_std(per_seed)
        differences = paired_differences(results, regime, condition) if condition != REAL else []
        low, high = bootstrap_ci(differences, resamples=resamples) if differences else (math.nan, math.nan)
        out.append({
            "regime": regime, "condition": condition, "seeds": sorted(r["seed"] for r in runs),
            "real_cases": len(runs[0]["real_cases"]),
            "synthetic_cases": float(np.mean([len(r["synthetic_cases"]) for r in runs])),
            "dice": dice, "difference": float(np.mean(differences)) if differences else math.nan,
            "ci": (low, high), "pairs": len(differences),
            "better_pairs": int(sum(d > 0 for d in differences)),
            "minutes": sum(r["seconds"] for r in runs) / 60.0,
        })
    return out


# -- outputs -------------------------------------------------------------------------------------------------------
def _fmt(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    return "—" if not math.isfinite(mean) else f"{mean:.3f} ± {std:.3f}"


def _fmt_difference(row: dict[str, Any]) -> str:
    if row["condition"] == REAL:
        return "(reference)"
    if not math.isfinite(row["difference"]):
        return "—"
    low, high = row["ci"]
    interval = f" [{low:+.3f}, {high:+.3f}]" if math.isfinite(low) else ""
    return f"{row['difference']:+.3f}{interval}"


def table_rows(summary: Sequence[dict[str, Any]], label_names: dict[int, str]) -> tuple[list[str], list[list[str]]]:
    header = ["real cases", "condition", "training cases (real + synthetic)",
              *[f"Dice {n}" for n in label_names.values()], "Dice mean", "Δ vs real [95 % CI]", "better pairs"]
    body = []
    for row in summary:
        cases = f"{row['real_cases']} + {row['synthetic_cases']:g}"
        better = "" if row["condition"] == REAL else f"{row['better_pairs']}/{row['pairs']}"
        body.append([row["regime"], row["condition"], cases, *[_fmt(row["dice"][n]) for n in label_names.values()],
                     _fmt(row["dice"][MEAN]), _fmt_difference(row), better])
    return header, body


def markdown_table(summary: Sequence[dict[str, Any]], label_names: dict[int, str]) -> str:
    header, body = table_rows(summary, label_names)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per regime: mean Dice per condition (bar: mean over seeds, whisker: std, dots: each seed)."""
    import matplotlib  # noqa: PLC0415  (only for the figure)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    regimes = list(dict.fromkeys(row["regime"] for row in summary))
    fig, axes = plt.subplots(1, len(regimes), figsize=(1.2 + 1.3 * max(4, len(summary) / len(regimes)) *
                                                       len(regimes), 3.6), squeeze=False, sharey=True)
    for ax, regime in zip(axes[0], regimes):
        rows = [row for row in summary if row["regime"] == regime]
        for x, row in enumerate(rows):
            mean, std = row["dice"][MEAN]
            ax.bar(x, mean, yerr=std, color="#4c72b0" if row["condition"] != REAL else "#999999", capsize=3)
            seeds = [np.nanmean(list(_case_means(r).values())) for r in results
                     if r["regime"] == regime and r["condition"] == row["condition"]]
            ax.plot([x] * len(seeds), seeds, "k.", markersize=4)
        ax.set_xticks(range(len(rows)), [row["condition"] for row in rows], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{regime} real training cases", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("Dice on the real test cases (mean over labels)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def html_section(summary: Sequence[dict[str, Any]], label_names: dict[int, str], image: str, note: str) -> str:
    """A standalone HTML page (one ``<section>``): the table, the plot and what they show."""
    header, body = table_rows(summary, label_names)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>gem3d downstream</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:1em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(2){text-align:left}"
        "</style></head><body>\n<section id='downstream'><h2>Downstream: segmenters trained on real vs real + "
        "synthetic cases</h2>\n"
        f"<p>{html.escape(note)}</p>\n<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>\n"
        f"<p><img src='{html.escape(image)}' alt='Dice per condition' style='max-width:100%'></p>\n"
        "</section></body></html>\n")


def write_summary(config: DownstreamConfig, results: Sequence[dict[str, Any]], dataset: RawDataset,
                  seconds: float) -> str:
    """``results.csv``, ``summary.json``, ``summary.md``, ``downstream.png``, ``downstream.html``; returns the
    markdown table."""
    out = config.out
    label_names = {v: name for name, v in dataset.labels.items() if v > 0}
    summary = summarise(results, label_names, config.resamples)
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["regime", "condition", "seed", "case", "label", "dice"])
        for r in results:
            for case, dice in r["dice"].items():
                for value, name in label_names.items():
                    writer.writerow([r["regime"], r["condition"], r["seed"], case, name, dice[str(value)]])
                writer.writerow([r["regime"], r["condition"], r["seed"], case, MEAN, _case_means(r)[case]])
    segmenter = config.segmenter
    test_count = len(next(iter(results))["dice"]) if results else 0
    note = (f"Segmenter: {segmenter.backend}, {segmenter.iterations} iterations, options {segmenter.options}, "
            f"seeds {list(config.seeds)}. Dice on {test_count} real test cases (never trained on): mean ± std over "
            "seeds of each seed's mean over the test cases. Δ: the condition minus real only, paired by test case "
            "and seed (mean Dice over labels), with its percentile bootstrap 95 % interval; better pairs: pairs "
            f"where the condition scores higher. The runs took {sum(r['seconds'] for r in results) / 60:.1f} "
            f"minutes summed over runs ({config.jobs} at a time in this call, which took {seconds / 60:.1f} minutes).")
    if config.real_share is not None:
        copies = sorted({r.get("real_copies", 1) for r in results if r["synthetic_cases"] and r["real_cases"]})
        note += (f" Real share {config.real_share:g}: in real + synthetic runs each real case enters the training set "
                 f"{' or '.join(map(str, copies)) or '1'} times.")
    table = markdown_table(summary, label_names)
    atomic_write_json(out / "summary.json", {"rows": summary, "note": note})
    atomic_write_text(out / "summary.md", f"# Downstream\n\n{note}\n\n{table}\n")
    plot(summary, results, out / "downstream.png")
    atomic_write_text(out / "downstream.html", html_section(summary, label_names, "downstream.png", note))
    return table


# -- command line --------------------------------------------------------------------------------------------------
def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE (VALUE as JSON or a bare string), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, type=Path, help="real nnU-Net raw dataset (with splits.json)")
    p.add_argument("--synthetic", required=True, type=Path, help="folder of gem3d setting folders (OUT/<setting>)")
    p.add_argument("--out", required=True, type=Path, help="output folder (runs, summary, plot, HTML)")
    p.add_argument("--splits", type=Path, default=None,
                   help="splits.json (default: REAL/splits.json, else the one training wrote in the cache)")
    p.add_argument("--conditions", nargs="+", default=list(DownstreamConfig.conditions),
                   help="real, real+<setting>, <setting>-only, real+filtered; 'all' = real, real+<each of "
                        f"{list(SETTINGS)} found>, icma-only, real+filtered (with --min-dice)")
    p.add_argument("--real-counts", nargs="+", default=list(DownstreamConfig.real_counts),
                   help="real training cases per regime: ints or 'all' (the first k of the sorted train split)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DownstreamConfig.seeds))
    p.add_argument("--backend", default="monai", choices=sorted(BACKENDS))
    p.add_argument("--iterations", type=int, default=DEMO_ITERATIONS,
                   help=f"optimiser steps per training (default {DEMO_ITERATIONS}; `make downstream` passes 450 with "
                        "32 x 48 x 48 patches, the demo's label-fidelity segmenter)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. configuration=3d_fullres iterations_per_epoch=250 (nnunet)")
    p.add_argument("--min-dice", type=float, default=None, help="quality filter of real+filtered")
    p.add_argument("--filter-settings", nargs="+", default=list(GEM3D_SETTINGS),
                   help="the settings whose synthetic cases real+filtered considers")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--real-share", type=float, default=None,
                   help="share of real cases in real + synthetic training sets, by repeating the real cases (e.g. "
                        "0.5; default: every case once)")
    p.add_argument("--jobs", type=int, default=DownstreamConfig.jobs,
                   help="runs trained at once, each in its own process at one thread (2 on a 2-core CPU); "
                        "real+filtered runs wait for their real run")
    g = p.add_argument_group("synthesis", "make the synthetic cases first, from the regimes' training masks")
    g.add_argument("--model", action="append", type=_model, default=[], metavar="gem3d=DIR|base=DIR",
                   help="model folders: gem3d (ic, icma, ig, igma) and base; without --model, SYNTHETIC must hold "
                        "cases made from the training masks already")
    g.add_argument("--slice-model", type=Path, default=None, help="the slice model (ig, igma)")
    g.add_argument("--samples-per-case", type=int, default=4, help="synthetic samples of every training mask")
    g.add_argument("--inference-config", default="demo", help="packaged inference defaults (sampler, mask edits)")
    g.add_argument("--synthesis-seed", type=int, default=0)
    return p


def _model(text: str) -> tuple[str, Path]:
    key, sep, value = text.partition("=")
    if not sep or key not in ("gem3d", "base") or not value:
        raise argparse.ArgumentTypeError(f"--model takes gem3d=DIR or base=DIR, got {text!r}")
    return key, Path(value)


def synthesis_from_args(args: argparse.Namespace) -> Synthesis | None:
    if not args.model:
        return None
    return Synthesis(models=dict(args.model), slice_model=args.slice_model, samples_per_case=args.samples_per_case,
                     inference_config=args.inference_config, seed=args.synthesis_seed, device=args.device)


def config_from_args(args: argparse.Namespace) -> DownstreamConfig:
    conditions = list(args.conditions)
    if conditions == ["all"]:
        models = dict(args.model)
        makeable = {"ic", "icma", *(("ig", "igma") if args.slice_model else ())} if "gem3d" in models else set()
        makeable |= {"base"} if "base" in models else set()
        found = [s for s in SETTINGS if s in makeable or (args.synthetic / s).is_dir()]
        conditions = [REAL, *[f"real+{s}" for s in found], "icma-only"]
        conditions += [FILTERED] if args.min_dice is not None else []
    for condition in conditions:
        parse_condition(condition)
    segmenter = SegmenterSettings(backend=args.backend, iterations=args.iterations, device=args.device,
                                  options=dict(args.option))
    return DownstreamConfig(real=args.real, synthetic=args.synthetic, out=args.out, conditions=tuple(conditions),
                            real_counts=tuple(args.real_counts), seeds=tuple(args.seeds), segmenter=segmenter,
                            splits=args.splits, min_dice=args.min_dice, filter_settings=tuple(args.filter_settings),
                            resamples=args.resamples, progress=not args.no_progress, jobs=args.jobs,
                            real_share=args.real_share)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        start = time.perf_counter()
        synthesis = synthesis_from_args(args)
        if synthesis is not None:
            synthesise(config, synthesis)
        run_experiment(config)
    except (ValueError, FileNotFoundError, ImportError, RunFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((config.out / "summary.md").read_text())
    print(f"[downstream] {time.perf_counter() - start:.0f} s; wrote {config.out}/summary.md, downstream.png, "
          "downstream.html, results.csv")
    return 0
