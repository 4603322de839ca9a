"""Conversion helpers between latent-diffusion's ("LDM") KL autoencoder and ``diffusers.AutoencoderKL``: configs,
layout detection, and :func:`diffusers_to_ldm_state_dict`, the inverse of diffusers' ``convert_ldm_vae_checkpoint``.
LDM weights (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``) usually sit behind a prefix
(``first_stage_model.`` in a full LatentDiffusion checkpoint, none in an autoencoder-only one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm
from einops import rearrange
from omegaconf import DictConfig, OmegaConf

from gem3d.config import to_plain

LDM_AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LDM_PREFIXES = ("first_stage_model.", "vae.")
DEFAULT_SCALE_FACTOR = 0.18215

# every key latent-diffusion's Encoder/Decoder accept, with the values diffusers' AutoencoderKL can represent
DDCONFIG_REQUIRED = ("ch", "ch_mult", "num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch")
DDCONFIG_FIXED = {
    "double_z": True,
    "attn_resolutions": [],
    "dropout": 0.0,
    "resamp_with_conv": True,
    "give_pre_end": False,
    "tanh_out": False,
    "use_linear_attn": False,
    "attn_type": "vanilla",
}
DDCONFIG_KEYS = DDCONFIG_REQUIRED + tuple(DDCONFIG_FIXED)
NORM_NUM_GROUPS = 32  # latent-diffusion's Normalize() uses GroupNorm(32, C, eps=1e-6), as diffusers' VAE does


def read_config(config: str | Path | Mapping) -> DictConfig:
    """A YAML path, OmegaConf node or dict -> OmegaConf node (clear error for a missing file)."""
    if isinstance(config, (str, Path)):
        if not Path(config).is_file():
            raise FileNotFoundError(f"autoencoder config file not found: {str(config)!r}")
        return OmegaConf.load(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a path, a dict or an OmegaConf node, got {type(config).__name__}")
    return OmegaConf.create(config)


AUTOENCODER_PARAMS_AT = (
    "model.params.first_stage_config.params", "model.params", "first_stage_config.params", "params", ""
)


def find_autoencoder_params(config: str | Path | Mapping) -> dict:
    """The autoencoder ``params`` (holding ``ddconfig`` and ``embed_dim``) of a latent-diffusion config: a full
    model, an autoencoder-only config, a ``first_stage_config`` node or the params themselves."""
    cfg = read_config(config)
    for where in AUTOENCODER_PARAMS_AT:
        params = OmegaConf.select(cfg, where)
        if isinstance(params, DictConfig) and "ddconfig" in params:
            return to_plain(params)
    where = ", ".join(w or "<top level>" for w in AUTOENCODER_PARAMS_AT)
    raise KeyError(f"no autoencoder 'ddconfig' found in the config; looked under: {where} (top-level keys: {sorted(cfg)})")


def validate_ddconfig(ddconfig: Mapping, embed_dim: int) -> dict:
    """A latent-diffusion ``ddconfig`` that ``diffusers.AutoencoderKL`` holds exactly, as a plain dict with the
    optional keys filled with their latent-diffusion defaults; a ValueError otherwise."""
    dd = to_plain(OmegaConf.create(dict(ddconfig)))  # every sequence a list
    unknown = sorted(set(dd) - set(DDCONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown ddconfig key(s) {unknown}; allowed keys: {list(DDCONFIG_KEYS)}")
    missing = [k for k in DDCONFIG_REQUIRED if k not in dd]
    if missing:
        raise ValueError(f"ddconfig is missing required key(s) {missing}; required: {list(DDCONFIG_REQUIRED)}")
    for key in ("ch", "num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch"):
        value = dd[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ddconfig.{key} must be a positive int, got {value!r}")
    ch_mult = dd["ch_mult"]
    if not isinstance(ch_mult, (list, tuple)) or not ch_mult or not all(
        isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ch_mult
    ):
        raise ValueError(f"ddconfig.ch_mult must be a non-empty list of positive ints, got {ch_mult!r}")
    bad_groups = [dd["ch"] * m for m in ch_mult if (dd["ch"] * m) % NORM_NUM_GROUPS]
    if bad_groups:
        raise ValueError(
            f"ddconfig.ch * ch_mult gives channel counts {bad_groups} that are not divisible by the "
            f"{NORM_NUM_GROUPS} GroupNorm groups; got ch={dd['ch']!r}, ch_mult={list(ch_mult)!r}"
        )
    for key, allowed in DDCONFIG_FIXED.items():
        value = dd.setdefault(key, allowed)
        if value != allowed:
            raise ValueError(
                f"ddconfig.{key}={value!r} is not supported by diffusers.AutoencoderKL; allowed: {allowed!r}"
                + (" (attention only in the middle block, as in kl-f8)" if key == "attn_resolutions" else "")
            )
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim != dd["z_channels"]:
        raise ValueError(
            f"embed_dim={embed_dim!r} must equal ddconfig.z_channels={dd['z_channels']!r} "
            "(diffusers.AutoencoderKL uses one latent channel count)"
        )
    return dd


def diffusers_config_from_ddconfig(ddconfig: Mapping, embed_dim: int, scale_factor: float = DEFAULT_SCALE_FACTOR) -> dict:
    """latent-diffusion ``ddconfig`` -> ``AutoencoderKL`` kwargs (via diffusers' ``create_vae_diffusers_config_from_ldm``)."""
    dd = validate_ddconfig(ddconfig, embed_dim)
    ldm_config = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": dd}}}}}
    config = create_vae_diffusers_config_from_ldm(ldm_config, {}, scaling_factor=float(scale_factor))
    # an empty checkpoint makes diffusers guess a default sample size; the ddconfig's resolution is the truth
    return {**config, "sample_size": dd["resolution"]}


LDM_MARKER = "encoder.down.0.block.0.conv1.weight"
DIFFUSERS_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"


def detect_layout(state_dict: Mapping[str, torch.Tensor], prefix: str | None = None) -> tuple[str, str]:
    """Which autoencoder layout a state dict holds and behind which prefix -> (``"ldm"|"diffusers"``, prefix).

    ``prefix=None`` detects it; with several candidates (a LatentDiffusion checkpoint also holds
    ``cond_stage_model.*``) ``first_stage_model.`` wins, otherwise pass ``prefix`` explicitly.
    """
    found = []
    for layout, marker in (("ldm", LDM_MARKER), ("diffusers", DIFFUSERS_MARKER)):
        found += [(layout, k[: -len(marker)]) for k in state_dict if k.endswith(marker)]
    if prefix is not None:
        found = [c for c in found if c[1] == prefix]
    if not found:
        raise KeyError(
            f"no autoencoder weights found{'' if prefix is None else f' under prefix {prefix!r}'}: expected a key "
            f"ending in {LDM_MARKER!r} (LDM layout) or {DIFFUSERS_MARKER!r} (diffusers layout); "
            f"first keys found: {sorted(state_dict)[:5]}"
        )
    if len(found) > 1:
        preferred = [c for c in found if c[1] in LDM_PREFIXES]
        if len(preferred) != 1:
            raise ValueError(f"several autoencoders in this state dict, prefixes {[c[1] for c in found]}; pass prefix=")
        found = preferred
    return found[0]


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The autoencoder's weights under ``prefix``, with the prefix removed; anything else (``loss.*``,
    ``cond_stage_model.*``, UNet weights) is dropped."""
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if k.startswith(LDM_AUTOENCODER_PARTS)}


_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RENAMES_TO_LDM = [  # (diffusers regex, LDM replacement) applied in order; up-block indices fixed afterwards
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1."),
    (r"\.mid\.attn_1\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", lambda m: f".mid.attn_1.{_ATTENTION_TO_LDM[m[1]]}."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
    (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
]


def diffusers_to_ldm_state_dict(state_dict: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """``AutoencoderKL`` state dict -> bare LDM layout (inverse of diffusers' ``convert_ldm_vae_checkpoint``).

    ``num_levels`` = ``len(block_out_channels)`` (diffusers numbers decoder levels from the lowest
    resolution up, LDM from the highest down).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _RENAMES_TO_LDM:
            new = re.sub(pattern, repl, new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.", new)
        if ".mid.attn_1." in new and value.ndim == 2:  # Linear -> 1x1 conv
            value = rearrange(value, "o i -> o i 1 1")
        out[new] = value
    return out
