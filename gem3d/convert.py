"""Conversion (``scripts/convert_gem3d_checkpoint.py``): any model folder -> a converted gem3d model folder::

    <dst>/weights.safetensors     # the Denoiser state dict: unet.* (raw or EMA, as chosen) + first_stage.*
    <dst>/configs/model.yaml      # model: {target: gem3d.denoiser.Denoiser, params}, data.params.preprocess, source
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf
from safetensors.torch import save_file

from gem3d.config import ALLOW_ANY_TARGET_FLAG, allow_any_target, error_line
from gem3d.files import atomic_path
from gem3d.model_dirs.load import (
    CONVERTED_CONFIG, CONVERTED_WEIGHTS, DENOISER_TARGET, EXPECTED, detect_layout, load_model_dir, read_preprocess,
)  # fmt: skip


def convert_model_dir(src: str | Path, dst: str | Path, ema: bool | None = None, trust: bool = False,
                      preprocess: dict | None = None, overwrite: bool = False) -> Path:
    """Write a converted gem3d model folder from any model folder. ``ema``: True / False = the EMA / raw weights
    (error if there are none), None = the model's default (see :func:`load_model_dir`). ``preprocess``: stored with
    the model."""
    src, dst = Path(src), Path(dst)
    if src.is_file():
        raise ValueError(f"source {str(src)!r} is a file, not a model folder; {EXPECTED}")
    kind = detect_layout(src)
    if dst.resolve() == src.resolve():
        raise ValueError(f"destination {str(dst)!r} is the source folder; choose a new folder")
    if (dst / CONVERTED_WEIGHTS).exists() and not overwrite:
        raise FileExistsError(f"{dst} already holds a converted model; pass overwrite=True (--overwrite) to replace it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {str(dst)!r} is a file")
    if (dst / "checkpoints" / "last.ckpt").exists():
        raise FileExistsError(f"destination {str(dst)!r} holds another model (checkpoints/last.ckpt); choose a new folder")
    loaded = load_model_dir(src, ema=ema, trust=trust)
    state = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
    config = {
        "model": {"target": DENOISER_TARGET, "params": loaded.model.architecture()},
        "data": {"params": {"preprocess": preprocess if preprocess is not None else loaded.preprocess,
                            "channel": loaded.channel}},
        "source": {"path": str(src.resolve()), "kind": kind, "checkpoint_sha256": loaded.sha256, "ema": bool(loaded.ema)},
    }
    with atomic_path(dst / CONVERTED_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "gem3d", "ema": str(bool(loaded.ema))})
    with atomic_path(dst / CONVERTED_CONFIG) as tmp:
        OmegaConf.save(OmegaConf.create(config), tmp)
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_gem3d_checkpoint.py",
        description="Convert a model folder (original GEM-3D, gem3d run or converted) into a converted gem3d model "
                    "folder: DST_DIR/weights.safetensors + DST_DIR/configs/model.yaml",
    )
    p.add_argument("src", type=Path, metavar="SRC_DIR",
                   help="original GEM-3D folder (checkpoints/last.ckpt + configs/*-project.yaml), gem3d run or converted dir")
    p.add_argument("dst", type=Path, metavar="DST_DIR", help="folder to write weights.safetensors + configs/model.yaml to")
    p.add_argument("--ema", action="store_true",
                   help="store the EMA weights (model_ema.*) instead of the raw UNet weights; error if there are none")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle objects outside gem3d's allowlist (weights_only=False); only for files you trust")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted model in DST_DIR")
    p.add_argument("--preprocess-from", type=Path, metavar="YAML",
                   help="store this preprocessing with the model: 'preprocess' of an inference config "
                        "(gem3d/configs/inference/brain.yaml) or 'data.params.preprocess' of a training config")
    p.add_argument(ALLOW_ANY_TARGET_FLAG, action="store_true",
                   help="let the source's configs name any 'target:' (default: gem3d., torch., diffusers., lightning., "
                        "the original's ldm. classes)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/convert_gem3d_checkpoint.py``: exit 0, or 2 with one ``error:`` line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        with allow_any_target(args.allow_any_target):
            preprocess = read_preprocess(args.preprocess_from) if args.preprocess_from is not None else None
            dst = convert_model_dir(args.src, args.dst, ema=True if args.ema else None, trust=args.trust_checkpoint,
                                    preprocess=preprocess, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, NotImplementedError, ImportError,
            pickle.UnpicklingError) as err:
        hint = " (run without --ema for the raw weights)" if args.ema and "EMA" in error_line(err) else ""
        print(f"error: {error_line(err)}{hint}", file=sys.stderr)
        return 2
    source = OmegaConf.load(dst / CONVERTED_CONFIG).source
    print(f"converted {source.kind} model {args.src} ({'EMA' if source.ema else 'raw'} weights) -> {dst}")
    return 0
