"""The CPU demo, end to end (what `make demo` runs).

1. builds the embedded demo dataset (MNI152-derived, nnU-Net raw layout) and checks it;
2. trains the demo autoencoder, stage 1, stage 2, the slice model and the baseline (both stages) with main.py;
3. runs the settings ic, icma, ig, igma, test and base on the held-out demo cases;
4. writes an enhanced nnU-Net dataset (real + synthetic);
5. prints a table: setting, samples, seconds per volume, output folder.

Everything goes under ``--out`` (default ``demo_out/``). Finished steps are skipped on a rerun, so an interrupted
demo resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (model dir name, config, extra overrides given the models trained so far)
TRAINING = [
    ("demo_autoencoder", "demo_autoencoder", []),
    ("demo_stage1", "demo_stage1", ["first_stage"]),
    ("demo_slice", "demo_slice", ["first_stage"]),
    ("demo_base_stage1", "demo_base_stage1", ["first_stage"]),
    ("demo", "demo_stage2", ["first_stage", "stage1:demo_stage1"]),
    ("demo_base", "demo_base_stage2", ["first_stage", "stage1:demo_base_stage1"]),
]
SETTINGS = ["test", "ic", "icma", "ig", "igma", "base"]


def run(cmd: list[str], log: Path) -> None:
    """Run a command, teeing its output to ``log``; fail loudly with the log's tail."""
    print("$", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        raise SystemExit(f"command failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail))


def newest_run(logdir: Path, name: str) -> Path:
    runs = sorted(p for p in logdir.glob(f"*_{name}") if (p / "checkpoints" / "last.ckpt").is_file())
    if not runs:
        raise SystemExit(f"training {name} wrote no checkpoints/last.ckpt under {logdir}")
    return runs[-1]


def train_models(out: Path, dataset: Path, steps_scale: float) -> dict[str, Path]:
    models, logdir = out / "models", out / "logs"
    models.mkdir(parents=True, exist_ok=True)
    trained: dict[str, Path] = {}
    for name, config, needs in TRAINING:
        target = models / name
        if (target / "checkpoints" / "last.ckpt").is_file():
            print(f"[demo] {name}: already trained ({target})")
            trained[name] = target
            continue
        overrides = [f"data.params.dataset_dir={dataset}"]
        for need in needs:
            if need == "first_stage":
                ae = trained["demo_autoencoder"] / "checkpoints" / "last.ckpt"
                overrides.append(f"model.params.first_stage_config.params.ckpt_path={ae}")
            elif need.startswith("stage1:"):
                overrides.append(f"model.params.ckpt_path={trained[need.split(':', 1)[1]] / 'checkpoints' / 'last.ckpt'}")
        if steps_scale != 1.0:
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / f"{config}.yaml")
            steps = int(OmegaConf.select(cfg, "lightning.trainer.max_steps"))
            overrides.append(f"lightning.trainer.max_steps={max(2, int(steps * steps_scale))}")
        t0 = time.perf_counter()
        run([sys.executable, "main.py", "--base", f"configs/latent-diffusion/{config}.yaml", "-t", "-n", name,
             "-l", str(logdir), *overrides], out / "train_logs" / f"{name}.log")
        run_dir = newest_run(logdir, name)
        if target.exists() or target.is_symlink():
            target.unlink() if target.is_symlink() else shutil.rmtree(target)
        target.symlink_to(run_dir.resolve(), target_is_directory=True)
        trained[name] = target
        print(f"[demo] {name}: trained in {time.perf_counter() - t0:.0f} s -> {run_dir}")
    return trained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "demo_out")
    p.add_argument("--cases", type=int, default=10, help="demo cases to build")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale every training run's max_steps (quick checks)")
    p.add_argument("--sampling-steps", type=int, default=None, help="override the demo's DDIM steps")
    args = p.parse_args(argv)
    out = args.out.resolve()
    dataset = out / "dataset"
    t_start = time.perf_counter()

    # 1. the dataset
    if not (dataset / "dataset.json").is_file():
        run([sys.executable, "scripts/make_demo_dataset.py", str(dataset), "--cases", str(args.cases), "--seed",
             str(args.seed)], out / "train_logs" / "make_demo_dataset.log")
    run([sys.executable, "scripts/check_dataset.py", str(dataset)], out / "train_logs" / "check_dataset.log")
    print(f"[demo] dataset ready: {dataset}")

    # 2. training
    models = train_models(out, dataset, args.steps_scale)

    # 3. inference on the held-out cases
    from gem3d.inference.engine import InferenceConfig, run_inference
    from gem3d.inference.cli import load_inference_config
    from gem3d.inference.volume import SamplerOptions
    from gem3d.export.manifest import Manifest

    defaults = load_inference_config("demo")
    sampler = dict(defaults["sampler"])
    if args.sampling_steps:
        sampler["steps"] = args.sampling_steps
    rows = []
    for setting in SETTINGS:
        t0 = time.perf_counter()
        cfg = InferenceConfig(
            setting=setting, data=dataset, out=out / "synthetic", split="Tr", cases="split:val",
            model=models["demo_base" if setting == "base" else "demo"], slice_model=models["demo_slice"],
            samples_per_case=int(defaults.get("samples_per_case", 1)), sampler=SamplerOptions(**sampler),
            seed=args.seed, device="cpu", mask_edit=dict(defaults.get("mask_edit") or {}), progress=False,
        )
        manifest = Manifest(run_inference(cfg))
        records = [r for r in manifest.records if r["setting"] == setting]
        per_volume = sum(r["seconds"] for r in records) / max(1, len(records))
        rows.append((setting, len(records), per_volume, cfg.setting_dir))
        print(f"[demo] {setting}: {len(records)} samples in {time.perf_counter() - t0:.0f} s")

    # 4. the enhanced dataset
    from gem3d.export.nnunet import validate_nnunet_dataset, write_nnunet_dataset

    enhanced = out / "enhanced" / "Dataset901_GEM3DDemoEnhanced"
    write_nnunet_dataset(dataset, [out / "synthetic" / s for s in ("ic", "icma", "ig", "igma")], enhanced,
                         overwrite=True)
    problems = validate_nnunet_dataset(enhanced)
    if problems:
        raise SystemExit("the enhanced dataset does not validate:\n" + "\n".join(problems))
    n_cases = json.loads((enhanced / "dataset.json").read_text())["numTraining"]

    # 5. the table
    print()
    print(f"{'setting':<8} {'samples':>7} {'s/volume':>9}  output")
    for setting, n, sec, folder in rows:
        print(f"{setting:<8} {n:>7} {sec:>9.1f}  {folder.relative_to(out.parent) if out.parent in folder.parents else folder}")
    print(f"\nenhanced nnU-Net dataset: {enhanced} ({n_cases} training cases)")
    print(f"previews: {out / 'synthetic' / '<setting>' / 'previews'}")
    print(f"total demo time: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
