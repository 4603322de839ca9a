"""The CPU demo, end to end (what `make demo` runs).

1. builds the embedded demo dataset (MNI152-derived, nnU-Net raw layout) and checks it;
2. trains the demo autoencoder, stage 1 and the baseline's stage 1 side by side, stage 2 and the baseline's stage 2
   side by side, then the slice model and the label-fidelity segmenter, with main.py; each for the MINUTES its config
   gives (``max_time``), so a faster machine trains further, but never fewer than its floor of steps (``min_steps``),
   so a slower machine takes longer instead of training less; the first-stage latents are cached, so no diffusion
   step runs the encoder;
3. runs the settings ic, icma, ig, igma, test and base on the held-out demo cases (and the evaluation's extra rows),
   each in a child process as soon as its models are trained, beside the trainings still going;
4. writes an enhanced nnU-Net dataset (real + synthetic);
5. evaluates the outputs with ``scripts/evaluate.py`` (``demo_out/report/``: summary.md, report.html), with the
   reference rows beside GEM-3D: the informed slice copied into every slice, the autoencoder's reconstruction (the
   ceiling), stage 1 alone, ``base``, and a counterfactual pair (a T1-like and an inverted, T2-like donor slice);
6. prints the steps each model got, a table (setting, samples, seconds per volume, the ``test`` setting's
   PSNR / SSIM, output folder) and the evaluation's summary.

Everything goes under ``--out`` (default ``demo_out/``). Finished steps are skipped on a rerun, so an interrupted
demo resumes where it stopped.
"""
# The logic of scripts/demo.py. It drives a gem3d checkout (main.py, configs/latent-diffusion/, scripts/) in child
# processes; the demo DATASET is built by gem3d.data.demo.
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from gem3d.checkpoint import load_checkpoint
from gem3d.data.demo import split_counts
from gem3d.export.manifest import Manifest
from gem3d.export.nnunet import validate_nnunet_dataset, write_nnunet_dataset
from gem3d.inference.cli import config_from_args, parse_args
from gem3d.inference.engine import InferenceConfig
from gem3d.inference.settings import get_setting
from gem3d.metrics.volumes import reconstruction_quality
from gem3d.segmentation import DEFAULT_ITERATIONS

ROOT = Path(__file__).resolve().parents[1]  # the checkout: main.py, configs/latent-diffusion/, scripts/
INFERENCE_CONFIG = "demo"  # gem3d/configs/inference/demo.yaml: the sampler, mask edits, samples per case
AUTOENCODER = "demo_autoencoder"  # the first stage every other model encodes with
SEGMENTER = "segmenter"
# the label-fidelity segmenter's backend options (MONAI): random 32 x 48 x 48 patches of the 48 x 64 x 64 demo
# volumes, predicted by sliding window; on 12 tuning cases it trains in 0.6x the time of whole volumes and segments
# their real volumes far better (docs/mask-true.md, "The label-fidelity segmenter")
SEGMENTER_OPTIONS = {"patch": [32, 48, 48]}


@dataclass(frozen=True)
class DemoModel:
    """One model the demo trains. ``config``: ``configs/latent-diffusion/<config>.yaml`` (None: the label-fidelity
    segmenter, trained by the evaluation's code); ``first_stage``: it encodes with the demo autoencoder's checkpoint;
    ``stage1``: the model (a key of :data:`TRAINING`) whose checkpoint initialises it; ``after``: models it waits for
    although it needs nothing of theirs (the order in which the trainings share the machine)."""

    config: str | None
    first_stage: bool = False
    stage1: str | None = None
    after: tuple[str, ...] = ()

    def waits_for(self) -> tuple[str, ...]:
        """The models that must be trained before this one starts."""
        return (*([AUTOENCODER] if self.first_stage else []), *([self.stage1] if self.stage1 else []),
                *self.after)


# model dir name -> what it trains from. The order is the training order (two at a time): GEM-3D and the baseline
# train side by side, so they get the same minutes on the same share of the machine (a fair comparison).
TRAINING = {
    AUTOENCODER: DemoModel("demo_autoencoder"),
    "demo_stage1": DemoModel("demo_stage1", first_stage=True),
    "demo_base_stage1": DemoModel("demo_base_stage1", first_stage=True),
    "demo": DemoModel("demo_stage2", first_stage=True, stage1="demo_stage1"),
    "demo_base": DemoModel("demo_base_stage2", first_stage=True, stage1="demo_base_stage1"),
    "demo_slice": DemoModel("demo_slice", first_stage=True),
    # the label-fidelity segmenter (MONAI, on the real training cases): after both stage-2 models, so that it shares
    # the machine with the slice model and not with the models whose minutes count
    SEGMENTER: DemoModel(None, after=("demo", "demo_base")),
}
SETTINGS = ["test", "ic", "icma", "ig", "igma", "base"]


@dataclass(frozen=True)
class DemoInference:
    """One inference run of the demo, in a child process (``scripts/inference_demo_<setting>.py``): ``setting``;
    ``model``: its volume model (a key of :data:`TRAINING`); ``folder``: where it writes, under ``--out``; ``donor``:
    the contrast (``t1``, ``t2``) of the training case whose middle slice is every case's informed slice (the
    counterfactual pair; None: the setting's own informed slice)."""

    setting: str
    model: str
    folder: str = "synthetic"
    donor: str | None = None

    def waits_for(self) -> tuple[str, ...]:
        """The models that must be trained before this run starts."""
        return (self.model, *(["demo_slice"] if get_setting(self.setting).needs_slice_model else []))


# run name -> what it synthesises: the six settings on the reported cases (step 3), then the evaluation's extra rows
# (step 5). They run as soon as their models are trained, beside the trainings still going (the segmenter trains
# alone on one core for minutes), one thread each while two things run.
INFERENCE = {
    **{setting: DemoInference(setting, "demo_base" if setting == "base" else "demo") for setting in SETTINGS},
    "stage1-alone": DemoInference("test", "demo_stage1", "evaluation/stage1-alone"),
    **{f"counterfactual-{c}": DemoInference("ic", "demo", f"evaluation/counterfactual-{c}", c) for c in ("t1", "t2")},
}


def run(cmd: list[str], log: Path, threads: int | None = None) -> None:
    """Run a command, writing its output to ``log``; fail loudly with the log's tail. ``threads``: torch/OpenMP
    threads of the child (1 when two trainings share the 2 cores)."""
    print("$", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",  # the scripts import this checkout's gem3d, installed or not
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        raise RuntimeError(f"command failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail))


def newest_run(logdir: Path, name: str) -> Path:
    """The newest ``<logdir>/*_<name>`` run folder that holds ``checkpoints/last.ckpt``."""
    runs = sorted(p for p in logdir.glob(f"*_{name}") if (p / "checkpoints" / "last.ckpt").is_file())
    if not runs:
        raise SystemExit(f"training {name} wrote no checkpoints/last.ckpt under {logdir}")
    return runs[-1]


def scaled_time(max_time: str, scale: float) -> str:
    """Lightning's ``DD:HH:MM:SS`` times ``scale`` (at least one second)."""
    days, hours, minutes, seconds = (int(v) for v in str(max_time).split(":"))
    total = max(1, round((((days * 24 + hours) * 60 + minutes) * 60 + seconds) * scale))
    return f"{total // 86400:02d}:{total // 3600 % 24:02d}:{total // 60 % 60:02d}:{total % 60:02d}"


def trained_steps(model_dir: Path) -> int:
    """The optimiser steps in ``model_dir/checkpoints/last.ckpt``."""
    return int(load_checkpoint(model_dir / "checkpoints" / "last.ckpt").get("global_step", 0))


def evaluation_args(out: Path, dataset: Path, split: str, max_steps: int | None) -> list[str]:
    """The arguments of ``scripts/evaluate.py`` shared by the demo's evaluation and its segmenter training (one
    cache entry); the segmenter trains for the evaluation's default iterations (``max_steps``: a quick check's) with
    :data:`SEGMENTER_OPTIONS`."""
    iterations = DEFAULT_ITERATIONS if max_steps is None else max(2, max_steps)
    return ["--real", str(dataset), "--cases", f"split:{split}", "--out", str(out / "report"),
            "--segmenter-iterations", str(iterations), "--segmenter-options", json.dumps(SEGMENTER_OPTIONS)]


def training_overrides(name: str, out: Path, dataset: Path, time_scale: float, max_steps: int | None) -> list[str]:
    """main.py's ``key=value`` overrides of model ``name``: the dataset, the checkpoints it starts from, its time."""
    model, models = TRAINING[name], out / "models"
    overrides = [f"data.params.dataset_dir={dataset}"]
    if model.first_stage:
        checkpoint = models / AUTOENCODER / "checkpoints" / "last.ckpt"
        overrides.append(f"model.params.first_stage_config.params.ckpt_path={checkpoint}")
    if model.stage1:
        overrides.append(f"model.params.ckpt_path={models / model.stage1 / 'checkpoints' / 'last.ckpt'}")
    if time_scale != 1.0:
        cfg = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / f"{model.config}.yaml")
        max_time = scaled_time(OmegaConf.select(cfg, "lightning.trainer.max_time"), time_scale)
        overrides.append(f"lightning.trainer.max_time={max_time}")
    if max_steps is not None:
        overrides.append(f"lightning.trainer.max_steps={max_steps}")
    return overrides


def train_segmenter(out: Path, dataset: Path, split: str, max_steps: int | None, threads: int | None) -> Path:
    """The label-fidelity segmenter, trained into the evaluation's cache (``out/report/segmenter_cache``)."""
    t0 = time.perf_counter()
    code = ("import sys; from gem3d.metrics.evaluation import train_fidelity_segmenter; "
            "train_fidelity_segmenter(sys.argv[1:])")
    run([sys.executable, "-c", code, *evaluation_args(out, dataset, split, max_steps)],
        out / "train_logs" / "segmenter.log", threads)
    folder = out / "report" / "segmenter_cache"
    print(f"[demo] segmenter: trained in {time.perf_counter() - t0:.0f} s -> {folder}", flush=True)
    return folder


def train_one(name: str, out: Path, dataset: Path, time_scale: float, max_steps: int | None,
              threads: int | None, split: str = "test") -> Path:
    """Train one demo model with main.py and link its run folder as ``out/models/<name>``. ``time_scale``
    scales the config's ``max_time``; ``max_steps`` caps the steps (quick checks)."""
    if name == SEGMENTER:
        return train_segmenter(out, dataset, split, max_steps, threads)
    models, logdir = out / "models", out / "logs"
    overrides = training_overrides(name, out, dataset, time_scale, max_steps)
    t0 = time.perf_counter()
    run([sys.executable, "main.py", "--base", f"configs/latent-diffusion/{TRAINING[name].config}.yaml", "-t", "-n",
         name, "-l", str(logdir), *overrides], out / "train_logs" / f"{name}.log", threads)
    run_dir = newest_run(logdir, name)
    target = models / name
    if target.is_symlink() or target.exists():
        target.unlink() if target.is_symlink() else shutil.rmtree(target)
    target.symlink_to(run_dir.resolve(), target_is_directory=True)
    print(f"[demo] {name}: {trained_steps(target)} steps in {time.perf_counter() - t0:.0f} s -> {run_dir}", flush=True)
    return target


def infer_one(name: str, out: Path, dataset: Path, split: str, seed: int, sampling_steps: int | None,
              threads: int | None) -> Path | None:
    """Run :data:`INFERENCE` ``[name]`` with the inference script of its setting (finished samples are skipped on a
    rerun); its setting folder (None: a counterfactual without a donor of its contrast among the training cases)."""
    spec, models = INFERENCE[name], out / "models"
    informed_from = None
    if spec.donor is not None:
        donors = donors_by_contrast(dataset)
        if spec.donor not in donors:
            print(f"[demo] {name}: skipped, no training case of contrast {spec.donor!r} (have {sorted(donors)})")
            return None
        informed_from = f"{donors[spec.donor]}:0.5"
    argv = inference_argv(dataset, out / spec.folder, models / spec.model, models / "demo_slice", split, seed,
                          sampling_steps, informed_from)
    t0 = time.perf_counter()
    run([sys.executable, f"scripts/inference_demo_{spec.setting}.py", *argv],
        out / "train_logs" / f"inference_{name}.log", threads)
    print(f"[demo] {name}: synthesised in {time.perf_counter() - t0:.0f} s", flush=True)
    return inference_config(spec.setting, dataset, out / spec.folder, models / spec.model, models / "demo_slice",
                            split, seed, sampling_steps, informed_from).setting_dir


def run_steps(out: Path, dataset: Path, time_scale: float, max_steps: int | None, jobs: int, split: str = "test",
              seed: int = 0, sampling_steps: int | None = None) -> dict[str, Path]:
    """Train every demo model (:data:`TRAINING`) and run every inference (:data:`INFERENCE`), ``jobs`` at a time as
    their ``waits_for`` allows, in the tables' order (one thread each while others run or could run); models
    already trained (``out/models/<name>/checkpoints/last.ckpt``) are kept (the segmenter: by its cache). -> model
    folders and setting folders by name."""
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    done = {n: models / n for n in TRAINING if (models / n / "checkpoints" / "last.ckpt").is_file()}
    for name in done:
        print(f"[demo] {name}: already trained ({done[name]})")
    waits = {**{n: m.waits_for() for n, m in TRAINING.items()}, **{n: i.waits_for() for n, i in INFERENCE.items()}}

    def ready(name: str) -> bool:
        return all(n in done for n in waits[name])

    def start(name: str, threads: int | None):
        if name in TRAINING:
            return train_one(name, out, dataset, time_scale, max_steps, threads, split)
        return infer_one(name, out, dataset, split, seed, sampling_steps, threads)

    pending = [n for n in waits if n not in done]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict = {}
        while pending or running:
            for name in [n for n in pending if ready(n)][: jobs - len(running)]:
                pending.remove(name)
                parallel = jobs > 1 and (len(running) > 0 or sum(ready(n) for n in pending) > 0)
                running[pool.submit(start, name, 1 if parallel else None)] = name
            if not running:
                raise RuntimeError(f"cannot run {pending}: their dependencies failed")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done[running.pop(future)] = future.result()
    return done


def donors_by_contrast(dataset: Path) -> dict[str, str]:
    """One training case of each contrast (``t1``, ``t2``: inverted) of the demo dataset, for the counterfactual."""
    cases = json.loads((dataset / "gem3d_demo.json").read_text())["cases"]
    train = set(json.loads((dataset / "splits.json").read_text())["train"])
    found: dict[str, str] = {}
    for case in cases:
        if case["name"] in train:
            found.setdefault(case["contrast"], case["name"])
    return found


def inference_argv(dataset: Path, out: Path, model: Path, slice_model: Path, split: str, seed: int,
                   sampling_steps: int | None = None, informed_from: str | None = None) -> list[str]:
    """The flags of the demo's inference scripts (``scripts/inference_demo_<setting>.py``) over
    ``gem3d/configs/inference/demo.yaml``: the cases of ``split`` (``splits.json``) on the CPU without progress
    bars; ``sampling_steps`` (when given and not 0) replaces the config's DDIM steps; ``informed_from``: a
    counterfactual donor ``CASE:POS``."""
    argv = ["--data", str(dataset), "--out", str(out), "--split", "Tr", "--cases", f"split:{split}",
            "--model", str(model), "--slice-model", str(slice_model), "--seed", str(seed), "--device", "cpu",
            "--no-progress"]
    if sampling_steps:
        argv += ["--steps", str(sampling_steps)]
    if informed_from is not None:
        argv += ["--informed-from", informed_from]
    return argv


def inference_config(setting: str, dataset: Path, out: Path, model: Path, slice_model: Path, split: str, seed: int,
                     sampling_steps: int | None = None, informed_from: str | None = None) -> InferenceConfig:
    """The inference run that ``scripts/inference_demo_<setting>.py`` makes of :func:`inference_argv`'s flags."""
    argv = inference_argv(dataset, out, model, slice_model, split, seed, sampling_steps, informed_from)
    return config_from_args(INFERENCE_CONFIG, setting, parse_args(INFERENCE_CONFIG, setting, argv))


def evaluate(out: Path, dataset: Path, folders: dict[str, Path], split: str, max_steps: int | None) -> Path:
    """5. The evaluation with its yardsticks: stage 1 alone (the test setting through the stage-1 model), ``base``
    and GEM-3D against the copy-the-informed-slice baseline and the autoencoder ceiling, and a counterfactual pair
    (the ``ic`` setting with a T1-like and an inverted, T2-like donor slice, same seed); ``folders``: the setting
    folders of :func:`run_steps`."""
    rows = {"gem3d": "test", "base": "base", "stage1-alone": "stage1-alone", "counterfactual-t1": "counterfactual-t1",
            "counterfactual-t2": "counterfactual-t2", **{s: s for s in ("ic", "icma", "ig", "igma")}}
    synthetic = [f"{row}={folders[name]}" for row, name in rows.items() if folders[name] is not None]
    report = out / "report"
    run([sys.executable, "scripts/evaluate.py", *evaluation_args(out, dataset, split, max_steps),
         "--autoencoder", str(out / "models" / AUTOENCODER), *[a for s in synthetic for a in ("--synthetic", s)]],
        out / "train_logs" / "evaluate.log")
    return report


def setting_rows(folders: dict[str, Path]) -> list[tuple]:
    """3. Every setting of :data:`SETTINGS` -> a row ``(setting, samples, seconds per volume, output folder, (PSNR,
    SSIM) of the test setting or None)``, from the manifests of its run."""
    rows = []
    for setting in SETTINGS:
        folder = folders[setting]
        records = [r for r in Manifest(folder / "manifest.json").records if r["setting"] == setting]
        per_volume = sum(r["seconds"] for r in records) / max(1, len(records))
        quality = reconstruction_quality(folder, records) if setting == "test" else None
        quality = None if quality is None else (quality["psnr_body"], quality["ssim_axial_body"])
        rows.append((setting, len(records), per_volume, folder, quality))
    return rows


def print_tables(out: Path, steps: dict[str, int], rows: list[tuple], report: Path, enhanced: Path,
                 n_cases: int) -> None:
    """6. The training steps, the settings' table, the evaluation's summary and where everything is."""
    print("\ntraining steps (each model trained for the minutes of its config):")
    print("  " + ", ".join(f"{name} {n}" for name, n in steps.items()))
    print()
    print(f"{'setting':<8} {'samples':>7} {'s/volume':>9} {'PSNR dB':>8} {'SSIM':>5}  output")
    for setting, n, sec, folder, quality in rows:
        psnr_text, ssim_text = ("", "") if quality is None else (f"{quality[0]:.1f}", f"{quality[1]:.2f}")
        shown = folder.relative_to(out.parent) if out.parent in folder.parents else folder
        print(f"{setting:<8} {n:>7} {sec:>9.1f} {psnr_text:>8} {ssim_text:>5}  {shown}")
    print("PSNR/SSIM: the test setting's reconstruction against the real volume on its [0, 1] scale, canonical")
    print("orientation, inside the head (PSNR over the head's voxels, SSIM over axial slices; gem3d.metrics); other")
    print("settings change the informed slice or the mask, so they have no pixel-wise ground truth.")
    print("\nevaluation (scripts/evaluate.py; reference rows: the copied informed slice, the autoencoder's ceiling, "
          "stage 1")
    print("alone, base; all on the held-out cases):\n")
    print((report / "summary.md").read_text())
    print(f"report: {report / 'report.html'} (opens offline)")
    print(f"\nenhanced nnU-Net dataset: {enhanced} ({n_cases} training cases)")
    print(f"previews: {out / 'synthetic' / '<setting>' / 'previews'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "demo_out")
    p.add_argument("--cases", type=int, default=16, help="demo cases to build (8 train, 2 val, 6 test by default)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="the cases to synthesise and report: test (never used to choose a setting) or val (tuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="scale every training's minutes (max_time; its floor of steps, min_steps, stays)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every training's steps (quick checks)")
    p.add_argument("--sampling-steps", type=int, default=None, help="override the demo's DDIM steps")
    p.add_argument("--jobs", type=int, default=2, help="trainings run at once (one thread each when > 1)")
    return p


def run_demo(args: argparse.Namespace) -> int:
    """Steps 1-6 of the module's docstring with the parsed flags of :func:`build_parser`."""
    out = args.out.resolve()
    dataset = out / "dataset"
    t_start = time.perf_counter()

    # 1. the dataset
    if not (dataset / "dataset.json").is_file():
        val, test = split_counts(args.cases)
        run([sys.executable, "scripts/make_demo_dataset.py", str(dataset), "--cases", str(args.cases), "--seed",
             str(args.seed), "--val", str(val), "--test", str(test)], out / "train_logs" / "make_demo_dataset.log")
    run([sys.executable, "scripts/check_dataset.py", str(dataset)], out / "train_logs" / "check_dataset.log")
    print(f"[demo] dataset ready: {dataset}")

    # 2. training, 3. inference on the held-out cases (and the evaluation's extra rows), as their models are ready
    done = run_steps(out, dataset, args.time_scale, args.max_steps, args.jobs, args.split, args.seed,
                     args.sampling_steps)
    steps = {name: trained_steps(done[name]) for name in TRAINING if name != SEGMENTER}
    rows = setting_rows(done)

    # 4. the enhanced dataset
    enhanced = out / "enhanced" / "Dataset901_GEM3DDemoEnhanced"
    write_nnunet_dataset(dataset, [out / "synthetic" / s for s in ("ic", "icma", "ig", "igma")], enhanced,
                         overwrite=True)
    problems = validate_nnunet_dataset(enhanced)
    if problems:
        raise SystemExit("the enhanced dataset does not validate:\n" + "\n".join(problems))
    n_cases = json.loads((enhanced / "dataset.json").read_text())["numTraining"]

    # 5. the evaluation, with its reference rows
    t0 = time.perf_counter()
    report = evaluate(out, dataset, done, args.split, args.max_steps)
    print(f"[demo] evaluation in {time.perf_counter() - t0:.0f} s")

    # 6. the tables
    print_tables(out, steps, rows, report, enhanced, n_cases)
    print(f"total demo time: {time.perf_counter() - t_start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/demo.py``; a failed step prints ``[demo] failed: ...`` and returns 1."""
    args = build_parser().parse_args(argv)
    if not (ROOT / "main.py").is_file():
        raise SystemExit(f"the demo runs main.py, configs/ and scripts/ of a gem3d checkout; {ROOT} is none (install "
                         f"gem3d with pip install -e from a checkout)")
    try:
        return run_demo(args)
    except RuntimeError as err:
        print(f"[demo] failed: {err}", file=sys.stderr)
        return 1
