"""Original GEM-3D model folders -> gem3d models, and gem3d's converted model-dir format.

A *converted* model dir (written by :func:`convert_model_dir`, ``scripts/convert_gem3d_checkpoint.py``) holds

```
<dst>/weights.safetensors     # the Gem3dLDM state dict: unet.* (raw or EMA, as chosen) + first_stage.*
<dst>/configs/model.yaml      # model: {target: gem3d.diffusion.Gem3dLDM, params}, data.params.preprocess, source
```

and loads without the original-format code path or any other file (the first stage is described by its
architecture only, as ``FirstStage.from_diffusers_config`` kwargs; its weights are in the safetensors file).

An original folder is mapped on load (:func:`load_original_model`): UNet kwargs from ``unet_config``, the variant
from ``conditioning_key`` / in_channels / the pseudo-3D target, the first stage from ``first_stage_config``
(``FirstStage.from_ldm_ddconfig``) with the checkpoint's ``first_stage_model.*`` weights or, if it has none,
latent-diffusion's ``kl-f8/model.ckpt`` at ``first_stage_config.params.ckpt_path``, and
``condition_latent_factor = 1 / scale_factor`` (the original conditions on the unscaled posterior mode).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

UNET_TARGET = "gem3d.models.unet.UNetModel"
LDM_FIRST_STAGE_TARGET = "gem3d.models.autoencoder.FirstStage.from_ldm_ddconfig"
MODEL_TARGET = "gem3d.diffusion.Gem3dLDM"


def variant_of(*, conditioning: str | None, volumetric: bool, uses_informed: bool) -> str:
    """The gem3d variant that matches an original model's conditioning and UNet type."""
    if conditioning == "crossattn":
        return "position"
    if conditioning not in ("concat", "hybrid"):
        raise NotImplementedError(f"conditioning_key={conditioning!r} is not supported; gem3d maps 'concat' and 'crossattn'")
    if volumetric:
        return "volume_stage" if uses_informed else "baseline_volume"
    return "slice_stage" if uses_informed else "baseline_slice"


def gem3d_kwargs_from_original(orig) -> dict[str, Any]:
    """``Gem3dLDM`` constructor kwargs for an :class:`gem3d.convert.original.OriginalModel` (architecture only:
    no checkpoint paths; the weights are loaded separately)."""
    variant = variant_of(
        conditioning=orig.conditioning_key, volumetric=orig.volumetric, uses_informed=orig.uses_informed_slice
    )
    return {
        "unet_config": {"target": UNET_TARGET, "params": dict(orig.unet_params)},
        "first_stage_config": {
            "target": LDM_FIRST_STAGE_TARGET,
            "params": {"ddconfig": dict(orig.first_stage_ddconfig), "embed_dim": int(orig.first_stage_embed_dim),
                       "scale_factor": float(orig.scale_factor)},
        },
        # the original conditions on the *unscaled* posterior mode (its cond stage is the bare first stage)
        "condition_latent_factor": 1.0 / float(orig.scale_factor),
        "variant": variant,
        "use_ema": False,
        "sample_with_ema": False,
        "position_embed_dim": orig.position_embed_dim if variant == "position" else None,
        "num_train_timesteps": int(orig.timesteps),
        "beta_start": float(orig.linear_start),
        "beta_end": float(orig.linear_end),
    }


REPO_ROOT = Path(__file__).resolve().parents[2]
KL_F8_DEFAULT = "models/first_stage_models/kl-f8/model.ckpt"  # latent-diffusion's place for it


def resolve_first_stage_ckpt(ckpt_path: str | Path, model_dir: Path, config_path: Path | None = None) -> Path:
    """The file a ``first_stage_config.params.ckpt_path`` names. A relative path (latent-diffusion configs use
    ``models/first_stage_models/kl-f8/model.ckpt``, relative to its repository) is tried against the current
    directory, the model folder and the gem3d checkout, in that order."""
    ckpt_path = Path(ckpt_path).expanduser()
    candidates = [ckpt_path] if ckpt_path.is_absolute() else [Path.cwd() / ckpt_path, model_dir / ckpt_path,
                                                              REPO_ROOT / ckpt_path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f" (set in {config_path})" if config_path is not None else ""
    raise FileNotFoundError(
        f"first_stage_config.params.ckpt_path={str(ckpt_path)!r}{where} not found; tried "
        f"{[str(c) for c in candidates]}. Put latent-diffusion's kl-f8 model.ckpt there, or edit ckpt_path to "
        f"its absolute path"
    )


def _build(kwargs: dict):
    from gem3d.diffusion import Gem3dLDM, quiet_missing_stage1_warning

    with quiet_missing_stage1_warning():
        return Gem3dLDM(**kwargs)


def load_original_model(path: str | Path, ema: bool | None = None, trust: bool = False):
    """An original GEM-3D folder as a gem3d model: ``(model, preprocess=None, used_ema, checkpoint path)``.

    ``ema`` None or False: the raw UNet weights (the fixtures' reference outputs use them); True: the EMA shadow.
    """
    from gem3d.convert.original import read_original_model_dir

    orig = read_original_model_dir(path, ema=bool(ema), trust=trust)
    if orig.beta_schedule != "linear" or orig.parameterization != "eps":
        raise NotImplementedError(
            f"{path}: beta_schedule={orig.beta_schedule!r}, parameterization={orig.parameterization!r}; gem3d supports "
            f"the original's 'linear' (linear-in-sqrt) schedule with eps-prediction"
        )
    model = _build(gem3d_kwargs_from_original(orig))
    model.unet.load_state_dict(orig.unet_state_dict, strict=True)
    if orig.first_stage_state_dict:
        model.first_stage.load_ldm_state_dict(orig.first_stage_state_dict)
    elif orig.first_stage_ckpt_path:
        ckpt = resolve_first_stage_ckpt(orig.first_stage_ckpt_path, Path(path), orig.config_path)
        model.first_stage.load_checkpoint(ckpt, trust=trust)
    else:
        raise FileNotFoundError(
            f"{path}: the checkpoint holds no first-stage weights and {orig.config_path.name} names no "
            f"first_stage_config.params.ckpt_path; download latent-diffusion's kl-f8 model.ckpt to "
            f"{REPO_ROOT / KL_F8_DEFAULT} and set ckpt_path: {KL_F8_DEFAULT} in that config"
        )
    if orig.alphas_cumprod is not None:
        stored = orig.alphas_cumprod.to(torch.float32)
        if stored.shape != model.alphas_cumprod.shape or not torch.allclose(stored, model.alphas_cumprod, atol=1e-6):
            raise ValueError(f"{path}: the checkpoint's alphas_cumprod differs from the schedule its config describes")
    model.loaded_with_ema = bool(ema)
    return model.eval(), None, bool(ema), orig.checkpoint_path


# ---------------------------------------------------------------------------------------------- converted dirs
def model_kwargs(model) -> dict[str, Any]:
    """The constructor kwargs of a loaded ``Gem3dLDM``, with an architecture-only first stage and no
    checkpoint paths, so the model can be rebuilt from a converted dir alone."""
    kwargs = {k: v for k, v in dict(model.hparams).items()}
    kwargs = OmegaConf.to_container(OmegaConf.create(kwargs), resolve=True)
    from gem3d.diffusion import first_stage_architecture

    kwargs["first_stage_config"] = first_stage_architecture(model.first_stage)
    kwargs["ckpt_path"] = None
    kwargs["use_ema"] = False
    kwargs["sample_with_ema"] = False
    return kwargs


def source_kind(src: str | Path) -> str:
    """``"converted"``, ``"original"`` or ``"run"`` for a model folder; FileNotFoundError / ValueError naming what
    is missing otherwise (before anything is loaded)."""
    from gem3d.inference.model_dir import CONVERTED_CONFIG, CONVERTED_WEIGHTS, is_converted_model_dir

    src = Path(src)
    expected = (
        "expected an original GEM-3D model folder or a gem3d run (checkpoints/last.ckpt + configs/*-project.yaml) "
        f"or a converted folder ({CONVERTED_WEIGHTS} + {CONVERTED_CONFIG})"
    )
    if not src.exists():
        raise FileNotFoundError(f"source model folder {str(src)!r} does not exist; {expected}")
    if not src.is_dir():
        raise ValueError(f"source {str(src)!r} is a file, not a model folder; {expected}")
    if is_converted_model_dir(src):
        return "converted"
    has_ckpt = (src / "checkpoints" / "last.ckpt").is_file()
    configs = sorted((src / "configs").glob("*-project.yaml"))
    if not has_ckpt or not configs:
        missing = [name for name, ok in (("checkpoints/last.ckpt", has_ckpt), ("configs/*-project.yaml", bool(configs)))
                   if not ok]
        raise FileNotFoundError(f"{str(src)!r} is not a model folder: missing {missing}; {expected}")
    target = str(OmegaConf.select(OmegaConf.load(configs[-1]), "model.target") or "")
    return "run" if target.startswith("gem3d.") else "original"


def read_preprocess(path: str | Path) -> dict:
    """The preprocessing of a YAML file: ``preprocess`` (``configs/inference/*.yaml``) or
    ``data.params.preprocess`` (training configs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preprocess config {str(path)!r} not found")
    config = OmegaConf.load(path)
    for key in ("preprocess", "data.params.preprocess"):
        node = OmegaConf.select(config, key)
        if node is not None:
            value = OmegaConf.to_container(node, resolve=True)
            if not isinstance(value, dict):
                raise ValueError(f"{path}: {key} must be a mapping, got {value!r}")
            return value
    raise KeyError(f"{path}: no 'preprocess' or 'data.params.preprocess' key")


def convert_model_dir(src: str | Path, dst: str | Path, ema: bool | None = None, trust: bool = False,
                      preprocess: dict | None = None, overwrite: bool = False) -> Path:
    """Write a native gem3d model dir from any model dir (original GEM-3D folder, gem3d run, converted dir).

    ``ema``: True = the EMA weights (error if there are none), False/None = the raw ones for original folders
    (None: the run's own choice for gem3d runs). ``preprocess`` is stored as ``data.params.preprocess``.
    """
    from safetensors.torch import save_file

    from gem3d.export.nifti import atomic_path
    from gem3d.inference.model_dir import CONVERTED_CONFIG, CONVERTED_WEIGHTS, load_model_dir

    src, dst = Path(src), Path(dst)
    source_kind(src)
    if dst.resolve() == src.resolve():
        raise ValueError(f"destination {str(dst)!r} is the source folder; choose a new folder")
    if (dst / CONVERTED_WEIGHTS).exists() and not overwrite:
        raise FileExistsError(f"{dst} already holds a converted model; pass overwrite=True (--overwrite) to replace it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {str(dst)!r} is a file")
    if (dst / "checkpoints" / "last.ckpt").exists():
        raise FileExistsError(f"destination {str(dst)!r} holds another model (checkpoints/last.ckpt); choose a new folder")
    loaded = load_model_dir(src, ema=ema, trust=trust)
    model = loaded.model
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("ema.")}
    config = {
        "model": {"target": MODEL_TARGET, "params": model_kwargs(model)},
        "data": {"params": {"preprocess": preprocess if preprocess is not None else loaded.preprocess}},
        "source": {"path": str(Path(src).resolve()), "kind": loaded.kind, "checkpoint_sha256": loaded.sha256,
                   "ema": bool(loaded.ema)},
    }
    (dst / "configs").mkdir(parents=True, exist_ok=True)
    with atomic_path(dst / CONVERTED_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "gem3d", "ema": str(bool(loaded.ema))})
    with atomic_path(dst / CONVERTED_CONFIG) as tmp:
        OmegaConf.save(OmegaConf.create(config), tmp)
    for name in (CONVERTED_WEIGHTS, CONVERTED_CONFIG):
        os.chmod(dst / name, 0o644)  # the atomic temporary file is private
    return dst


def load_converted_model(path: str | Path, ema: bool | None = None):
    """A converted model dir: ``(model, preprocess, used_ema)``. Its weights are whichever set (raw or EMA) was
    chosen at conversion; asking for the other one is an error."""
    from safetensors.torch import load_file

    from gem3d.inference.model_dir import CONVERTED_CONFIG, CONVERTED_WEIGHTS

    path = Path(path)
    config = OmegaConf.to_container(OmegaConf.load(path / CONVERTED_CONFIG), resolve=True)
    converted_ema = bool((config.get("source") or {}).get("ema", False))
    if ema is not None and bool(ema) != converted_ema:
        raise ValueError(
            f"{path} was converted with {'EMA' if converted_ema else 'raw'} weights; ema={ema} asks for the other set. "
            f"Convert again with{'out' if converted_ema else ''} --ema"
        )
    model_cfg = config["model"]
    if model_cfg.get("target") != MODEL_TARGET:
        raise ValueError(f"{path / CONVERTED_CONFIG}: model.target={model_cfg.get('target')!r}, expected {MODEL_TARGET!r}")
    model = _build(dict(model_cfg["params"]))
    model.load_state_dict(load_file(str(path / CONVERTED_WEIGHTS)), strict=True)
    preprocess = ((config.get("data") or {}).get("params") or {}).get("preprocess")
    model.loaded_with_ema = converted_ema
    return model.eval(), preprocess, converted_ema
