"""Training modules: the GEM-3D latent diffusion model (all variants) and the first-stage autoencoder.

``Gem3dLDM`` is one LightningModule for the five training variants (see :data:`VARIANTS`):

- ``slice_stage``: 2D denoiser on every slice of a clip, concat condition ``[noisy | mask | informed]`` (12 ch),
  one timestep per slice;
- ``volume_stage``: the same UNet with volumetric layers, one timestep per clip (``fix_t``), only the volumetric
  parameters trained, the 2D weights loaded from a stage-1 checkpoint (``ckpt_path``);
- ``position``: single slices, cross-attention on ``position_embedding(pos)`` as one context token;
- ``baseline_slice`` / ``baseline_volume``: as the first two without the informed slice (8 channels).

Latents: the diffusion target is the scaled posterior *sample* of the (frozen) first stage; conditioning latents
(mask, informed slice) are the scaled posterior *mean* times ``condition_latent_factor`` (1 for gem3d-trained
models; ``1 / scale_factor`` reproduces the original GEM-3D, which conditions on the unscaled posterior mode).

Inference reuses :meth:`Gem3dLDM.condition` and :meth:`Gem3dLDM.eps` / :meth:`Gem3dLDM.model_fn`; a run folder is
loaded with :func:`load_ldm_from_run`.
"""

from __future__ import annotations

import glob
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn

from gem3d.checkpoint import safe_load_checkpoint, with_prefix
from gem3d.config import check_existing_path, instantiate_from_config, is_placeholder, to_plain
from gem3d.ema import EMA

__all__ = [
    "VARIANTS",
    "VariantSpec",
    "Gem3dLDM",
    "AutoencoderModule",
    "scaled_learning_rate",
    "learning_rate_message",
    "resolve_checkpoint",
    "load_checkpoint_file",
    "load_first_stage_from_run",
    "load_ldm_from_run",
    "first_stage_architecture",
    "unet_state_dict_from_checkpoint",
]


@dataclass(frozen=True)
class VariantSpec:
    """What a training variant means: conditioning, UNet type, timestep sharing, trained parameters, data kind."""

    conditioning: str  # "concat" | "crossattn"
    use_informed: bool
    volumetric: bool
    fix_t: bool  # one timestep per clip
    train_only_volumetric: bool
    data_kind: str  # "clip" | "slice"


VARIANTS: dict[str, VariantSpec] = {
    "slice_stage": VariantSpec("concat", True, False, False, False, "clip"),
    "volume_stage": VariantSpec("concat", True, True, True, True, "clip"),
    "position": VariantSpec("crossattn", False, False, False, False, "slice"),
    "baseline_slice": VariantSpec("concat", False, False, False, False, "clip"),
    "baseline_volume": VariantSpec("concat", False, True, True, True, "clip"),
}


# ---------------------------------------------------------------------------------------------- small helpers


def scaled_learning_rate(base_lr: float, ngpu: int, batch_size: int, accumulate: int = 1) -> float:
    """latent-diffusion's rule: ``lr = accumulate * ngpu * batch_size * base_lr``."""
    for name, value in (("ngpu", ngpu), ("batch_size", batch_size), ("accumulate", accumulate)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return float(accumulate * ngpu * batch_size * base_lr)


def learning_rate_message(lr: float, base_lr: float, ngpu: int, batch_size: int, accumulate: int) -> str:
    return (
        f"Setting learning rate to {lr:.2e} = {accumulate} (accumulate_grad_batches) * {ngpu} (num_gpus) * "
        f"{batch_size} (batchsize) * {base_lr:.2e} (base_lr)"
    )


def resolve_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> Path:
    """A checkpoint file from a file, a run folder (``<run>/checkpoints/last.ckpt``) or a glob (newest match,
    e.g. ``logs/*_demo_stage1``); placeholders and missing paths fail naming ``key`` and the value."""
    value = str(path)
    if is_placeholder(value):
        check_existing_path(key, value)  # raises with the placeholder message
    if any(ch in value for ch in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(value)))
        if not matches:
            raise FileNotFoundError(f"{key}={value!r}: no file or folder matches this pattern")
        value = matches[-1]
    candidate = Path(value).expanduser()
    if candidate.is_dir():
        candidate = candidate / "checkpoints" / "last.ckpt"
        if not candidate.is_file():
            raise FileNotFoundError(f"{key}={str(path)!r}: folder has no checkpoints/last.ckpt")
        return candidate
    return check_existing_path(key, str(candidate))


def load_checkpoint_file(path: str | os.PathLike, key: str = "ckpt_path", trust: bool = False) -> dict:
    """A (resolved) checkpoint on the CPU through :func:`gem3d.checkpoint.safe_load_checkpoint`
    (``weights_only=True`` with gem3d's allowlist; ``trust=True`` unpickles fully, only for files you trust)."""
    return safe_load_checkpoint(resolve_checkpoint(path, key), trust=trust)


def unet_state_dict_from_checkpoint(ckpt: Mapping, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The UNet weights of a gem3d ``Gem3dLDM`` checkpoint (``unet.*`` or, with ``use_ema``, the EMA shadow) or of
    an original GEM-3D / latent-diffusion one (``model.diffusion_model.*``)."""
    state_dict = ckpt.get("state_dict", ckpt)
    if use_ema:
        ema = {k: v for k, v in state_dict.items() if k.startswith("ema.") and k != "ema.num_updates"}
        if not ema:
            raise KeyError("use_ema=True but the checkpoint holds no EMA weights ('ema.*')")
        raw = with_prefix(state_dict, "unet.")
        from gem3d.ema import shadow_key

        return {name: ema.get("ema." + shadow_key(name), value) for name, value in raw.items()}
    for prefix in ("unet.", "model.diffusion_model."):
        found = with_prefix(state_dict, prefix)
        if found:
            return found
    raise KeyError(f"no UNet weights ('unet.*' or 'model.diffusion_model.*') among {len(state_dict)} keys, e.g. {list(state_dict)[:5]}")


def first_stage_architecture(first_stage) -> dict:
    """A ``{target, params}`` config that rebuilds ``first_stage``'s architecture (random weights) from its
    ``diffusers`` config alone, so a run folder does not depend on the files its first stage came from."""
    import inspect

    from diffusers import AutoencoderKL

    allowed = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(first_stage.vae.config).items() if k in allowed}
    params.update(scale_factor=float(first_stage.scale_factor), chunk_size=int(first_stage.chunk_size))
    return {"target": "gem3d.models.autoencoder.FirstStage.from_diffusers_config", "params": params}


@rank_zero_only
def _print_rank_zero(message: str) -> None:
    print(message, flush=True)


def _image_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of grey slices ``(F, 1, H, W)`` in about [-1, 1] -> one image ``(1, R*H, F*W)`` in [0, 1]."""
    stacked = torch.stack([r.detach().float().cpu() for r in rows])
    grid = rearrange(stacked, "r f 1 h w -> 1 (r h) (f w)")
    return ((grid.clamp(-1, 1) + 1) / 2).contiguous()


# ---------------------------------------------------------------------------------------------- the LDM


class Gem3dLDM(L.LightningModule):
    """GEM-3D latent diffusion (eps-prediction, L2 loss) for one of :data:`VARIANTS`.

    Args:
        unet_config: ``{target, params}`` of :class:`gem3d.models.unet.UNetModel`.
        first_stage_config: ``{target, params}`` building a :class:`gem3d.models.autoencoder.FirstStage`
            (e.g. ``gem3d.models.autoencoder.FirstStage.from_ldm_checkpoint`` or
            ``gem3d.diffusion.load_first_stage_from_run``); frozen.
        variant: one of :data:`VARIANTS`.
        ckpt_path: stage-1 checkpoint (file, run folder or glob) whose UNet weights initialise a volume stage
            (``load_slice_weights``); None trains the volume stage from scratch (with a warning).
        ckpt_use_ema: take the stage-1 checkpoint's EMA weights instead of the raw ones.
        use_ema / ema_decay: keep an EMA of the trained UNet parameters (in the checkpoint).
        sample_with_ema: image logging and :func:`load_ldm_from_run` default to the EMA weights.
        base_learning_rate / scale_lr: AdamW lr (scaled by GPUs x batch x accumulation when ``scale_lr``).
        weight_decay: AdamW weight decay.
        position_embed_dim: width of the position embedding (default: the UNet's ``context_dim``).
        log_images_every_n_steps: TensorBoard image grids every N steps (0: never).
        sample_steps_for_logging: DDIM steps of the logged sample.
        condition_latent_factor: multiplier of the conditioning latents (see the module docstring).
        num_train_timesteps / beta_start / beta_end: the training schedule (scaled_linear).
    """

    def __init__(
        self,
        unet_config: Mapping,
        first_stage_config: Mapping,
        variant: str = "slice_stage",
        ckpt_path: str | None = None,
        ckpt_use_ema: bool = False,
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        sample_with_ema: bool = True,
        base_learning_rate: float = 5e-6,
        scale_lr: bool = True,
        weight_decay: float = 0.01,
        position_embed_dim: int | None = None,
        log_images_every_n_steps: int = 0,
        sample_steps_for_logging: int = 20,
        condition_latent_factor: float = 1.0,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not supported; allowed: {sorted(VARIANTS)}")
        unet_config, first_stage_config = to_plain(unet_config), to_plain(first_stage_config)
        self.save_hyperparameters()
        self.variant = variant
        self.spec = VARIANTS[variant]
        self.base_learning_rate = float(base_learning_rate)
        self.scale_lr = bool(scale_lr)
        self.learning_rate = float(base_learning_rate)
        self.weight_decay = float(weight_decay)
        self.log_images_every_n_steps = int(log_images_every_n_steps)
        self.sample_steps_for_logging = int(sample_steps_for_logging)
        self.sample_with_ema = bool(sample_with_ema)
        self.condition_latent_factor = float(condition_latent_factor)

        self.first_stage = instantiate_from_config(first_stage_config)
        self.first_stage.freeze()
        latent_channels = int(self.first_stage.latent_channels)

        unet_params = dict(unet_config.get("params") or {})
        self._validate_unet_params(unet_params, latent_channels, position_embed_dim)
        self.unet = instantiate_from_config(unet_config)
        self.position_embed_dim = int(position_embed_dim or unet_params.get("context_dim") or 0) or None

        if ckpt_path is not None:
            if not self.spec.volumetric:
                raise ValueError(
                    f"ckpt_path={ckpt_path!r} is only used by the volume stages (volume_stage, baseline_volume) to load "
                    f"stage-1 UNet weights; variant={variant!r} takes none (set model.params.ckpt_path to null, or use "
                    f"main.py --resume to continue a run)"
                )
            resolved = resolve_checkpoint(ckpt_path, key="model.params.ckpt_path")
            ckpt = safe_load_checkpoint(resolved)
            self.unet.load_slice_weights(unet_state_dict_from_checkpoint(ckpt, use_ema=ckpt_use_ema))
            weights = "EMA" if ckpt_use_ema else "raw"
            rank_zero_info(f"Loaded the stage-1 UNet weights ({weights}) of {resolved} into the {variant} UNet")
        elif self.spec.volumetric:
            rank_zero_warn(f"variant={variant!r} without ckpt_path: the 2D UNet weights start from scratch")

        if self.spec.train_only_volumetric:
            self.unet.freeze_non_volumetric()

        from gem3d.sampling.schedule import make_train_scheduler

        self.scheduler = make_train_scheduler(num_train_timesteps, beta_start, beta_end)
        self.num_train_timesteps = int(num_train_timesteps)
        alphas_cumprod = torch.as_tensor(self.scheduler.alphas_cumprod, dtype=torch.float32)
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)

        self.use_ema = bool(use_ema)
        self.ema = EMA(self.unet, decay=ema_decay) if self.use_ema else None
        if self.sample_with_ema and not self.use_ema:
            self.sample_with_ema = False

    # ------------------------------------------------------------------------------------ validation
    def _validate_unet_params(self, params: dict, latent_channels: int, position_embed_dim: int | None) -> None:
        spec = self.spec
        cond_channels = latent_channels * ((1 + int(spec.use_informed)) if spec.conditioning == "concat" else 0)
        expected_in = latent_channels + cond_channels
        got_in = params.get("in_channels")
        if got_in != expected_in:
            layout = {"concat": "noisy + mask" + (" + informed" if spec.use_informed else ""), "crossattn": "noisy"}[spec.conditioning]
            raise ValueError(
                f"unet_config.params.in_channels={got_in!r} does not fit variant={self.variant!r}: expected {expected_in} "
                f"({layout}, {latent_channels} latent channels each)"
            )
        if params.get("out_channels", latent_channels) != latent_channels:
            raise ValueError(f"unet_config.params.out_channels={params.get('out_channels')!r}; expected {latent_channels}")
        if bool(params.get("volumetric", False)) != spec.volumetric:
            raise ValueError(
                f"unet_config.params.volumetric={params.get('volumetric', False)!r} does not fit variant={self.variant!r} "
                f"(expected {spec.volumetric})"
            )
        if spec.conditioning == "crossattn":
            context_dim = params.get("context_dim")
            if not params.get("use_spatial_transformer") or not context_dim:
                raise ValueError(
                    f"variant='position' needs unet_config.params.use_spatial_transformer=true and a context_dim, got "
                    f"use_spatial_transformer={params.get('use_spatial_transformer')!r}, context_dim={context_dim!r}"
                )
            if position_embed_dim is not None and position_embed_dim != context_dim:
                raise ValueError(f"position_embed_dim={position_embed_dim!r} must equal unet context_dim={context_dim!r}")

    # ------------------------------------------------------------------------------------ train mode
    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage.train(False)
        return self

    # ------------------------------------------------------------------------------------ latents
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, *, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Grey images ``(B, F, 1, S, S)`` -> scaled latents ``(B, F, z, h, w)`` (posterior sample or mean)."""
        return self.first_stage.encode(images, sample=sample, generator=generator)

    @torch.no_grad()
    def encode_condition_images(self, grey: torch.Tensor, *, is_mask: bool) -> torch.Tensor:
        """Grey masks / informed slices ``(..., 1, S, S)`` -> conditioning-space latents (posterior mean)."""
        z = self.first_stage.encode_mask(grey) if is_mask else self.first_stage.encode(grey, sample=False)
        return z

    def encode_batch(self, batch: Mapping, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """A data batch -> ``(z (B, F, z, h, w), cond)`` with ``cond`` from :meth:`condition`.

        Clip batches: ``image``/``mask (B, F, 1, S, S)``, ``informed (B, 1, S, S)``. Slice batches (position
        variant): ``image (B, 1, S, S)``, ``pos (B,)`` -> ``F = 1``.
        """
        image = batch["image"]
        if self.spec.data_kind == "slice":
            if image.ndim != 4:
                raise ValueError(f"variant {self.variant!r} expects slice batches image (B, 1, S, S), got {tuple(image.shape)}")
            z = self.encode_images(rearrange(image, "b c h w -> b 1 c h w"), sample=True, generator=generator)
            return z, self.condition(pos=batch["pos"], num_frames=1)
        if image.ndim != 5:
            raise ValueError(f"variant {self.variant!r} expects clip batches image (B, F, 1, S, S), got {tuple(image.shape)}")
        z = self.encode_images(image, sample=True, generator=generator)
        mask_latent = self.encode_condition_images(batch["mask"], is_mask=True)
        informed_latent = None
        if self.spec.use_informed:
            informed_latent = self.encode_condition_images(batch["informed"], is_mask=False)
        return z, self.condition(mask_latent, informed_latent)

    def condition(
        self,
        mask_latent: torch.Tensor | None = None,
        informed_latent: torch.Tensor | None = None,
        pos: torch.Tensor | float | None = None,
        num_frames: int | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The conditioning of a batch of clips, in the form :meth:`eps` takes.

        Args:
            mask_latent: ``(B, F, z, h, w)`` scaled latents from ``FirstStage.encode_mask`` (concat variants).
            informed_latent: ``(B, z, h, w)`` (one per clip, every slice) or ``(B, F, z, h, w)`` scaled latents
                (``FirstStage.encode`` posterior mean, or a generated slice's latent); slice/volume stages only.
            pos: relative slice positions ``(B,)`` in [0, 1] (position variant).
            num_frames: F for the position variant (default 1).

        Returns:
            ``{"concat": (B, F, Cc, h, w) | None, "context": (B, D) | None}``.
        """
        spec = self.spec
        if spec.conditioning == "crossattn":
            if pos is None:
                raise ValueError(f"variant {self.variant!r} needs pos (relative slice positions in [0, 1])")
            from gem3d.models.conditioning import position_embedding

            pos = torch.as_tensor(pos, dtype=torch.float32, device=self.device).reshape(-1)
            return {"concat": None, "context": position_embedding(pos, self.position_embed_dim).to(self.device)}
        if mask_latent is None or mask_latent.ndim != 5:
            got = None if mask_latent is None else tuple(mask_latent.shape)
            raise ValueError(f"variant {self.variant!r} needs mask_latent (B, F, z, h, w), got {got}")
        if spec.use_informed and informed_latent is None:
            raise ValueError(f"variant {self.variant!r} needs informed_latent (B, z, h, w) or (B, F, z, h, w)")
        if not spec.use_informed and informed_latent is not None:
            raise ValueError(f"variant {self.variant!r} is mask-only; informed_latent must be None")
        from gem3d.models.conditioning import concat_condition

        factor = self.condition_latent_factor
        informed = None if informed_latent is None else informed_latent * factor
        return {"concat": concat_condition(mask_latent * factor, informed), "context": None}

    # ------------------------------------------------------------------------------------ the denoiser
    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        """Noise prediction for clips ``x (B, F, z, h, w)`` at timesteps ``t`` ``(B,)`` (per clip) or ``(B, F)``
        (per slice; not for the volume variants) -> ``(B, F, z, h, w)``. ``cond`` from :meth:`condition`."""
        if x.ndim != 5:
            raise ValueError(f"x must be clips (B, F, z, h, w), got shape {tuple(x.shape)}")
        b, f = x.shape[:2]
        t = torch.as_tensor(t, device=x.device).long()
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape == (b,):
            t = repeat(t, "b -> b f", f=f)
        if t.shape != (b, f):
            raise ValueError(f"t must be (B,)={b} or (B, F)=({b}, {f}), got shape {tuple(t.shape)}")
        if self.spec.volumetric and not bool((t == t[:, :1]).all()):
            raise ValueError("the volume variants take one timestep per clip; got different timesteps within a clip")
        h = x
        if cond.get("concat") is not None:
            h = torch.cat([x, cond["concat"].to(x.dtype)], dim=2)
        context = cond.get("context")
        if context is not None:
            context = repeat(context.to(x.dtype), "b d -> (b f) 1 d", f=f)
        flat = rearrange(h, "b f c hh ww -> (b f) c hh ww")
        kwargs = {"num_frames": f} if self.spec.volumetric else {}
        out = self.unet(flat, rearrange(t, "b f -> (b f)"), context=context, **kwargs)
        return rearrange(out, "(b f) c hh ww -> b f c hh ww", b=b)

    def model_fn(self, cond: Mapping[str, torch.Tensor | None]):
        """``eps_fn(x (B, F, z, h, w), t (B,))`` with ``cond`` bound in: the samplers' denoiser."""

        def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.eps(x, t, cond)

        return eps_fn

    forward = eps

    @contextmanager
    def ema_scope(self, enabled: bool = True) -> Iterator[None]:
        """Temporarily swap the EMA weights into the UNet (no-op without EMA or when not ``enabled``)."""
        if self.ema is None or not enabled:
            yield
            return
        with self.ema.swapped_in(self.unet):
            yield

    def unet_state_dict(self, use_ema: bool | None = None) -> dict[str, torch.Tensor]:
        """The UNet weights to export: EMA when ``use_ema`` (default ``sample_with_ema``), else raw."""
        use_ema = self.sample_with_ema if use_ema is None else use_ema
        with self.ema_scope(use_ema):
            return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}

    # ------------------------------------------------------------------------------------ loss
    def sample_timesteps(self, b: int, f: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps ``(B, F)``: one per clip for the volume variants, one per slice otherwise."""
        n = b if self.spec.fix_t else b * f
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=self.device if generator is None else generator.device)
        t = t.to(self.device)
        return repeat(t, "b -> b f", f=f) if self.spec.fix_t else rearrange(t, "(b f) -> b f", b=b)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising ``sqrt(a_t) z0 + sqrt(1 - a_t) noise`` with ``t (B, F)``."""
        a = self.alphas_cumprod.to(z0.device)[t].to(z0.dtype)
        a = rearrange(a, "b f -> b f 1 1 1")
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def loss(self, batch: Mapping, generator: torch.Generator | None = None) -> torch.Tensor:
        """L2 between predicted and true noise, averaged over all elements."""
        z0, cond = self.encode_batch(batch, generator=generator)
        b, f = z0.shape[:2]
        t = self.sample_timesteps(b, f, generator)
        if generator is None:
            noise = torch.randn_like(z0)
        else:
            noise = torch.randn(z0.shape, generator=generator, device=generator.device, dtype=z0.dtype).to(z0.device)
        x_t = self.q_sample(z0, t, noise)
        return F.mse_loss(self.eps(x_t, t, cond), noise)

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.unet)
        n = self.log_images_every_n_steps
        if n > 0 and self.global_step % n == 0 and self.trainer.is_global_zero:
            self.log_images(batch)

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        loss = self.loss(batch, generator=generator)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        if self.ema is not None:
            generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
            with self.ema_scope():
                loss_ema = self.loss(batch, generator=generator)
            self.log("val/loss_ema", loss_ema, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------------------------ images
    @torch.no_grad()
    def sample_clip(self, cond: Mapping, shape: tuple[int, ...], steps: int, seed: int = 0) -> torch.Tensor:
        """A DDIM sample ``shape = (B, F, z, h, w)`` (eta 1) with ``cond`` -> latents."""
        from gem3d.sampling.samplers import sample_ddim

        generator = torch.Generator(device=self.device).manual_seed(seed)
        x_T = torch.randn(shape, generator=generator, device=self.device)
        with self.ema_scope(self.sample_with_ema):
            return sample_ddim(self.model_fn(cond), x_T, self.alphas_cumprod, steps=steps, eta=1.0, generator=generator)

    @torch.no_grad()
    def log_images(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Image grids of the first clip of ``batch``: real, mask, informed slice, a short DDIM sample.
        Returned as ``{tag: (1, H, W) in [0, 1]}`` and written to TensorBoard when the logger is one."""
        was_training = self.training
        self.eval()
        try:
            batch = {k: (v[:1].to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            z, cond = self.encode_batch(batch)
            sample = self.first_stage.decode_grey(self.sample_clip(cond, tuple(z.shape), self.sample_steps_for_logging))
            if self.spec.data_kind == "slice":  # (1, 1, S, S) slices -> one-frame rows
                real, mask = batch["image"], batch["mask"]
            else:
                real, mask = batch["image"][0], batch["mask"][0]
            grids = {"real": _image_grid([real]), "mask": _image_grid([mask]), "sample": _image_grid([sample[0]])}
            if self.spec.use_informed:
                grids["informed"] = _image_grid([batch["informed"]])
            grids["real_vs_sample"] = _image_grid([real, sample[0]])
        finally:
            self.train(was_training)
        logger = self.logger
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            for tag, image in grids.items():
                experiment.add_image(f"images/{tag}", image, global_step=self.global_step)
        return grids

    # ------------------------------------------------------------------------------------ optimiser
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters AdamW updates: the volumetric ones for the volume variants, else the whole UNet."""
        if self.spec.train_only_volumetric:
            return list(self.unet.volumetric_parameters())
        return [p for p in self.unet.parameters() if p.requires_grad]

    def set_learning_rate(self, ngpu: int, batch_size: int, accumulate: int = 1) -> float:
        """Apply the ``scale_lr`` rule and print latent-diffusion's message; returns the lr."""
        if self.scale_lr:
            self.learning_rate = scaled_learning_rate(self.base_learning_rate, ngpu, batch_size, accumulate)
            _print_rank_zero(learning_rate_message(self.learning_rate, self.base_learning_rate, ngpu, batch_size, accumulate))
        else:
            self.learning_rate = self.base_learning_rate
            _print_rank_zero(f"++++ NOT USING LR SCALING ++++\nSetting learning rate to {self.learning_rate:.2e}")
        return self.learning_rate

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError(f"variant {self.variant!r}: no trainable parameters")
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["first_stage_scale_factor"] = float(self.first_stage.scale_factor)
        checkpoint["first_stage_architecture"] = first_stage_architecture(self.first_stage)


# ---------------------------------------------------------------------------------------------- autoencoder


class AutoencoderModule(L.LightningModule):
    """Trains a :class:`FirstStage` on single slices: L1 reconstruction + ``kl_weight`` x KL.

    Args:
        first_stage_config: ``{target, params}`` of the FirstStage, e.g.
            ``gem3d.models.autoencoder.FirstStage.from_diffusers_config`` (kept in the checkpoint, so
            :func:`load_first_stage_from_run` rebuilds it).
        kl_weight: weight of the KL term (1e-6 as latent-diffusion's KL autoencoders).
        sample_posterior: decode a posterior sample (True) or the mean.
        include_masks: also reconstruct the grey masks of the batch (the same encoder encodes them later).
        scale_factor: latent scale of the trained model; ``"auto"`` = 1 / std of the training latents
            (running average, latent-diffusion's ``scale_by_std``).
        base_learning_rate / scale_lr: Adam lr as in :class:`Gem3dLDM`.
        log_images_every_n_steps: TensorBoard grids of inputs and reconstructions.
    """

    def __init__(
        self,
        first_stage_config: Mapping,
        kl_weight: float = 1e-6,
        sample_posterior: bool = True,
        include_masks: bool = False,
        scale_factor: float | str = "auto",
        base_learning_rate: float = 4.5e-6,
        scale_lr: bool = True,
        log_images_every_n_steps: int = 0,
    ):
        super().__init__()
        first_stage_config = to_plain(first_stage_config)
        if not (scale_factor == "auto" or (isinstance(scale_factor, (int, float)) and scale_factor > 0)):
            raise ValueError(f"scale_factor must be 'auto' or a positive number, got {scale_factor!r}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
        self.save_hyperparameters()
        self.first_stage = instantiate_from_config(first_stage_config)
        self.first_stage.unfreeze()
        self.kl_weight = float(kl_weight)
        self.sample_posterior = bool(sample_posterior)
        self.include_masks = bool(include_masks)
        self.base_learning_rate = float(base_learning_rate)
        self.learning_rate = float(base_learning_rate)
        self.scale_lr = bool(scale_lr)
        self.log_images_every_n_steps = int(log_images_every_n_steps)
        self.register_buffer("latent_std", torch.tensor(1.0))
        self.register_buffer("latent_std_updates", torch.tensor(0, dtype=torch.long))

    def _inputs(self, batch: Mapping) -> torch.Tensor:
        x = batch["image"]
        if x.ndim == 5:
            x = rearrange(x, "b f c h w -> (b f) c h w")
        if self.include_masks and "mask" in batch:
            m = batch["mask"]
            m = rearrange(m, "b f c h w -> (b f) c h w") if m.ndim == 5 else m
            x = torch.cat([x, m])
        return x

    def loss(self, batch: Mapping, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        x = self._inputs(batch)
        recon, posterior = self.first_stage(x, sample_posterior=self.sample_posterior, generator=generator)
        target = x if recon.shape[1] == x.shape[1] else repeat(x, "n 1 h w -> n c h w", c=recon.shape[1])
        rec_loss = (recon - target).abs().mean()
        kl = posterior.kl().mean()
        return rec_loss + self.kl_weight * kl, {"rec_loss": rec_loss.detach(), "kl": kl.detach(), "std": posterior.mean.detach().std()}

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        loss, parts = self.loss(batch)
        with torch.no_grad():
            n = int(self.latent_std_updates)
            momentum = min(0.99, n / (n + 1.0))
            self.latent_std.mul_(momentum).add_((1 - momentum) * parts["std"].to(self.latent_std))
            self.latent_std_updates += 1
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/rec_loss", parts["rec_loss"])
        self.log("train/kl", parts["kl"])
        n_img = self.log_images_every_n_steps
        if n_img > 0 and self.global_step % n_img == 0 and self.trainer.is_global_zero:
            self.log_images(batch)
        return loss

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        loss, parts = self.loss(batch, generator=generator)
        x = self._inputs(batch)
        with torch.no_grad():
            recon = self.first_stage.decode_grey(self.first_stage.encode(x))
            mse = F.mse_loss(recon.clamp(-1, 1), x.clamp(-1, 1))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/rec_loss", parts["rec_loss"], sync_dist=True)
        self.log("val/psnr", 10 * torch.log10(4.0 / mse.clamp_min(1e-10)), sync_dist=True)

    @torch.no_grad()
    def log_images(self, batch: Mapping) -> dict[str, torch.Tensor]:
        x = self._inputs(batch)[:8]
        recon = self.first_stage.decode_grey(self.first_stage.encode(x))
        grid = {"inputs_reconstructions": _image_grid([x, recon])}
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            for tag, image in grid.items():
                experiment.add_image(f"images/{tag}", image, global_step=self.global_step)
        return grid

    def current_scale_factor(self) -> float:
        sf = self.hparams.scale_factor
        return float(1.0 / float(self.latent_std)) if sf == "auto" else float(sf)

    def set_learning_rate(self, ngpu: int, batch_size: int, accumulate: int = 1) -> float:
        return Gem3dLDM.set_learning_rate(self, ngpu, batch_size, accumulate)  # same rule and message

    def configure_optimizers(self):
        return torch.optim.Adam(self.first_stage.parameters(), lr=self.learning_rate, betas=(0.5, 0.9))


def load_first_stage_from_run(ckpt_path: str, scale_factor: float | None = None, chunk_size: int | None = None):
    """A frozen :class:`FirstStage` from an :class:`AutoencoderModule` run (``.ckpt``, run folder or glob).

    The architecture comes from the checkpoint's hyper-parameters; ``scale_factor`` defaults to the run's
    (``auto``: 1 / latent std measured during training).
    """
    ckpt = load_checkpoint_file(ckpt_path, key="first_stage_config.params.ckpt_path")
    hparams = ckpt.get("hyper_parameters") or {}
    if "first_stage_config" not in hparams:
        raise KeyError(f"{ckpt_path!r} is not an AutoencoderModule checkpoint (no hyper_parameters.first_stage_config)")
    first_stage = instantiate_from_config(hparams["first_stage_config"])
    state_dict = ckpt["state_dict"]
    first_stage.load_state_dict(with_prefix(state_dict, "first_stage."), strict=True)
    if scale_factor is None:
        sf = hparams.get("scale_factor", "auto")
        scale_factor = float(1.0 / float(state_dict["latent_std"])) if sf == "auto" else float(sf)
    first_stage.scale_factor = float(scale_factor)
    first_stage.vae.register_to_config(scaling_factor=float(scale_factor))
    if chunk_size is not None:
        first_stage.chunk_size = int(chunk_size)
    return first_stage.freeze()


def load_ldm_from_run(
    run: str | os.PathLike,
    *,
    use_ema: bool | None = None,
    first_stage_config: Mapping | None = None,
    map_location: str | torch.device = "cpu",
    trust: bool = False,
) -> Gem3dLDM:
    """A :class:`Gem3dLDM` in eval mode from a run folder / ``.ckpt`` / glob written by ``main.py``.

    The model is rebuilt from the checkpoint's hyper-parameters (``ckpt_path`` of a volume stage is not
    re-read: the checkpoint holds every weight, first stage included). The first stage's architecture comes from
    ``first_stage_config`` if given, else from the checkpoint's ``first_stage_architecture`` (written by every
    gem3d run, so moved run folders load without the autoencoder files), else from the stored config.
    ``use_ema`` (default: the run's ``sample_with_ema``) copies the EMA weights into the UNet. ``trust``: see
    :func:`load_checkpoint_file`.
    """
    ckpt = load_checkpoint_file(run, key="run", trust=trust)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "unet_config" not in hparams:
        raise KeyError(f"{run!r} is not a Gem3dLDM checkpoint (no hyper_parameters.unet_config)")
    hparams["ckpt_path"] = None
    if first_stage_config is not None:
        hparams["first_stage_config"] = to_plain(first_stage_config)
    elif "first_stage_architecture" in ckpt:
        hparams["first_stage_config"] = ckpt["first_stage_architecture"]
    with quiet_missing_stage1_warning():
        model = Gem3dLDM(**hparams)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    if "first_stage_scale_factor" in ckpt:
        model.first_stage.scale_factor = float(ckpt["first_stage_scale_factor"])
    use_ema = model.sample_with_ema if use_ema is None else bool(use_ema)
    if use_ema:
        if model.ema is None:
            raise ValueError(f"use_ema=True but the run {run!r} was trained without EMA")
        model.ema.copy_to(model.unet)
    model.loaded_with_ema = use_ema
    return model.to(map_location).eval()


@contextmanager
def quiet_missing_stage1_warning():
    """Silence the "without ckpt_path" warning while rebuilding a model whose checkpoint holds every weight."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without ckpt_path.*")
        yield
