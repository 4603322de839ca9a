"""The GEM-3D latent diffusion model as a LightningModule: a :class:`gem3d.denoiser.Denoiser` that Lightning trains
(eps- or v-prediction, L2 loss, EMA, AdamW, image logging). Its checkpoints keep the denoiser's parameter names
(``unet.*``, ``first_stage.*``) plus ``ema.*``, so :func:`gem3d.model_dirs.load_model_dir` rebuilds a plain denoiser.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from typing import Any, ContextManager, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange, repeat
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from gem3d.checkpoint import load_checkpoint, resolve_checkpoint, unet_state_dict
from gem3d.denoiser import Denoiser
from gem3d.ema import EMA
from gem3d.optim import make_adam
from gem3d.sampling import samplers
from gem3d.training.common import LearningRateRule, image_grid, log_image_grids
from gem3d.training.faults import check_finite_loss

__all__ = ["Gem3dLDM", "FirstStageLatentEncoder"]


class FirstStageLatentEncoder:
    """A frozen first stage as the :class:`gem3d.data.datasets.LatentEncoder` the data module's latent cache
    takes: ``(N, 1, S, S)`` images -> unscaled posterior ``(mean, std)``, in the first stage's chunks; ``key``
    hashes its architecture and weights (16 hex digits), so other weights make another cache."""

    def __init__(self, first_stage):
        self.first_stage = first_stage
        self.scale_factor = float(first_stage.scale_factor)
        self.latent_channels = int(first_stage.latent_channels)  # for the cache's size estimate
        self.downsample_factor = int(first_stage.downsample_factor)
        # the constructor arguments (diffusers' whole config lists sets in a per-process order), without the scale
        # factor: the cache holds unscaled latents
        params = {k: v for k, v in first_stage.architecture()["params"].items()
                  if k not in ("scale_factor", "scaling_factor", "chunk_size")}
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
        for name, tensor in sorted(first_stage.vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.key = digest.hexdigest()[:16]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first_stage.moments(images)


class Gem3dLDM(Denoiser, LearningRateRule, L.LightningModule):
    """GEM-3D latent diffusion training for one variant.

    Args (beside :class:`gem3d.denoiser.Denoiser`'s):
        ckpt_path: stage-1 checkpoint (file, run folder or glob) whose UNet weights initialise a volume stage;
            None trains it from scratch (with a warning). ``ckpt_use_ema``: take its EMA weights.
        use_ema / ema_decay: keep an EMA of the trained UNet parameters (in the checkpoint).
        sample_with_ema: image logging and model loading default to the EMA weights.
        base_learning_rate / scale_lr / weight_decay: AdamW (lr scaled by GPUs x batch x accumulation).
        log_images_every_n_steps: TensorBoard image grids every N steps (0: never).
        sample_steps_for_logging: DDIM steps of the logged sample.
        informed_dropout: probability that a training clip's informed slice is replaced by the null latent, so the
            model also learns the unconditional case that informed-slice guidance needs; 0 (off) as in the original.
        label_loss_weight: W >= 0: the noise error of latent pixels covered by labelled structures (label > 0, the
            fraction of the pixel's footprint) counts 1 + W times (small structures get as much say as the tissue
            around them); 0 (off): plain L2, as the original.
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
        informed_dropout: float = 0.0,
        label_loss_weight: float = 0.0,
        prediction_type: str = "epsilon",
        zero_terminal_snr: bool = False,
        mask_encoding: str = "autoencoder",
        max_label: int | None = None,
    ):
        super().__init__(
            unet_config, first_stage_config, variant=variant, position_embed_dim=position_embed_dim,
            condition_latent_factor=condition_latent_factor, num_train_timesteps=num_train_timesteps,
            beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type,
            zero_terminal_snr=zero_terminal_snr, mask_encoding=mask_encoding, max_label=max_label,
        )  # fmt: skip
        self.save_hyperparameters()
        self.base_learning_rate = float(base_learning_rate)
        self.scale_lr = bool(scale_lr)
        self.learning_rate = float(base_learning_rate)
        self.weight_decay = float(weight_decay)
        self.log_images_every_n_steps = int(log_images_every_n_steps)
        self.sample_steps_for_logging = int(sample_steps_for_logging)
        if not 0.0 <= float(informed_dropout) < 1.0:
            raise ValueError(f"informed_dropout must lie in [0, 1), got {informed_dropout!r}")
        if informed_dropout and not self.spec.use_informed:
            raise ValueError(f"informed_dropout={informed_dropout!r} needs a variant with an informed slice; "
                             f"{variant!r} has none (set it to 0)")
        self.informed_dropout = float(informed_dropout)
        if not float(label_loss_weight) >= 0.0:
            raise ValueError(f"label_loss_weight must be >= 0 (0 = off), got {label_loss_weight!r}")
        if label_loss_weight and self.spec.data_kind == "slice":
            raise ValueError(f"label_loss_weight={label_loss_weight!r} needs a variant with a mask; {variant!r} has "
                             "none (set it to 0)")
        self.label_loss_weight = float(label_loss_weight)

        if ckpt_path is not None:
            if not self.spec.volumetric:
                raise ValueError(
                    f"ckpt_path={ckpt_path!r} is only used by the volume stages (volume_stage, baseline_volume) to load "
                    f"stage-1 UNet weights; variant={variant!r} takes none (set model.params.ckpt_path to null, or use "
                    f"main.py --resume to continue a run)"
                )
            resolved = resolve_checkpoint(ckpt_path, key="model.params.ckpt_path")
            stage1 = load_checkpoint(resolved)
            self._check_same_objective(stage1, resolved)
            self.unet.load_slice_weights(unet_state_dict(stage1, use_ema=ckpt_use_ema))
            weights = "EMA" if ckpt_use_ema else "raw"
            rank_zero_info(f"Loaded the stage-1 UNet weights ({weights}) of {resolved} into the {variant} UNet")
        elif self.spec.volumetric:
            rank_zero_warn(f"variant={variant!r} without ckpt_path: the 2D UNet weights start from scratch")
        if self.spec.volumetric:
            self.unet.freeze_non_volumetric()

        self.ema = EMA(self.unet, decay=ema_decay) if use_ema else None
        self.sample_with_ema = bool(sample_with_ema) and self.ema is not None

    def _check_same_objective(self, checkpoint: Mapping, path) -> None:
        """A volume stage continues its stage 1's UNet: both must predict the same thing on the same schedule, from
        the mask encoded the same way."""
        hparams = checkpoint.get("hyper_parameters") or {}
        theirs = (hparams.get("prediction_type", "epsilon"), bool(hparams.get("zero_terminal_snr", False)))
        ours = (self.prediction_type, self.zero_terminal_snr)
        if theirs != ours:
            raise ValueError(
                f"model.params.ckpt_path={str(path)!r} was trained with prediction_type={theirs[0]!r}, "
                f"zero_terminal_snr={theirs[1]}; this stage has prediction_type={ours[0]!r}, zero_terminal_snr="
                f"{ours[1]}: set model.params.prediction_type / zero_terminal_snr to the stage-1 run's"
            )
        encoding = lambda enc, max_label: (enc, max_label if enc == "label_fractions" else None)  # noqa: E731
        theirs = encoding(hparams.get("mask_encoding", "autoencoder"), hparams.get("max_label"))
        ours = encoding(self.mask_encoding, self.max_label)
        if theirs != ours:
            raise ValueError(
                f"model.params.ckpt_path={str(path)!r} was trained with mask_encoding={theirs[0]!r}, max_label="
                f"{theirs[1]!r}; this stage has mask_encoding={ours[0]!r}, max_label={ours[1]!r}: set "
                "model.params.mask_encoding / max_label to the stage-1 run's"
            )

    def setup(self, stage: str) -> None:
        """Hand the first stage to the data module's latent cache, if it has one: every rank encodes its share of
        the cases (those not cached yet), then they wait for each other once; the batches hold latents and no
        training step runs the encoder. ``python -m gem3d.training.encode`` fills the cache ahead of training."""
        preprocess = getattr(self.trainer.datamodule, "preprocess", None)
        if self.mask_encoding == "label_fractions" and preprocess is not None and preprocess.max_label != self.max_label:
            raise ValueError(f"model.params.max_label={self.max_label} differs from data.params.preprocess.max_label="
                             f"{preprocess.max_label}: the label fractions would read the grey masks wrongly; set "
                             "model.params.max_label: ${data.params.preprocess.max_label}")
        attach = getattr(self.trainer.datamodule, "attach_first_stage", None)
        if attach is None:
            return
        self.first_stage.to(self.trainer.strategy.root_device)
        encoder = FirstStageLatentEncoder(self.first_stage)
        attach(encoder, part=(self.trainer.global_rank, self.trainer.world_size))
        self.trainer.strategy.barrier("gem3d_latent_cache")

    def drop_informed(self, informed_latent: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Informed-slice dropout (training only): each clip's informed latent ``(B, ...)`` becomes the null
        latent with probability ``informed_dropout``."""
        if not self.training or self.informed_dropout <= 0:
            return informed_latent
        gen_device = self.device if generator is None else generator.device
        drop = torch.rand(informed_latent.shape[0], generator=generator, device=gen_device).to(informed_latent.device)
        drop = rearrange(drop < self.informed_dropout, "b -> b" + " 1" * (informed_latent.ndim - 1))
        return torch.where(drop, self.null_informed_latent(informed_latent), informed_latent)

    def encode_batch(self, batch: Mapping, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """A data batch -> ``(z (B, F, z, h, w), cond)`` with ``cond`` from :meth:`condition`.

        Clip batches: ``image``/``mask (B, F, 1, S, S)``, ``informed (B, 1, S, S)``. Slice batches (position
        variant): ``image (B, 1, S, S)``, ``pos (B,)`` -> ``F = 1``. Batches from the latent cache hold the
        scaled latents already: ``latent (B, F, z, h, w)`` (a posterior sample), and for clips ``mask_latent
        (B, F, z, h, w)`` and ``informed_latent (B, z, h, w)`` (posterior means).
        """
        cached = "latent" in batch
        image = batch["latent"] if cached else batch["image"]
        ndim = 5 if cached else 4 if self.spec.data_kind == "slice" else 5
        if image.ndim != ndim:
            layout = "latent (B, F, z, h, w)" if cached else {4: "image (B, 1, S, S)", 5: "image (B, F, 1, S, S)"}[ndim]
            raise ValueError(f"variant {self.variant!r} expects {self.spec.data_kind} batches with {layout}, got "
                             f"{tuple(image.shape)}")
        if cached:
            z = image.to(self.device)
        else:
            images = rearrange(image, "b c h w -> b 1 c h w") if self.spec.data_kind == "slice" else image
            z = self.first_stage.encode(images, sample=True, generator=generator)
        if self.spec.data_kind == "slice":
            return z, self.condition(pos=batch["pos"])
        if cached and self.mask_encoding == "autoencoder":
            mask_latent = batch["mask_latent"].to(self.device)
        else:
            mask_latent = self.encode_mask(batch["mask"].to(self.device))
        informed_latent = None
        if self.spec.use_informed:
            if cached:
                informed_latent = batch["informed_latent"].to(self.device)
            else:
                informed_latent = self.first_stage.encode(batch["informed"], sample=False)
            informed_latent = self.drop_informed(informed_latent, generator)
        return z, self.condition(mask_latent, informed_latent)

    def ema_scope(self, enabled: bool = True) -> ContextManager:
        """Temporarily swap the EMA weights into the UNet (no-op without EMA or when not ``enabled``)."""
        return self.ema.swapped_in(self.unet) if self.ema is not None and enabled else nullcontext()

    def sample_timesteps(self, b: int, f: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps ``(B, F)``: one per clip for the volume variants, one per slice otherwise."""
        n = b if self.spec.volumetric else b * f
        device = self.device if generator is None else generator.device
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device).to(self.device)
        return repeat(t, "b -> b f", f=f) if self.spec.volumetric else rearrange(t, "(b f) -> b f", b=b)

    def loss(self, batch: Mapping, generator: torch.Generator | None = None) -> torch.Tensor:
        """L2 between the predicted and the true noise (or v, :meth:`target`), averaged over all elements (weighted
        by :meth:`label_weights` when ``label_loss_weight`` > 0)."""
        z0, cond = self.encode_batch(batch, generator=generator)
        b, f = z0.shape[:2]
        t = self.sample_timesteps(b, f, generator)
        noise = randn_tensor(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        x_t = self.q_sample(z0, t, noise)
        target = self.target(z0, t, noise)
        if not self.label_loss_weight:
            return F.mse_loss(self.eps(x_t, t, cond), target)
        weights = self.label_weights(batch["mask"], z0.shape[-2:])
        return ((self.eps(x_t, t, cond) - target) ** 2 * weights).mean() / weights.mean()

    def label_weights(self, grey_mask: torch.Tensor, latent_hw) -> torch.Tensor:
        """Grey masks ``(B, F, 1, S, S)`` -> per-latent-pixel loss weights ``(B, F, 1, h, w)``: 1 + W x the fraction
        of the pixel's footprint inside a labelled structure (grey level above background's -1)."""
        labelled = rearrange((grey_mask > -1.0 + 1e-3).float(), "b f 1 s t -> (b f) 1 s t")
        fraction = F.adaptive_avg_pool2d(labelled, tuple(latent_hw))
        weights = 1.0 + self.label_loss_weight * fraction
        return rearrange(weights, "(b f) 1 h w -> b f 1 h w", b=grey_mask.shape[0]).to(self.device)

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        check_finite_loss(self, loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # the EMA follows each optimiser step here, before the callbacks' on_train_batch_end: a checkpoint written
        # there (every_n_train_steps) then holds the EMA of the same step, and a resumed run repeats no update
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.unet)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
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

    @torch.no_grad()
    def log_images(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Image grids ``{tag: (1, H, W) in [0, 1]}`` of the first clip of ``batch`` (real, mask, informed slice, a
        short DDIM sample with eta 1), written to TensorBoard when the logger is one."""
        was_training = self.training
        self.eval()
        try:
            batch = {k: (v[:1].to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            # own generator: logging must not draw from the global RNG (a resumed run would draw other noise)
            z, cond = self.encode_batch(batch, generator=torch.Generator(device=self.device).manual_seed(self.global_step))
            generator = torch.Generator(device=self.device).manual_seed(0)
            x_T = torch.randn(tuple(z.shape), generator=generator, device=self.device)
            schedule = samplers.make_schedule("ddim", self.alphas_cumprod, self.sample_steps_for_logging, eta=1.0,
                                              prediction_type=self.prediction_type)
            with self.ema_scope(self.sample_with_ema):
                latents = samplers.sample(self.model_fn(cond), x_T, schedule, generator=generator)
            sample = self.first_stage.decode_grey(latents)
            if self.spec.data_kind == "slice":  # (1, 1, S, S) slices -> one-frame rows
                real, mask = batch["image"], batch["mask"]
            else:
                real, mask = batch["image"][0], batch["mask"][0]
            grids = {"real": image_grid([real]), "mask": image_grid([mask]), "sample": image_grid([sample[0]])}
            if self.spec.use_informed:
                grids["informed"] = image_grid([batch["informed"]])
            grids["real_vs_sample"] = image_grid([real, sample[0]])
        finally:
            self.train(was_training)
        return log_image_grids(self, grids)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters AdamW updates: the volumetric ones for the volume variants, else the whole UNet."""
        if self.spec.volumetric:
            return list(self.unet.volumetric_parameters())
        return [p for p in self.unet.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError(f"variant {self.variant!r}: no trainable parameters")
        return make_adam("adamw", params, lr=self.learning_rate, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["first_stage_scale_factor"] = float(self.first_stage.scale_factor)
        checkpoint["first_stage_architecture"] = self.first_stage.architecture()
