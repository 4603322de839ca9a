"""Model folders: their three layouts, detected in one place (:func:`detect_layout`, in this order), and loaded as
a :class:`LoadedModel` holding a plain :class:`gem3d.denoiser.Denoiser` in eval mode:

1. ``converted``: ``weights.safetensors`` + ``configs/model.yaml`` (written by :func:`gem3d.convert.convert_model_dir`);
2. ``original``: an original GEM-3D folder (config targets ``ldm.models...``), mapped by :mod:`.original`;
3. ``run``: a gem3d training run (``checkpoints/last.ckpt`` + ``configs/*-project.yaml``), a ``.ckpt`` file or a
   glob matching runs (the newest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from gem3d.checkpoint import load_checkpoint, load_weights, resolve_checkpoint, state_dict_of, unet_state_dict, with_prefix
from gem3d.config import load_config_file
from gem3d.denoiser import Denoiser
from gem3d.files import file_sha256
from gem3d.model_dirs.original import is_original_model_dir, load_original_denoiser

CONVERTED_WEIGHTS = "weights.safetensors"
CONVERTED_CONFIG = "configs/model.yaml"
DENOISER_TARGET = "gem3d.denoiser.Denoiser"
LEGACY_TARGETS = ("gem3d.diffusion.Gem3dLDM", "gem3d.training.ldm.Gem3dLDM")  # converted dirs of earlier versions
LAYOUTS = ("converted", "original", "run")
EXPECTED = (
    f"expected a converted folder ({CONVERTED_WEIGHTS} + {CONVERTED_CONFIG}), an original GEM-3D model folder or a "
    f"gem3d run (checkpoints/last.ckpt + configs/*-project.yaml, or a .ckpt file)"
)


@dataclass
class LoadedModel:
    """A model folder, loaded: ``model`` (eval mode), the data preprocessing it was trained with (or None), the
    weight file, its SHA-256, its layout (one of :data:`LAYOUTS`), whether the UNet holds the EMA weights and the
    image channel of its training data (or None)."""

    model: Denoiser
    preprocess: dict | None
    checkpoint: Path
    sha256: str
    kind: str
    ema: bool
    channel: int | str | None = None  # the image channel it was trained on (data.params.channel), if recorded


def detect_layout(path: str | os.PathLike) -> str:
    """One of :data:`LAYOUTS` for ``path``; FileNotFoundError naming what is missing otherwise (nothing is loaded)."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        return "run"  # a glob over runs, resolved when loading
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model dir {text!r} does not exist; {EXPECTED}")
    if path.is_file():
        return "run"
    if (path / CONVERTED_WEIGHTS).is_file() and (path / CONVERTED_CONFIG).is_file():
        return "converted"
    if is_original_model_dir(path):
        return "original"
    if not (path / "checkpoints" / "last.ckpt").is_file():
        missing = ["checkpoints/last.ckpt"] + ([] if list(path.glob("configs/*-project.yaml")) else ["configs/*-project.yaml"])
        raise FileNotFoundError(f"{text!r} is not a model folder: missing {missing}; {EXPECTED}")
    return "run"


def read_preprocess(path: str | os.PathLike) -> dict:
    """The preprocessing of a YAML file: ``preprocess`` or ``fallback_preprocess`` (``gem3d/configs/inference/*.yaml``)
    or ``data.params.preprocess`` (training configs and model folders)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preprocess config {str(path)!r} not found")
    config = load_config_file(path)  # a training config's include: (its dataset block) too
    for key in ("preprocess", "fallback_preprocess", "data.params.preprocess"):
        node = OmegaConf.select(config, key)
        if node is not None:
            value = OmegaConf.to_container(node, resolve=True)
            if not isinstance(value, dict):
                raise ValueError(f"{path}: {key} must be a mapping, got {value!r}")
            return value
    raise KeyError(f"{path}: no 'preprocess', 'fallback_preprocess' or 'data.params.preprocess' key")


def run_preprocess(folder: Path) -> dict | None:
    """``data.params.preprocess`` of the newest ``configs/*-project.yaml`` (or ``configs/*.yaml``) in ``folder``."""
    configs = sorted((folder / "configs").glob("*-project.yaml")) or sorted((folder / "configs").glob("*.yaml"))
    for path in reversed(configs):
        try:
            return read_preprocess(path)
        except KeyError:
            continue
    return None


def run_channel(folder: Path) -> int | str | None:
    """``data.params.channel`` of the newest ``configs/*-project.yaml`` (or ``configs/*.yaml``) in ``folder``."""
    configs = sorted((folder / "configs").glob("*-project.yaml")) or sorted((folder / "configs").glob("*.yaml"))
    for path in reversed(configs):
        channel = OmegaConf.select(OmegaConf.load(path), "data.params.channel")
        if channel is not None:
            return channel
    return None


def _load_run(path: str | os.PathLike, ema: bool | None,
              trust: bool) -> tuple[Denoiser, Path, bool, dict | None, int | str | None]:
    """A gem3d training run: the denoiser is rebuilt from the checkpoint's hyper-parameters (its objective too:
    ``prediction_type`` and ``zero_terminal_snr``, eps on the original schedule where a run predates them), the first
    stage's architecture from its ``first_stage_architecture`` (so moved runs load without the autoencoder's files)."""
    checkpoint = resolve_checkpoint(path, key="model dir")
    ckpt = load_checkpoint(checkpoint, key="model dir", trust=trust)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "unet_config" not in hparams:
        raise KeyError(f"{str(path)!r} is not a gem3d diffusion run (its checkpoint has no hyper_parameters.unet_config)")
    if "first_stage_architecture" in ckpt:
        hparams["first_stage_config"] = ckpt["first_stage_architecture"]
    model = Denoiser.from_kwargs(hparams)
    state_dict = state_dict_of(ckpt)
    has_ema = any(k.startswith("ema.") for k in state_dict)
    use_ema = bool(hparams.get("sample_with_ema", True)) and has_ema if ema is None else bool(ema)
    if use_ema and not has_ema:
        raise ValueError(f"ema=True but the run {str(path)!r} was trained without EMA")
    load_weights(model.unet, unet_state_dict(ckpt, use_ema=use_ema), f"{checkpoint} (unet.*)")
    load_weights(model.first_stage, with_prefix(state_dict, "first_stage."), f"{checkpoint} (first_stage.*)")
    if "first_stage_scale_factor" in ckpt:
        model.first_stage.scale_factor = float(ckpt["first_stage_scale_factor"])
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return model, checkpoint, use_ema, run_preprocess(run_dir), run_channel(run_dir)


def _load_converted(path: Path, ema: bool | None) -> tuple[Denoiser, Path, bool, dict | None, int | str | None]:
    """A converted folder. Its weights are whichever set (raw or EMA) was chosen at conversion; asking for the
    other one is an error. Refused where gem3d before issue 16 wrote ``condition_latent_factor: 1 / scale_factor``
    for an original GEM-3D model (which conditions on ``scale_factor * posterior``, as gem3d does)."""
    config = OmegaConf.to_container(OmegaConf.load(path / CONVERTED_CONFIG), resolve=True)
    source = config.get("source") or {}
    converted_ema = bool(source.get("ema", False))
    if ema is not None and bool(ema) != converted_ema:
        raise ValueError(
            f"{path} was converted with {'EMA' if converted_ema else 'raw'} weights; ema={ema} asks for the other set. "
            f"Convert again with{'out' if converted_ema else ''} --ema"
        )
    model_cfg = config.get("model") or {}
    target = model_cfg.get("target")
    if target != DENOISER_TARGET and target not in LEGACY_TARGETS:
        raise ValueError(f"{path / CONVERTED_CONFIG}: model.target={target!r}, expected {DENOISER_TARGET!r}")
    params = model_cfg.get("params") or {}
    factor = float(params.get("condition_latent_factor", 1.0))
    if source.get("kind") == "original" and factor != 1.0:
        raise ValueError(
            f"{path / CONVERTED_CONFIG}: model.params.condition_latent_factor={factor!r}; allowed for a model "
            f"converted from an original GEM-3D folder: 1.0 (older gem3d wrote 1 / scale_factor, which makes the mask "
            f"and informed-slice latents {factor:.3g}x too large). Convert the original folder again "
            f"(scripts/convert_gem3d_checkpoint.py --overwrite) or set the value to 1.0"
        )
    objective = (params.get("prediction_type", "epsilon"), bool(params.get("zero_terminal_snr", False)))
    if source.get("kind") == "original" and objective != ("epsilon", False):
        raise ValueError(
            f"{path / CONVERTED_CONFIG}: model.params.prediction_type={objective[0]!r}, zero_terminal_snr="
            f"{objective[1]}; allowed for a model converted from an original GEM-3D folder: 'epsilon' and false "
            f"(the original trains eps-prediction on its own schedule)"
        )
    model = Denoiser.from_kwargs(params)  # prediction_type / zero_terminal_snr: the recorded objective (default eps)
    load_weights(model, load_file(str(path / CONVERTED_WEIGHTS)), str(path / CONVERTED_WEIGHTS))
    data_params = (config.get("data") or {}).get("params") or {}
    return model, path / CONVERTED_WEIGHTS, converted_ema, data_params.get("preprocess"), data_params.get("channel")


def load_model_dir(
    path: str | os.PathLike, ema: bool | None = None, trust: bool = False, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a model folder of any layout onto ``device``. ``ema``: None = the model's default weights (a run's
    ``sample_with_ema``, raw for original folders, the converted set), True / False = the EMA / raw weights (an
    error where that set does not exist). ``trust``: unpickle checkpoints fully (see :mod:`gem3d.checkpoint`)."""
    kind = detect_layout(path)
    if kind == "converted":
        model, checkpoint, used_ema, preprocess, channel = _load_converted(Path(path), ema)
    elif kind == "original":
        model, checkpoint = load_original_denoiser(path, ema=ema, trust=trust)
        used_ema, preprocess, channel = bool(ema), None, None
    else:
        model, checkpoint, used_ema, preprocess, channel = _load_run(path, ema, trust)
    model = model.to(device).eval()
    return LoadedModel(model, preprocess, Path(checkpoint), file_sha256(checkpoint), kind, used_ema, channel)
