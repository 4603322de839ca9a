"""The one command line shared by every ``scripts/inference_<dataset>_<setting>.py``; flags override the defaults
of ``gem3d/configs/inference/<dataset>.yaml``, e.g. ``scripts/inference_brain_ic.py --data DATASET --cases 5``.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import pickle
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from gem3d.config import ALLOW_ANY_TARGET_FLAG, allow_any_target, check_keys, error_line
from gem3d.configs import packaged
from gem3d.data.datasets import default_splits_path
from gem3d.inference.engine import InferenceConfig, run_inference
from gem3d.inference.mask_edit import icma_edit
from gem3d.inference.settings import get_setting
from gem3d.inference.volume import SamplerOptions
from gem3d.models import precision

CONFIG_DIR = packaged("inference")

CONFIG_KEYS = ("data", "split", "cases", "out", "models", "samples_per_case", "seed", "device", "ema", "slice_ema",
               "sampler", "mask_edit", "preprocess")
SAMPLER_FLAGS = ("steps", "sampler", "eta", "window", "overlap", "known_noise", "clip_x0", "slice_noise_correlation",
                 "condition_posterior", "informed_guidance", "batch_windows", "informed_start", "window_informed")


def load_inference_config(dataset: str, config_dir: Path = CONFIG_DIR) -> dict:
    """``<config_dir>/<dataset>.yaml`` (default: the packaged ``gem3d/configs/inference``) as a plain dict."""
    path = Path(config_dir) / f"{dataset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(config_dir).glob("*.yaml"))
        raise FileNotFoundError(f"no inference config for dataset {dataset!r} at {path}; known: {known}")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    check_keys(config, CONFIG_KEYS, str(path))
    for key, allowed in (("sampler", [f.name for f in dataclasses.fields(SamplerOptions)]),
                         ("models", ("volume", "baseline", "slice")),
                         ("mask_edit", list(inspect.signature(icma_edit).parameters)[3:])):
        check_keys(config.get(key) or {}, allowed, f"{key} of {path}")
    return config


def build_parser(dataset: str, setting: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"inference_{dataset}_{setting}.py",
        description=f"GEM-3D inference, setting '{setting}': {get_setting(setting).description}. "
                    f"Defaults: gem3d/configs/inference/{dataset}.yaml",
    )
    p.add_argument("--model", type=Path, help="model dir (training run, converted or original GEM-3D folder)")
    p.add_argument("--slice-model", type=Path, help="position-conditioned slice model dir (ig, igma, slice)")
    p.add_argument("--data", type=Path, help="nnU-Net raw dataset folder")
    p.add_argument("--split", choices=("Tr", "Ts"), help="imagesTr/labelsTr or imagesTs/labelsTs")
    p.add_argument("--out", type=Path, help="output root; samples go to OUT/<setting>/")
    p.add_argument("--cases", help="N (first N), all, split:val / split:test (splits.json), or name,name,...")
    p.add_argument("--samples-per-case", type=int)
    p.add_argument("--steps", type=int, help="sampling steps (paper: 200)")
    p.add_argument("--sampler", choices=("ddim", "dpmpp"))
    p.add_argument("--eta", type=float, help="DDIM eta (paper: 1)")
    p.add_argument("--window", type=int, help="slices per window (paper: 16)")
    p.add_argument("--overlap", type=int, help="known slices carried between windows (paper: 1)")
    p.add_argument("--known-noise", choices=("timestep", "original"),
                   help="noise level of known frames: the clip's timestep (default) or the original's step index")
    p.add_argument("--condition-posterior", choices=("mean", "sample"),
                   help="mask/informed latents: encoder posterior mean (default) or a draw, as the original")
    p.add_argument("--clip-x0", type=float, help="clip the latent x0 estimate to [-V, V] in every step (default: off)")
    p.add_argument("--slice-noise-correlation", type=float,
                   help="RHO in [0, 1): noise correlated across neighbouring slices (ISCS-style; default 0: independent)")
    p.add_argument("--informed-guidance", type=float, metavar="W",
                   help="informed-slice guidance: eps_null + W (eps_informed - eps_null); 1 = off (default)")
    p.add_argument("--informed-start", type=float, metavar="S",
                   help="start every slice from the informed slice (inside its body), noised to the last S of the steps "
                        "(SDEdit strength in (0, 1]; 1 = off, from pure noise, as the paper)")
    p.add_argument("--window-informed", choices=["nearest", "first"],
                   help="each later window's informed latent: the nearest generated slice (the paper) or the real "
                        "informed slice (first)")
    p.add_argument("--batch-windows", type=int, metavar="N", help="sample N cases at once, windows in shared UNet calls")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=precision.CHOICES, default="auto",
                   help="UNet precision while sampling (auto: bf16 on GPUs that support it, fp32 on the CPU)")
    p.add_argument("--gpus", help="shard the cases over these GPUs, e.g. 0,1,2,3 (one process each, Lightning DDP)")
    p.add_argument("--num-processes", type=int, help="shard over N CPU processes (testing the sharding)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction,
                   help="sample the volume model with its EMA weights (default: the model's own choice)")
    p.add_argument("--slice-ema", action=argparse.BooleanOptionalAction,
                   help="sample the slice model with its EMA weights (default: the model's own choice)")
    p.add_argument("--informed-from", help="counterfactual: take the informed slice from CASE[:POS] (ic, icma)")
    p.add_argument("--informed-select", choices=("brightest", "darkest"),
                   help="de-enhancement: pick informed slices from the brightest/darkest decile of candidates")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling arbitrary objects from the checkpoint (only for files you trust)")
    p.add_argument(ALLOW_ANY_TARGET_FLAG, action="store_true",
                   help="let model folders' configs name any 'target:' (default: gem3d., torch., diffusers., lightning.)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--no-previews", action="store_true", help="skip the PNG previews")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help=argparse.SUPPRESS)
    return p


def config_from_args(dataset: str, setting: str, args: argparse.Namespace):
    spec = get_setting(setting)
    defaults = load_inference_config(dataset, args.config_dir)
    models = defaults.get("models", {}) or {}

    def pick(arg, key, fallback=None):
        return arg if arg is not None else defaults.get(key, fallback)

    sampler = dict(defaults.get("sampler", {}) or {})
    sampler.update({key: getattr(args, key) for key in SAMPLER_FLAGS if getattr(args, key) is not None})
    model_default = models.get("baseline" if spec.model == "baseline" else "volume")
    model = args.model or (Path(model_default) if model_default and spec.needs_volume_model else None)
    slice_default = models.get("slice")
    slice_model = args.slice_model or (Path(slice_default) if slice_default and spec.needs_slice_model else None)
    if pick(args.data, "data") is None:
        raise ValueError(f"no dataset: pass --data or set data: in gem3d/configs/inference/{dataset}.yaml")
    data = Path(pick(args.data, "data"))
    cases = None if pick(args.cases, "cases") is None else str(pick(args.cases, "cases"))
    no_splits = not default_splits_path(data).is_file()  # the dataset's own, else where training wrote them
    if args.cases is None and cases is not None and cases.startswith("split:") and no_splits:
        print(f"note: {data} has no splits.json (written by training), so the default --cases {cases} means all cases")
        cases = "all"
    return InferenceConfig(
        setting=setting,
        data=data,
        out=Path(pick(args.out, "out", f"outputs/{dataset}")),
        model=model,
        slice_model=slice_model,
        split=pick(args.split, "split", "Tr"),
        cases=cases,
        samples_per_case=int(pick(args.samples_per_case, "samples_per_case", 1)),
        sampler=SamplerOptions(**sampler),
        seed=int(pick(args.seed, "seed", 0)),
        device=pick(args.device, "device", "cpu"),
        ema=pick(args.ema, "ema"),
        slice_ema=pick(args.slice_ema, "slice_ema"),
        informed_from=args.informed_from,
        informed_select=args.informed_select,
        mask_edit=dict(defaults.get("mask_edit", {}) or {}),
        preprocess=defaults.get("preprocess"),
        previews=not args.no_previews,
        progress=not args.no_progress,
        trust_checkpoint=bool(args.trust_checkpoint),
    )


def main(dataset: str, setting: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/inference_<dataset>_<setting>.py``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser(dataset, setting).parse_args(argv)
    gpus = [int(g) for g in args.gpus.strip(",").split(",")] if args.gpus else None
    try:
        with allow_any_target(args.allow_any_target), precision.sampling_precision(args.precision):
            cfg = config_from_args(dataset, setting, args)
            manifest = run_inference(cfg, gpus=gpus, num_processes=args.num_processes or 1)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotImplementedError, ImportError,
            pickle.UnpicklingError) as err:
        if args.debug:
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    if os.environ.get("LOCAL_RANK", "0") == "0":  # one line, from the first process of a sharded run
        print(f"{setting}: samples and manifest in {manifest.parent}")
    return 0
