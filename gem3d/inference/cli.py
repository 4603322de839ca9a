"""The one command line shared by every ``scripts/inference_<dataset>_<setting>.py``. The settings come, last one
winning, from ``gem3d/configs/inference/<dataset>.yaml``, the ``--config FILE`` files, ``key=value`` overrides
(OmegaConf dotlist, as ``main.py`` takes them) and the flags, e.g.
``scripts/inference_brain_ic.py --data DATASET --cases 5 sampler.steps=50``.

Preprocessing: the model's own training preprocessing (``data.params.preprocess`` of its folder) is used; the
packaged ``fallback_preprocess`` only for models that carry none (original GEM-3D folders). A ``preprocess:`` block in
a ``--config`` file or ``preprocess.KEY=VALUE`` overrides it explicitly; where that differs from the model's own it is
an error naming both values, unless ``--force-preprocess``.
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
from gem3d.inference.engine import InferenceConfig, merge_rank_manifests, run_inference
from gem3d.inference.mask_edit import icma_edit
from gem3d.inference.settings import get_setting
from gem3d.inference.volume import SamplerOptions
from gem3d.models import precision

CONFIG_DIR = packaged("inference")

CONFIG_KEYS = ("data", "split", "cases", "out", "models", "samples_per_case", "seed", "device", "ema", "slice_ema",
               "sampler", "mask_edit", "preprocess", "fallback_preprocess", "channel", "background")
SAMPLER_FLAGS = ("steps", "sampler", "eta", "window", "overlap", "known_noise", "clip_x0", "slice_noise_correlation",
                 "condition_posterior", "informed_guidance", "batch_windows", "informed_start", "label_start",
                 "window_informed")
MASK_EDIT_FLAGS = ("lesion_labels", "flip_probability", "max_degrees", "distance")
# --as-original: the original GEM-3D computation (docs/original-models.md); every option it sets, and its value
AS_ORIGINAL_SAMPLER = {"sampler": "ddim", "steps": 200, "eta": 1.0, "window": 16, "overlap": 1,
                       "known_noise": "original", "condition_posterior": "sample", "clip_x0": None,
                       "slice_noise_correlation": 0.0, "informed_guidance": 1.0, "informed_start": 1.0}
AS_ORIGINAL = {"precision": "fp32", "donor": "original", "ema": False, "slice_ema": False,
               "require_preprocessed": True, "background": "generated"}


def _check_config(config: dict, where: str) -> None:
    check_keys(config, CONFIG_KEYS, where)
    for key, allowed in (("sampler", [f.name for f in dataclasses.fields(SamplerOptions)]),
                         ("models", ("volume", "baseline", "slice")),
                         ("mask_edit", list(inspect.signature(icma_edit).parameters)[3:])):
        check_keys(config.get(key) or {}, allowed, f"{key} of {where}")


def load_inference_config(dataset: str, config_dir: Path = CONFIG_DIR) -> dict:
    """``<config_dir>/<dataset>.yaml`` (default: the packaged ``gem3d/configs/inference``) as a plain dict."""
    return read_inference_config(dataset, config_dir)[0]


def read_inference_config(dataset: str, config_dir: Path = CONFIG_DIR, config_files: Sequence[Path] = (),
                          overrides: Sequence[str] = ()) -> tuple[dict, dict | None]:
    """``(config, explicit preprocess)``: ``<config_dir>/<dataset>.yaml`` merged with ``config_files`` (in order)
    and the dotlist ``overrides`` (``key=value``); the explicit preprocess is the merged ``preprocess`` (None where no
    file or override sets one: the model's own is used; the packaged configs hold ``fallback_preprocess`` only)."""
    path = Path(config_dir) / f"{dataset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(config_dir).glob("*.yaml"))
        raise FileNotFoundError(f"no inference config for dataset {dataset!r} at {path}; known: {known}")
    layers = []
    for file in config_files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"--config {str(file)!r}: no such file")
        layers.append(OmegaConf.load(file))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ValueError(f"unrecognised arguments {bad}: overrides are KEY=VALUE (e.g. sampler.steps=50)")
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    where = " + ".join([str(path), *map(str, config_files), *(["overrides"] if overrides else [])])
    config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), *layers), resolve=True) or {}
    _check_config(config, where)
    return config, config.get("preprocess")  # the packaged configs set none: only a user's file or override does


def parse_part(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n; SLURM: ``$SLURM_ARRAY_TASK_ID/N`` with ``--array=0-(N-1)``) -> ``(i, n)``."""
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit() and int(index) < int(count)):
        raise ValueError(f"--part must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {text!r}")
    return int(index), int(count)


def parse_labels_list(text: str | None) -> list[int] | None:
    """``"1,2,3"`` -> ``[1, 2, 3]``; ``""`` or ``"none"`` -> ``[]`` (no lesion label)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip() and t.strip().lower() != "none"]
    if not all(t.isdigit() and int(t) > 0 for t in items):
        raise ValueError(f"--lesion-labels must be label values > 0 separated by commas (e.g. 1,2,3), got {text!r}")
    return [int(t) for t in items]


def parse_range(text: str | None, flag: str) -> list[float] | None:
    """``"LO,HI"`` -> ``[lo, hi]``."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 2:
        raise ValueError(f"{flag} must be LO,HI (two numbers), got {text!r}")
    return values


def build_parser(dataset: str, setting: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"inference_{dataset}_{setting}.py",
        description=f"GEM-3D inference, setting '{setting}': {get_setting(setting).description}. "
                    f"Defaults: gem3d/configs/inference/{dataset}.yaml",
    )
    p.add_argument("--config", type=Path, action="append", default=[], metavar="FILE",
                   help="inference config merged over the packaged one (repeatable); trailing KEY=VALUE overrides "
                        "(e.g. sampler.steps=50, preprocess.window=[-100,200]) come last")
    p.add_argument("--force-preprocess", action="store_true",
                   help="run with an explicit preprocess: that differs from the model's own (default: an error)")
    p.add_argument("--channel", help="image channel of the dataset: index or dataset.json channel name, e.g. FLAIR "
                                     "(default: the model's data.params.channel, else 0)")
    p.add_argument("--part", metavar="I/N", help="generate the I-th of N shares of the samples (0 <= I < N; SLURM "
                                                 "array tasks); join them with scripts/inference_merge_parts.py")
    p.add_argument("--as-original", action="store_true",
                   help="the original GEM-3D computation: DDIM 200, eta 1, known-frame noise 'original', posterior "
                        "draws, fp32, raw weights, the original's donor choice, an nnU-Net preprocessed --data")
    p.add_argument("--lesion-labels", metavar="L,L", help="icma/igma: the labels the edit moves (others stay); "
                                                          "default: mask_edit.lesion_labels of the config")
    p.add_argument("--flip-probability", type=float, metavar="P", help="icma/igma: left-right flip probability")
    p.add_argument("--max-degrees", type=float, help="icma/igma: rotation range, +- degrees per axis")
    p.add_argument("--shift-distance", metavar="LO,HI", help="icma/igma: shift toward the centre, voxels")
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
    p.add_argument("--label-start", type=float, metavar="L",
                   help="with --informed-start S < 1: the mask's labelled structures start at the level of the last L "
                        "of the steps (L in [S, 1]; 1: pure noise), the rest at S (default: S everywhere)")
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
    p.add_argument("--background", choices=["generated", "real"],
                   help="outside the body: the volume as generated (the paper) or the real case's own voxels (a "
                        "skull-stripped MRI's zeros, which nonzero z-score normalisation needs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help=argparse.SUPPRESS)
    return p


def apply_as_original(args: argparse.Namespace, sampler: dict) -> dict:
    """The ``--as-original`` preset: sets every option of :data:`AS_ORIGINAL_SAMPLER` and :data:`AS_ORIGINAL` on
    ``args`` / ``sampler``; a flag given with another value is refused, naming both."""
    given = {key: getattr(args, key) for key in SAMPLER_FLAGS if getattr(args, key, None) is not None}
    given.update({key: getattr(args, key) for key in ("ema", "slice_ema", "background")
                  if getattr(args, key, None) is not None})
    if getattr(args, "precision", "auto") != "auto":
        given["precision"] = args.precision
    wanted = {**AS_ORIGINAL_SAMPLER, **AS_ORIGINAL}
    clash = {key: value for key, value in given.items() if key in wanted and value != wanted[key]}
    if clash:
        listed = ", ".join(f"{key}={value!r} (the original: {wanted[key]!r})" for key, value in clash.items())
        raise ValueError(f"--as-original runs the original computation; it conflicts with {listed}")
    if getattr(args, "informed_from", None) or getattr(args, "informed_select", None):
        raise ValueError("--as-original draws the informed slice as the original does; drop --informed-from / "
                         "--informed-select")
    args.precision, args.ema, args.slice_ema = AS_ORIGINAL["precision"], AS_ORIGINAL["ema"], AS_ORIGINAL["slice_ema"]
    return {**sampler, **AS_ORIGINAL_SAMPLER}


def config_from_args(dataset: str, setting: str, args: argparse.Namespace):
    spec = get_setting(setting)
    defaults, explicit_preprocess = read_inference_config(dataset, args.config_dir, getattr(args, "config", []),
                                                          getattr(args, "overrides", []))
    models = defaults.get("models", {}) or {}

    def pick(arg, key, fallback=None):
        return arg if arg is not None else defaults.get(key, fallback)

    sampler = dict(defaults.get("sampler", {}) or {})
    sampler.update({key: getattr(args, key) for key in SAMPLER_FLAGS if getattr(args, key) is not None})
    as_original = bool(getattr(args, "as_original", False))
    if as_original:
        sampler = apply_as_original(args, sampler)
    mask_edit_flags = {"lesion_labels": parse_labels_list(getattr(args, "lesion_labels", None)),
                       "flip_probability": getattr(args, "flip_probability", None),
                       "max_degrees": getattr(args, "max_degrees", None),
                       "distance": parse_range(getattr(args, "shift_distance", None), "--shift-distance")}
    mask_edit = {**(defaults.get("mask_edit", {}) or {}),
                 **{key: value for key, value in mask_edit_flags.items() if value is not None}}
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
        mask_edit=mask_edit,
        preprocess=explicit_preprocess,
        fallback_preprocess=defaults.get("fallback_preprocess"),
        force_preprocess=bool(getattr(args, "force_preprocess", False)),
        channel=pick(getattr(args, "channel", None), "channel"),
        part=parse_part(getattr(args, "part", None)),
        donor=AS_ORIGINAL["donor"] if as_original else "other",
        require_preprocessed=as_original and AS_ORIGINAL["require_preprocessed"],
        previews=not args.no_previews,
        progress=not args.no_progress,
        trust_checkpoint=bool(args.trust_checkpoint),
        background=AS_ORIGINAL["background"] if as_original else pick(getattr(args, "background", None), "background",
                                                                       "generated"),
    )


def main(dataset: str, setting: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/inference_<dataset>_<setting>.py``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(dataset, setting, argv)
    gpus = [int(g) for g in args.gpus.strip(",").split(",")] if args.gpus else None
    try:
        cfg = config_from_args(dataset, setting, args)  # --as-original sets args.precision
        if cfg.part is not None and (gpus or (args.num_processes or 1) > 1):
            raise ValueError(f"--part {args.part} runs one process; it cannot be combined with --gpus / "
                             f"--num-processes (give each array task one GPU)")
        with allow_any_target(args.allow_any_target), precision.sampling_precision(args.precision):
            manifest = run_inference(cfg, gpus=gpus, num_processes=args.num_processes or 1)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotImplementedError, ImportError,
            pickle.UnpicklingError) as err:
        if args.debug:
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    if cfg.part is not None:
        print(f"{setting}: part {cfg.part[0]}/{cfg.part[1]} in {manifest}; when every part has finished: "
              f"python scripts/inference_merge_parts.py {manifest.parent} --parts {cfg.part[1]}")
    elif os.environ.get("LOCAL_RANK", "0") == "0":  # one line, from the first process of a sharded run
        print(f"{setting}: samples and manifest in {manifest.parent}")
    return 0


def parse_args(dataset: str, setting: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, with the trailing ``key=value`` config overrides in ``args.overrides``."""
    parser = build_parser(dataset, setting)
    args, extra = parser.parse_known_args(argv)
    flags = [item for item in extra if "=" not in item or item.startswith("-")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    args.overrides = extra
    return args


def merge_parts_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/inference_merge_parts.py``: join the manifests of ``--part I/N`` runs
    (``OUT/<setting>/manifest.rank<I>.json``) into ``manifest.json``. Exits 1 naming the parts that have not written
    their manifest yet (merge again once they have), 2 on bad input."""
    parser = argparse.ArgumentParser(prog="inference_merge_parts.py", description=merge_parts_main.__doc__)
    parser.add_argument("setting_dir", type=Path, help="the output folder of one setting, OUT/<setting>")
    parser.add_argument("--parts", type=int, required=True, help="N of --part I/N")
    args = parser.parse_args(argv)
    if not args.setting_dir.is_dir() or args.parts < 1:
        print(f"error: {args.setting_dir} is not a folder, or --parts {args.parts} < 1", file=sys.stderr)
        return 2
    present = [i for i in range(args.parts) if (args.setting_dir / f"manifest.rank{i}.json").is_file()]
    missing = [i for i in range(args.parts) if i not in present]
    try:
        path = merge_rank_manifests(args.setting_dir, args.parts)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    print(f"merged parts {present} of {args.parts} into {path}")
    if missing:
        print(f"parts {missing} have no manifest in {args.setting_dir}: still running or failed; rerun them "
              f"(finished samples are skipped) and merge again", file=sys.stderr)
        return 1
    return 0
