"""Loading a model dir for inference, whatever wrote it.

Three layouts are recognised (in this order):

1. a folder converted by ``scripts/convert_gem3d_checkpoint.py``: ``weights.safetensors`` + ``configs/model.yaml``;
2. a folder of the original GEM-3D code (config targets ``ldm.models...``): mapped on load
   (:mod:`gem3d.convert.original`);
3. a gem3d training run (``checkpoints/last.ckpt`` + ``configs/*-project.yaml``), or a ``.ckpt`` file.

Every path returns a :class:`LoadedModel`: the :class:`gem3d.diffusion.Gem3dLDM` in eval mode, the data
preprocessing it was trained with (``data.params.preprocess`` of its config, if known), the weight file and its
SHA-256 (recorded in every manifest record).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

CONVERTED_WEIGHTS = "weights.safetensors"
CONVERTED_CONFIG = "configs/model.yaml"


@dataclass
class LoadedModel:
    model: "torch.nn.Module"
    preprocess: dict | None
    checkpoint: Path
    sha256: str
    kind: str  # "converted" | "original" | "run"
    ema: bool


def _project_preprocess(folder: Path) -> dict | None:
    """``data.params.preprocess`` of the newest ``configs/*-project.yaml`` (or ``configs/*.yaml``) in ``folder``."""
    configs = sorted((folder / "configs").glob("*-project.yaml")) or sorted((folder / "configs").glob("*.yaml"))
    for path in reversed(configs):
        cfg = OmegaConf.load(path)
        pre = OmegaConf.select(cfg, "data.params.preprocess")
        if pre is not None:
            return OmegaConf.to_container(pre, resolve=True)
    return None


def is_converted_model_dir(path: Path) -> bool:
    return (path / CONVERTED_WEIGHTS).is_file() and (path / CONVERTED_CONFIG).is_file()


def load_model_dir(
    path: str | Path, ema: bool | None = None, trust: bool = False, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load any model dir (see the module docstring); ``ema`` None = the model's default weights."""
    from gem3d.export.manifest import file_sha256

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model dir {str(path)!r} does not exist; train one with main.py (see README) or point --model at a "
            f"folder holding checkpoints/last.ckpt and configs/*-project.yaml"
        )
    if path.is_dir() and is_converted_model_dir(path):
        from gem3d.convert.native import load_converted_model

        model, preprocess, used_ema = load_converted_model(path, ema=ema)
        checkpoint, kind = path / CONVERTED_WEIGHTS, "converted"
    elif path.is_dir() and _is_original(path):
        from gem3d.convert.native import load_original_model

        model, preprocess, used_ema, checkpoint = load_original_model(path, ema=ema, trust=trust)
        kind = "original"
    else:
        from gem3d.diffusion import load_ldm_from_run, resolve_checkpoint

        checkpoint = resolve_checkpoint(path, key="model dir")
        model = load_ldm_from_run(checkpoint, use_ema=ema, trust=trust)
        used_ema = bool(getattr(model, "loaded_with_ema", False))
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        preprocess, kind = _project_preprocess(run_dir), "run"
    model = model.to(device).eval()
    return LoadedModel(model, preprocess, Path(checkpoint), file_sha256(checkpoint), kind, used_ema)


def _is_original(path: Path) -> bool:
    from gem3d.convert.original import is_original_model_dir

    return is_original_model_dir(path)
