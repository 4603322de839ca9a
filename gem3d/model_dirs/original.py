"""Reading original GEM-3D model folders (a latent-diffusion fork) without unpickling arbitrary code.

A folder is ``checkpoints/last.ckpt`` (Lightning) + ``configs/<name>-project.yaml`` (target/params). State dict:
``model.diffusion_model.*`` holds the UNet with gem3d's names (loads strictly after stripping the prefix);
``model_ema.*`` the EMA shadow, named without dots (see :func:`ema_key`); ``first_stage_model.*`` the KL
autoencoder in latent-diffusion layout; then schedule buffers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from gem3d.checkpoint import load_weights, safe_load_checkpoint, with_prefix
from gem3d.config import check_config_targets
from gem3d.denoiser import Denoiser
from gem3d.models.unet import is_volumetric_parameter_name

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
PSEUDO3D_TARGET_MARK = "openaimodel_pseudo3D"


def find_original_config(path: str | Path) -> Path:
    """``<path>/configs/*-project.yaml`` (the latest by name if several). Raises FileNotFoundError."""
    path = Path(path)
    candidates = sorted((path / "configs").glob("*-project.yaml"))
    if not candidates:
        raise FileNotFoundError(
            f"{path}: no original model config; expected configs/<name>-project.yaml "
            f"(found: {sorted(p.name for p in (path / 'configs').glob('*')) if (path / 'configs').is_dir() else 'no configs/ folder'})"
        )
    return candidates[-1]


def is_original_model_dir(path: str | Path) -> bool:
    """True if ``path`` holds ``checkpoints/last.ckpt`` and a ``configs/*-project.yaml`` with a ``unet_config``
    whose ``model.target`` is not one of gem3d's own classes (gem3d training runs have a ``unet_config`` too)."""
    path = Path(path)
    if not (path / "checkpoints" / "last.ckpt").is_file():
        return False
    try:
        config = OmegaConf.load(find_original_config(path))
        target = OmegaConf.select(config, "model.target", default="")
        unet_config = OmegaConf.select(config, "model.params.unet_config")
    except Exception:
        return False
    return not str(target).startswith("gem3d.") and isinstance(unet_config, DictConfig)


# UNet kwargs of the original openaimodel that gem3d takes over, with the original's defaults.
_UNET_TAKEN = {
    "in_channels": None, "out_channels": None, "model_channels": None, "channel_mult": (1, 2, 4, 8),
    "num_res_blocks": None, "attention_resolutions": None, "num_head_channels": -1, "num_heads": -1,
    "use_spatial_transformer": False, "transformer_depth": 1, "context_dim": None, "use_checkpoint": False,
    "dropout": 0.0,
}
# Original kwargs that do not change the network (or only its dtype).
_UNET_IGNORED = {"image_size", "legacy", "use_fp16"}
# Original kwargs that gem3d supports only at these values.
_UNET_FIXED = {
    "dims": 2, "conv_resample": True, "use_scale_shift_norm": False, "resblock_updown": False,
    "use_new_attention_order": False, "num_classes": None, "n_embed": None,
}


def original_unet_params(unet_config: Mapping[str, Any], unet_state_keys: list[str], source: str) -> dict[str, Any]:
    """Map the original ``unet_config`` to :class:`UNetModel` kwargs: ``volumetric`` for a pseudo-3D target or
    ``*_tem`` weights; attention rates the network never reaches are dropped (the original ignores them too)."""
    target = str(unet_config.get("target", ""))
    params = dict(unet_config.get("params") or {})
    unknown = sorted(set(params) - set(_UNET_TAKEN) - _UNET_IGNORED - set(_UNET_FIXED) - {"num_heads_upsample"})
    if unknown:
        raise ValueError(f"{source}: unet_config.params has keys gem3d does not know: {unknown}")
    for key, allowed in _UNET_FIXED.items():
        if key in params and params[key] != allowed:
            raise NotImplementedError(
                f"{source}: unet_config.params.{key}={params[key]!r} is not supported (gem3d supports {allowed!r})"
            )
    out = {key: params.get(key, default) for key, default in _UNET_TAKEN.items()}
    missing = [key for key, value in out.items() if value is None and key != "context_dim"]
    if missing:
        raise KeyError(f"{source}: unet_config.params.{missing[0]} is required")
    heads_up = params.get("num_heads_upsample", -1)
    if heads_up not in (-1, out["num_heads"]):
        raise NotImplementedError(f"{source}: num_heads_upsample={heads_up!r} differs from num_heads={out['num_heads']!r}")
    out["channel_mult"] = [int(m) for m in out["channel_mult"]]
    reachable = {2**level for level in range(len(out["channel_mult"]))}
    out["attention_resolutions"] = [int(r) for r in out["attention_resolutions"] if int(r) in reachable]
    if not out["use_spatial_transformer"]:
        out["context_dim"] = None
    out["dropout"] = float(out["dropout"])
    out["volumetric"] = PSEUDO3D_TARGET_MARK in target or any(is_volumetric_parameter_name(k) for k in unet_state_keys)
    return out


def ema_key(unet_key: str) -> str:
    """Raw UNet name (``input_blocks.0.0.weight``) -> the original's EMA name (``model_ema.diffusion_modelinput_blocks00weight``)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


KL_F8_DEFAULT = "models/first_stage_models/kl-f8/model.ckpt"  # latent-diffusion's place for it
CONDITIONING_KEYS = ("concat", "crossattn")  # the original's conditioning keys that gem3d maps onto a variant
# the gem3d variant of a concat-conditioned original model, by (volumetric UNet, informed slice in the condition)
CONCAT_VARIANTS = {
    (False, True): "slice_stage", (True, True): "volume_stage",
    (False, False): "baseline_slice", (True, False): "baseline_volume",
}


@dataclass
class OriginalModel:
    """Everything gem3d needs from an original GEM-3D model folder (see :func:`read_original_model_dir`)."""

    config_path: Path
    checkpoint_path: Path
    denoiser_kwargs: dict  # Denoiser kwargs: architecture and schedule (the weights are loaded separately)
    unet_state_dict: dict  # raw (or EMA, if requested) UNet weights, gem3d names
    has_ema: bool
    first_stage_state_dict: dict  # LDM layout, prefix stripped (empty if the checkpoint holds none)
    first_stage_ckpt_path: str | None  # first_stage_config.params.ckpt_path, if the config names one
    alphas_cumprod: torch.Tensor | None = None  # schedule buffer from the checkpoint, if present

    @property
    def unet_params(self) -> dict:
        """The :class:`UNetModel` kwargs."""
        return self.denoiser_kwargs["unet_config"]["params"]


def original_variant(params: Mapping[str, Any], unet_params: Mapping[str, Any], source: Path) -> str:
    """The gem3d variant of an original model (``params``: its ``model.params``) from its conditioning and UNet."""
    conditioning_key = params.get("conditioning_key")
    if conditioning_key == "crossattn":
        return "position"
    if conditioning_key != "concat":  # 'hybrid' (concat + cross-attention) too: no variant keeps its cross-attention
        raise NotImplementedError(
            f"{source}: conditioning_key={conditioning_key!r} is not supported; allowed: "
            f"{list(CONDITIONING_KEYS)} (gem3d has no variant for latent-diffusion's 'hybrid', whose "
            "cross-attention a concat model would drop)"
        )
    latent_channels = int(params.get("channels", 4))
    in_channels = int(unet_params["in_channels"])
    concat_channels = in_channels - latent_channels
    if concat_channels not in (latent_channels, 2 * latent_channels):
        raise ValueError(
            f"{source}: in_channels={in_channels} with {latent_channels}-channel latents gives a "
            f"{concat_channels}-channel concat condition; expected {latent_channels} (mask) or "
            f"{2 * latent_channels} (mask + informed slice)"
        )
    return CONCAT_VARIANTS[bool(unet_params["volumetric"]), concat_channels == 2 * latent_channels]


def read_original_model_dir(path: str | Path, ema: bool = False, trust: bool = False) -> OriginalModel:
    """Read an original GEM-3D model folder; ``ema``: the UNet weights from the EMA shadow (error if there is
    none); ``trust``: see :func:`safe_load_checkpoint`."""
    path = Path(path)
    config_path = find_original_config(path)
    ckpt_path = path / "checkpoints" / "last.ckpt"
    config = OmegaConf.load(config_path)
    for key in ("model.params", "model.params.unet_config", "model.params.first_stage_config"):
        if not isinstance(OmegaConf.select(config, key), DictConfig):
            raise KeyError(f"{config_path}: {key} is missing")
    check_config_targets(config.model, where=str(config_path))  # the original's ldm. classes, nothing foreign
    params = OmegaConf.to_container(config.model.params, resolve=True)
    schedule, parameterization = params.get("beta_schedule", "linear"), params.get("parameterization", "eps")
    if schedule != "linear" or parameterization != "eps":
        raise NotImplementedError(
            f"{path}: beta_schedule={schedule!r}, parameterization={parameterization!r}; gem3d supports "
            f"the original's 'linear' (linear-in-sqrt) schedule with eps-prediction"
        )

    loaded = safe_load_checkpoint(ckpt_path, trust=trust)
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{ckpt_path}: expected a dict with a 'state_dict', got {type(loaded).__name__}")
    raw_unet = with_prefix(state_dict, UNET_PREFIX)
    if not raw_unet:
        raise KeyError(f"{ckpt_path}: no '{UNET_PREFIX}*' weights in the state dict (keys like {list(state_dict)[:4]})")

    unet_params = original_unet_params(params["unet_config"], list(raw_unet), source=str(config_path))
    has_ema = any(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in state_dict)
    unet_state_dict = raw_unet
    if ema:
        if not has_ema:
            raise KeyError(
                f"{ckpt_path}: ema=True but the checkpoint holds no EMA weights ('{EMA_PREFIX}*'; use_ema="
                f"{params.get('use_ema')!r} in {config_path.name}); use ema=False for the raw weights"
            )
        unet_state_dict = {key: state_dict.get(ema_key(key), value) for key, value in raw_unet.items()}
        fallback = [key for key in raw_unet if ema_key(key) not in state_dict]
        if fallback:
            warnings.warn(f"{ckpt_path}: {len(fallback)} UNet tensors have no EMA copy, raw weights used: {fallback[:6]}")

    first_cfg = params["first_stage_config"].get("params") or {}
    first_sd = with_prefix(state_dict, FIRST_STAGE_PREFIX)
    first_ckpt = first_cfg.get("ckpt_path")
    if not first_sd and not first_ckpt:
        warnings.warn(f"{ckpt_path}: no first-stage weights in the checkpoint and no first_stage_config ckpt_path")

    variant = original_variant(params, unet_params, config_path)
    position_dim = None
    if variant == "position":
        position_dim = OmegaConf.select(config, "model.params.cond_stage_config.params.dim",
                                        default=unet_params["context_dim"])
    # no condition_latent_factor (1): the original's concat condition is scale_factor * posterior, the scale
    # FirstStage.encode / encode_mask give (get_first_stage_encoding in its get_input and inference scripts)
    denoiser_kwargs = {
        "unet_config": {"target": "gem3d.models.unet.UNetModel", "params": unet_params},
        "first_stage_config": {
            "target": "gem3d.models.autoencoder.FirstStage.from_ldm_ddconfig",
            "params": {"ddconfig": dict(first_cfg.get("ddconfig") or {}),
                       "embed_dim": int(first_cfg.get("embed_dim", 4)),
                       "scale_factor": float(params.get("scale_factor", 1.0))},
        },
        "variant": variant,
        "position_embed_dim": position_dim,
        "num_train_timesteps": int(params.get("timesteps", 1000)),
        "beta_start": float(params.get("linear_start", 1e-4)),
        "beta_end": float(params.get("linear_end", 2e-2)),
    }
    alphas_cumprod = state_dict.get("alphas_cumprod")
    return OriginalModel(
        config_path=config_path,
        checkpoint_path=ckpt_path,
        denoiser_kwargs=denoiser_kwargs,
        unet_state_dict=unet_state_dict,
        has_ema=has_ema,
        first_stage_state_dict=first_sd,
        first_stage_ckpt_path=None if first_ckpt is None else str(first_ckpt),
        alphas_cumprod=None if alphas_cumprod is None else alphas_cumprod.detach().clone(),
    )


def resolve_first_stage_ckpt(ckpt_path: str | Path, model_dir: Path, config_path: Path | None = None) -> Path:
    """The file a ``first_stage_config.params.ckpt_path`` names. A relative path (latent-diffusion configs use
    ``models/first_stage_models/kl-f8/model.ckpt``, relative to its repository) is tried against the current
    directory and the model folder, in that order."""
    ckpt_path = Path(ckpt_path).expanduser()
    candidates = [ckpt_path] if ckpt_path.is_absolute() else [Path.cwd() / ckpt_path, model_dir / ckpt_path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f" (set in {config_path})" if config_path is not None else ""
    raise FileNotFoundError(
        f"first_stage_config.params.ckpt_path={str(ckpt_path)!r}{where} not found; tried "
        f"{[str(c) for c in candidates]}. Put latent-diffusion's kl-f8 model.ckpt there, or edit ckpt_path to "
        f"its absolute path"
    )


def load_original_denoiser(path: str | os.PathLike, ema: bool | None = None, trust: bool = False) -> tuple[Denoiser, Path]:
    """An original GEM-3D folder as a gem3d :class:`Denoiser` in eval mode, and its checkpoint file; ``ema`` True:
    the EMA shadow, else the raw UNet weights (which the fixtures' reference outputs use)."""
    orig = read_original_model_dir(path, ema=bool(ema), trust=trust)
    model = Denoiser(**orig.denoiser_kwargs)
    load_weights(model.unet, orig.unet_state_dict, f"{orig.checkpoint_path} (model.diffusion_model.*)")
    if orig.first_stage_state_dict:
        model.first_stage.load_ldm_state_dict(orig.first_stage_state_dict)
    elif orig.first_stage_ckpt_path:
        ckpt = resolve_first_stage_ckpt(orig.first_stage_ckpt_path, Path(path), orig.config_path)
        model.first_stage.load_checkpoint(ckpt, trust=trust)
    else:
        raise FileNotFoundError(
            f"{path}: the checkpoint holds no first-stage weights and {orig.config_path.name} names no "
            f"first_stage_config.params.ckpt_path; download latent-diffusion's kl-f8 model.ckpt to "
            f"{Path(path) / KL_F8_DEFAULT} and set ckpt_path: {KL_F8_DEFAULT} in that config"
        )
    if orig.alphas_cumprod is not None:
        stored = orig.alphas_cumprod.to(torch.float32)
        if stored.shape != model.alphas_cumprod.shape or not torch.allclose(stored, model.alphas_cumprod, atol=1e-6):
            raise ValueError(f"{path}: the checkpoint's alphas_cumprod differs from the schedule its config describes")
    return model.eval(), orig.checkpoint_path
