"""Training the first stage: a LightningModule around :class:`gem3d.models.autoencoder.FirstStage`
(L1 reconstruction + KL). Its runs load as a first stage with ``FirstStage.from_run``."""

from __future__ import annotations

from typing import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from gem3d.config import instantiate_from_config, to_plain
from gem3d.optim import make_adam
from gem3d.training.common import LearningRateRule, image_grid, log_image_grids
from gem3d.training.faults import check_finite_loss

__all__ = ["AutoencoderModule"]


class AutoencoderModule(LearningRateRule, L.LightningModule):
    """Trains a :class:`FirstStage` on single slices: L1 reconstruction + ``kl_weight`` x KL.

    Args:
        first_stage_config: ``{target, params}`` of the FirstStage (kept in the checkpoint for ``FirstStage.from_run``).
        kl_weight: weight of the KL term (1e-6 as latent-diffusion's KL autoencoders).
        sample_posterior: decode a posterior sample (True) or the mean.
        include_masks: also reconstruct the grey masks of the batch (the same encoder encodes them later).
        scale_factor: latent scale; ``"auto"`` = 1 / running std of the training latents (``scale_by_std``).
        base_learning_rate / scale_lr: Adam lr as in :class:`Gem3dLDM`; ``betas``: Adam's (latent-diffusion's
            autoencoders use (0.5, 0.9), made for their GAN loss; a plain reconstruction trains faster with (0.9, 0.999)).
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
        betas: tuple[float, float] = (0.5, 0.9),
    ):
        super().__init__()
        first_stage_config = to_plain(first_stage_config)
        if not (scale_factor == "auto" or (isinstance(scale_factor, (int, float)) and scale_factor > 0)):
            raise ValueError(f"scale_factor must be 'auto' or a positive number, got {scale_factor!r}")
        if len(betas) != 2 or not all(0 <= float(b) < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
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
        check_finite_loss(self, loss, batch_idx)
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
        grid = {"inputs_reconstructions": image_grid([x, recon])}
        return log_image_grids(self, grid)

    def configure_optimizers(self):
        return make_adam("adam", self.first_stage.parameters(), lr=self.learning_rate,
                         betas=tuple(self.hparams.betas))
