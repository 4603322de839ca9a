"""The first stage: a KL autoencoder (latent-diffusion's KL-f8 by default) held by ``diffusers.AutoencoderKL``.

Images are ``(N, C, H, W)`` in [-1, 1] (or clips ``(B, F, C, H, W)``); latents ``(N, z, H/f, W/f)`` are multiplied
by ``scale_factor`` (0.18215 for KL-f8). Encoding and decoding run in chunks of ``chunk_size`` slices.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.utils.torch_utils import randn_tensor
from einops import pack, rearrange, repeat, unpack
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from gem3d.checkpoint import load_checkpoint, load_weights, state_dict_of, with_prefix
from gem3d.config import instantiate_from_config
from gem3d.configs import packaged
from gem3d.models import ldm_vae

DEFAULT_SCALE_FACTOR = ldm_vae.DEFAULT_SCALE_FACTOR
DEFAULT_CHUNK_SIZE = 16
CONFIG_DIR = packaged("first_stage")
KL_F8_CONFIG = CONFIG_DIR / "kl-f8.yaml"
AUTOENCODER_KL_OPTIONS = [name for name in inspect.signature(AutoencoderKL.__init__).parameters if name != "self"]


def _check_positive(name: str, value: Any, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, (kind, int)) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


class FirstStage(nn.Module):
    """Wraps ``diffusers.AutoencoderKL`` as ``.vae``; frozen (eval, no grads) unless :meth:`unfreeze` is called.
    ``scale_factor`` multiplies the posterior sample or mean; ``chunk_size`` is slices per encoder/decoder call."""

    def __init__(self, vae, scale_factor: float = DEFAULT_SCALE_FACTOR, chunk_size: int = DEFAULT_CHUNK_SIZE, frozen: bool = True):
        super().__init__()
        if not isinstance(vae, AutoencoderKL):
            raise TypeError(f"vae must be a diffusers.AutoencoderKL, got {type(vae).__name__}")
        _check_positive("scale_factor", scale_factor, float)
        _check_positive("chunk_size", chunk_size, int)
        self.vae = vae
        self.scale_factor = float(scale_factor)
        self.chunk_size = int(chunk_size)
        self.vae.register_to_config(scaling_factor=self.scale_factor)
        self.frozen = False
        if frozen:
            self.freeze()

    @classmethod
    def from_ldm_ddconfig(
        cls, ddconfig: Mapping, embed_dim: int, scale_factor: float = DEFAULT_SCALE_FACTOR, chunk_size: int = DEFAULT_CHUNK_SIZE, frozen: bool = True
    ) -> FirstStage:
        """Random-weight model from latent-diffusion's ``ddconfig`` (``ch``, ``ch_mult``, ``num_res_blocks``, ...)."""
        config = ldm_vae.diffusers_config_from_ddconfig(ddconfig, embed_dim, scale_factor)
        return cls(AutoencoderKL(**config), scale_factor=scale_factor, chunk_size=chunk_size, frozen=frozen)

    @classmethod
    def from_diffusers_config(
        cls, scale_factor: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE, frozen: bool = True, **kwargs: Any
    ) -> FirstStage:
        """Random-weight model from ``AutoencoderKL`` kwargs (``block_out_channels``, ``layers_per_block``, ...);
        block types default to one ``DownEncoderBlock2D``/``UpDecoderBlock2D`` per entry of ``block_out_channels``."""
        unknown = sorted(set(kwargs) - set(AUTOENCODER_KL_OPTIONS))
        if unknown:
            raise ValueError(f"unknown AutoencoderKL option(s) {unknown}; allowed: {AUTOENCODER_KL_OPTIONS}")
        blocks = kwargs.get("block_out_channels", (64,))
        if not isinstance(blocks, (list, tuple)) or not blocks or not all(isinstance(b, int) and b > 0 for b in blocks):
            raise ValueError(f"block_out_channels must be a non-empty list of positive ints, got {blocks!r}")
        groups = kwargs.get("norm_num_groups", 32)
        if not isinstance(groups, int) or groups < 1 or any(b % groups for b in blocks):
            raise ValueError(f"every block_out_channels entry {list(blocks)} must be divisible by norm_num_groups={groups!r}")
        kwargs.setdefault("down_block_types", ["DownEncoderBlock2D"] * len(blocks))
        kwargs.setdefault("up_block_types", ["UpDecoderBlock2D"] * len(blocks))
        for key in ("down_block_types", "up_block_types"):
            if len(kwargs[key]) != len(blocks):
                raise ValueError(f"{key} has {len(kwargs[key])} entries but block_out_channels has {len(blocks)}: {list(kwargs[key])}")
        if scale_factor is None:
            scale_factor = kwargs.get("scaling_factor", DEFAULT_SCALE_FACTOR)
        return cls(AutoencoderKL(**kwargs), scale_factor=scale_factor, chunk_size=chunk_size, frozen=frozen)

    @classmethod
    def from_ldm_config(
        cls, config: str | Path | Mapping = KL_F8_CONFIG, scale_factor: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE, frozen: bool = True
    ) -> FirstStage:
        """Random-weight model from a latent-diffusion YAML (full model or autoencoder-only layout).
        ``scale_factor`` defaults to the config's ``model.params.scale_factor``, else 0.18215."""
        config = ldm_vae.read_config(config)
        params = ldm_vae.find_autoencoder_params(config)
        if "embed_dim" not in params:
            raise KeyError(f"autoencoder params hold no 'embed_dim' (keys: {sorted(params)})")
        if scale_factor is None:
            scale_factor = float(OmegaConf.select(config, "model.params.scale_factor") or DEFAULT_SCALE_FACTOR)
        return cls.from_ldm_ddconfig(params["ddconfig"], params["embed_dim"], scale_factor, chunk_size, frozen)

    @classmethod
    def from_ldm_checkpoint(
        cls,
        ckpt_path: str | Path,
        config_path: str | Path | Mapping = KL_F8_CONFIG,
        *,
        trust: bool = False,
        prefix: str | None = None,
        scale_factor: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        frozen: bool = True,
    ) -> FirstStage:
        """Load latent-diffusion weights offline: its ``kl-f8/model.ckpt`` (autoencoder-only, the default config
        ``gem3d/configs/first_stage/kl-f8.yaml``) or a LatentDiffusion checkpoint (``first_stage_model.*``) with its config."""
        model = cls.from_ldm_config(config_path, scale_factor=scale_factor, chunk_size=chunk_size, frozen=frozen)
        return model.load_checkpoint(ckpt_path, trust=trust, prefix=prefix)

    @classmethod
    def from_run(cls, ckpt_path: str | Path, scale_factor: float | None = None, chunk_size: int | None = None) -> FirstStage:
        """A frozen first stage from an autoencoder training run (``.ckpt``, run folder or glob), built from the run's
        hyper-parameters; ``scale_factor`` defaults to the run's (``auto``: 1 / latent std measured in training)."""
        ckpt = load_checkpoint(ckpt_path, key="first_stage_config.params.ckpt_path")
        hparams = ckpt.get("hyper_parameters") or {}
        if "first_stage_config" not in hparams:
            raise KeyError(f"{ckpt_path!r} is not an autoencoder run (no hyper_parameters.first_stage_config)")
        model = instantiate_from_config(hparams["first_stage_config"])
        state_dict = ckpt["state_dict"]
        model.load_state_dict(with_prefix(state_dict, "first_stage."), strict=True)
        if scale_factor is None:
            sf = hparams.get("scale_factor", "auto")
            scale_factor = float(1.0 / float(state_dict["latent_std"])) if sf == "auto" else float(sf)
        return cls(model.vae, scale_factor, model.chunk_size if chunk_size is None else chunk_size)

    def architecture(self) -> dict:
        """A ``{target, params}`` config that rebuilds this architecture (random weights) from its ``diffusers``
        config alone, so a model folder does not depend on the files its first stage came from."""
        config = {k: v for k, v in dict(self.vae.config).items() if k in AUTOENCODER_KL_OPTIONS}
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
        params.update(scale_factor=float(self.scale_factor), chunk_size=int(self.chunk_size))
        return {"target": "gem3d.models.autoencoder.FirstStage.from_diffusers_config", "params": params}

    def load_ldm_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str | None = None) -> FirstStage:
        """Load autoencoder weights in either layout (detected, strict): latent-diffusion's (``encoder.*``,
        ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, optionally behind ``first_stage_model.``) or diffusers'
        (``first_stage.vae.*``, ``vae.*`` or bare). Returns self."""
        layout, prefix = ldm_vae.detect_layout(state_dict, prefix)
        weights = ldm_vae.strip_prefix(state_dict, prefix)
        if layout == "ldm":
            weights = convert_ldm_vae_checkpoint(weights, dict(self.vae.config))
        load_weights(self.vae, weights, f"{layout} autoencoder weights")
        return self

    def load_checkpoint(self, path: str | Path, *, trust: bool = False, prefix: str | None = None) -> FirstStage:
        """:meth:`load_ldm_state_dict` from a file: LDM ``.ckpt``; gem3d Lightning ``.ckpt``, ``.pt`` or
        ``.safetensors``. ``trust=True`` allows non-weights pickles (runs code from the file). Returns self."""
        state_dict = state_dict_of(load_checkpoint(path, key="first_stage ckpt_path", trust=trust))
        return self.load_ldm_state_dict(state_dict, prefix)

    def to_ldm_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The weights in latent-diffusion's layout (e.g. ``prefix="first_stage_model."``)."""
        levels = len(self.vae.config.block_out_channels)
        bare = ldm_vae.diffusers_to_ldm_state_dict(self.vae.state_dict(), levels)
        return {prefix + k: v for k, v in bare.items()}

    def freeze(self) -> FirstStage:
        """No gradients, eval mode; ``.train()`` keeps it in eval mode while frozen."""
        self.frozen = True
        self.vae.requires_grad_(False)
        return self.train(False)

    def unfreeze(self) -> FirstStage:
        """Make trainable (autoencoder training): gradients on, train mode."""
        self.frozen = False
        self.vae.requires_grad_(True)
        return self.train(True)

    def train(self, mode: bool = True) -> FirstStage:
        return super().train(mode and not self.frozen)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def in_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor f between image and latent (8 for KL-f8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(z, H/f, W/f)`` for an image of ``height x width`` pixels."""
        f = self.downsample_factor
        return self.latent_channels, height // f, width // f

    def _chunks(self, x: torch.Tensor, progress: bool, desc: str) -> Iterable[torch.Tensor]:
        return tqdm(x.split(self.chunk_size), desc=desc, disable=not progress, leave=False)

    def _prepare_images(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1|C, H, W)`` -> ``(N, C, H, W)`` on the model's device/dtype; grey repeated to C channels."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"images must be a tensor (N, C, H, W) or (B, F, C, H, W), got shape {tuple(getattr(x, 'shape', ()))}")
        n, c, h, w = x.shape
        if n == 0:
            raise ValueError("images hold no slices (N = 0)")
        if c not in (1, self.in_channels):
            raise ValueError(f"images have {c} channels; allowed: 1 (grey, repeated) or {self.in_channels}")
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} must be divisible by the downsample factor {f}")
        if c == 1 and self.in_channels != 1:
            x = repeat(x, "n 1 h w -> n c h w", c=self.in_channels)
        return x.to(device=self.device, dtype=self.dtype)

    def posterior(self, x: torch.Tensor):
        """Encoder posterior (diffusers ``DiagonalGaussianDistribution``) of ``x (N, 1|C, H, W)``, unchunked (training)."""
        return self.vae.encode(self._prepare_images(x)).latent_dist

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        """Reconstruction for autoencoder training -> ``(recon (N, C_out, H, W), posterior)`` (unscaled latent space)."""
        posterior = self.posterior(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mean
        return self.vae.decode(z).sample, posterior

    def moments(self, x: torch.Tensor, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, 1|3, H, W)`` -> the encoder posterior's unscaled ``(mean, std)``, each ``(N, z, H/f, W/f)``,
        encoded in chunks of ``chunk_size``."""
        means, stds = [], []
        for chunk in self._chunks(self._prepare_images(x), progress, "encode"):
            dist = self.vae.encode(chunk).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        return torch.cat(means), torch.cat(stds)

    def encode(
        self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None, progress: bool = False
    ) -> torch.Tensor:
        """Images in [-1, 1] ``(N, 1|3, H, W)`` (or ``(B, F, 1|3, H, W)``) -> scaled latents ``(N, z, H/f, W/f)``:
        the posterior mean, or with ``sample=True`` a sample (one draw over all slices: chunking does not change it)."""
        clip = x.ndim == 5
        if clip:
            batch = x.shape[0]
            x = rearrange(x, "b f c h w -> (b f) c h w")
        z, std = self.moments(x, progress=progress)
        if sample:
            z = z + std * randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = z * self.scale_factor
        return rearrange(z, "(b f) c h w -> b f c h w", b=batch) if clip else z

    def encode_mask(self, grey: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Grey mask images ``(N, 1, H, W)`` (label levels in [-1, 1], below -1 outside the body) -> scaled
        posterior-mean latents ``(N, z, H/f, W/f)``; no clamping. Clips ``(B, F, 1, H, W)`` also work."""
        if grey.ndim not in (4, 5) or grey.shape[-3] != 1:
            raise ValueError(f"grey masks must be (N, 1, H, W) or (B, F, 1, H, W), got shape {tuple(grey.shape)}")
        return self.encode(grey, sample=False, progress=progress)

    def decode(self, z: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Scaled latents ``(N, z, h, w)`` (or ``(B, F, z, h, w)``) -> images ``(N, C_out, h*f, w*f)`` (not clamped)."""
        if z.ndim not in (4, 5) or z.shape[-3] != self.latent_channels or z.numel() == 0:
            raise ValueError(f"latents must be (N, {self.latent_channels}, h, w) with N >= 1, got shape {tuple(z.shape)}")
        z, batch_shape = pack([z.to(device=self.device, dtype=self.dtype) / self.scale_factor], "* c h w")
        images = torch.cat([self.vae.decode(chunk).sample for chunk in self._chunks(z, progress, "decode")])
        return unpack(images, batch_shape, "* c h w")[0]

    def decode_grey(self, z: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Scaled latents -> grey images ``(N, 1, H, W)`` (channel mean of :meth:`decode`)."""
        return self.decode(z, progress=progress).mean(dim=-3, keepdim=True)
