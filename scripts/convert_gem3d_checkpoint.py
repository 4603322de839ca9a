#!/usr/bin/env python
"""Convert a model folder (original GEM-3D, gem3d run or converted) into a native gem3d model dir:
``DST_DIR/weights.safetensors`` + ``DST_DIR/configs/model.yaml``, which loads without the original-format code.

    python scripts/convert_gem3d_checkpoint.py infer_model/brain infer_model/brain_gem3d [--ema]
        [--trust-checkpoint] [--overwrite] [--preprocess-from configs/inference/brain.yaml]

Exit status 0 on success, 2 with an ``error:`` line on stderr for a bad source, destination or checkpoint.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_gem3d_checkpoint.py", description=__doc__.split("\n\n")[0])
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
                        "(configs/inference/brain.yaml) or 'data.params.preprocess' of a training config")
    return p


def _message(err: BaseException) -> str:
    # KeyError's str() quotes its message
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gem3d.convert.native import convert_model_dir, read_preprocess, source_kind

    try:
        kind = source_kind(args.src)
        preprocess = read_preprocess(args.preprocess_from) if args.preprocess_from is not None else None
        dst = convert_model_dir(args.src, args.dst, ema=True if args.ema else None, trust=args.trust_checkpoint,
                                preprocess=preprocess, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, NotImplementedError,
            pickle.UnpicklingError) as err:
        hint = " (run without --ema for the raw weights)" if args.ema and "EMA" in _message(err) else ""
        print(f"error: {_message(err)}{hint}", file=sys.stderr)
        return 2
    from omegaconf import OmegaConf

    from gem3d.inference.model_dir import CONVERTED_CONFIG

    weights = "EMA" if OmegaConf.select(OmegaConf.load(dst / CONVERTED_CONFIG), "source.ema") else "raw"
    print(f"converted {kind} model {args.src} ({weights} weights) -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
