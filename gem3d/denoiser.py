"""The plain GEM-3D denoiser: UNet + frozen first stage + conditioning + noise schedule, and ``eps`` (the model
output: the noise, as GEM-3D, or the velocity v for ``prediction_type="v_prediction"``).

Sampling needs nothing else; the training LightningModules (:mod:`gem3d.training`) wrap it. One class serves the
five :data:`VARIANTS`: ``slice_stage`` (2D, concat condition ``[noisy | mask | informed]``, one timestep per
slice), ``volume_stage`` (volumetric layers, one timestep per clip), ``position`` (single slices, cross-attention on
the slice position), ``baseline_slice`` / ``baseline_volume`` (the first two without the informed slice).

Latents: the target is the first stage's posterior sample times ``scale_factor``; the conditions (mask slices,
informed slice) are the posterior mean at the same scale, as in the original's ``get_input`` (docs/method.md §3).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from einops import rearrange
from torch import nn

from gem3d.config import instantiate_from_config, to_plain
from gem3d.models.conditioning import MASK_ENCODINGS, concat_condition, label_fractions, position_embedding
from gem3d.sampling.schedule import alphas_cumprod_tensor, model_target, validate_prediction

__all__ = ["VARIANTS", "VariantSpec", "Denoiser"]


@dataclass(frozen=True)
class VariantSpec:
    """What a variant means: conditioning, informed slice or not, UNet type, data kind."""

    conditioning: str  # "concat" | "crossattn"
    use_informed: bool
    volumetric: bool  # volumetric layers (the only ones trained), one timestep per clip
    data_kind: str  # "clip" | "slice"


VARIANTS: dict[str, VariantSpec] = {
    "slice_stage": VariantSpec("concat", True, False, "clip"),
    "volume_stage": VariantSpec("concat", True, True, "clip"),
    "position": VariantSpec("crossattn", False, False, "slice"),
    "baseline_slice": VariantSpec("concat", False, False, "clip"),
    "baseline_volume": VariantSpec("concat", False, True, "clip"),
}


class Denoiser(nn.Module):
    """GEM-3D's denoiser for one of :data:`VARIANTS` (eps-prediction, or v-prediction beyond the paper).

    Args:
        unet_config: ``{target, params}`` of :class:`gem3d.models.unet.UNetModel`.
        first_stage_config: ``{target, params}`` building a :class:`gem3d.models.autoencoder.FirstStage`; frozen.
        position_embed_dim: width of the position embedding (default: the UNet's ``context_dim``).
        condition_latent_factor: multiplier of the conditioning latents; 1 for every model gem3d knows, other
            values are for experiments only.
        num_train_timesteps / beta_start / beta_end: the schedule (linear in sqrt, docs/method.md §3).
        prediction_type: what the UNet predicts, ``"epsilon"`` (the noise; GEM-3D and every original checkpoint) or
            ``"v_prediction"`` (``v = sqrt(a) eps - sqrt(1 - a) x0``); the samplers read it from here.
        zero_terminal_snr: the betas rescaled so that ``alphas_cumprod[T - 1] = 0`` (Lin et al. 2023); needs
            ``prediction_type="v_prediction"``.
        mask_encoding: how the grey mask becomes its condition, one of :data:`MASK_ENCODINGS`: ``"autoencoder"``
            (the paper and every original checkpoint: ``z`` channels) or ``"label_fractions"`` (each label's share
            of every latent pixel, ``max_label + 2`` channels; beyond the paper, docs/mask-true.md).
        max_label: the largest label (the preprocessing's ``max_label``); needed by ``"label_fractions"``.
    """

    def __init__(
        self,
        unet_config: Mapping,
        first_stage_config: Mapping,
        variant: str = "slice_stage",
        position_embed_dim: int | None = None,
        condition_latent_factor: float = 1.0,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: str = "epsilon",
        zero_terminal_snr: bool = False,
        mask_encoding: str = "autoencoder",
        max_label: int | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not supported; allowed: {sorted(VARIANTS)}")
        validate_prediction(prediction_type, zero_terminal_snr)
        if mask_encoding not in MASK_ENCODINGS:
            raise ValueError(f"mask_encoding={mask_encoding!r} is not supported; allowed: {list(MASK_ENCODINGS)}")
        if mask_encoding == "label_fractions" and (max_label is None or int(max_label) != max_label or max_label < 1):
            raise ValueError(f"mask_encoding='label_fractions' needs max_label, the largest label (a positive integer, "
                             f"the preprocessing's max_label), got max_label={max_label!r}")
        unet_config, first_stage_config = to_plain(unet_config), to_plain(first_stage_config)
        self.mask_encoding, self.max_label = mask_encoding, None if max_label is None else int(max_label)
        self.denoiser_kwargs = {
            "unet_config": unet_config, "first_stage_config": first_stage_config, "variant": variant,
            "position_embed_dim": position_embed_dim, "condition_latent_factor": float(condition_latent_factor),
            "num_train_timesteps": int(num_train_timesteps), "beta_start": float(beta_start), "beta_end": float(beta_end),
            "prediction_type": prediction_type, "zero_terminal_snr": bool(zero_terminal_snr),
            "mask_encoding": mask_encoding, "max_label": self.max_label,
        }  # fmt: skip
        self.prediction_type = prediction_type
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.variant = variant
        self.spec = VARIANTS[variant]
        self.condition_latent_factor = float(condition_latent_factor)
        self.first_stage = instantiate_from_config(first_stage_config)
        self.first_stage.freeze()
        self.unet = instantiate_from_config(unet_config)
        self._check_unet_fits_variant(int(self.first_stage.latent_channels), position_embed_dim)
        self.position_embed_dim = position_embed_dim or self.unet.context_dim
        self.num_train_timesteps = int(num_train_timesteps)
        alphas_cumprod = alphas_cumprod_tensor(self.num_train_timesteps, beta_start, beta_end, self.zero_terminal_snr)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping) -> Denoiser:
        """A denoiser from a superset of its kwargs (e.g. a training run's hyper-parameters)."""
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return cls(**{k: v for k, v in dict(kwargs).items() if k in names})

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def mask_channels(self) -> int:
        """Channels of the mask's condition: the latent's, or one per level (outside, tissue, labels)."""
        return int(self.first_stage.latent_channels) if self.mask_encoding == "autoencoder" else self.max_label + 2

    def _check_unet_fits_variant(self, latent_channels: int, position_embed_dim: int | None) -> None:
        spec, unet = self.spec, self.unet
        concat = self.mask_channels + latent_channels * int(spec.use_informed)
        conditions = {"concat": concat, "crossattn": 0}[spec.conditioning]
        layout = {"concat": f"noisy {latent_channels} + mask {self.mask_channels} ({self.mask_encoding})"
                            + (f" + informed {latent_channels}" if spec.use_informed else ""), "crossattn": "noisy"}
        expected = {"in_channels": latent_channels + conditions, "out_channels": latent_channels,
                    "volumetric": spec.volumetric}
        for key, value in expected.items():
            if getattr(unet, key) != value:
                raise ValueError(
                    f"unet_config.params.{key}={getattr(unet, key)!r} does not fit variant={self.variant!r}: expected "
                    f"{value!r} ({layout[spec.conditioning]} channels)"
                )
        if spec.conditioning != "crossattn":
            return
        if not unet.use_spatial_transformer:
            raise ValueError(
                f"variant={self.variant!r} needs unet_config.params.use_spatial_transformer=true and a context_dim, "
                "got use_spatial_transformer=False"
            )
        if position_embed_dim is not None and position_embed_dim != unet.context_dim:
            raise ValueError(
                f"position_embed_dim={position_embed_dim!r} must equal unet context_dim={unet.context_dim!r}"
            )

    @torch.no_grad()
    def encode_mask(self, grey: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
                    progress: bool = False) -> torch.Tensor:
        """Grey masks ``(N, 1, S, S)`` or clips ``(B, F, 1, S, S)`` -> the mask's condition ``(..., mask_channels,
        h, w)`` by :attr:`mask_encoding`: the scaled posterior mean through the first stage (a posterior draw with
        ``sample``), or :func:`~gem3d.models.conditioning.label_fractions`."""
        if self.mask_encoding == "label_fractions":
            return label_fractions(grey.to(self.device), self.max_label, int(self.first_stage.downsample_factor))
        return self.first_stage.encode(grey, sample=sample, generator=generator, progress=progress)

    def condition(
        self,
        mask_latent: torch.Tensor | None = None,
        informed_latent: torch.Tensor | None = None,
        pos: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The conditioning of a batch of clips for :meth:`eps`: ``{"concat": (B, F, Cc, h, w) | None, "context":
        (B, D) | None}`` from scaled latents ``mask_latent (B, F, z, h, w)`` and ``informed_latent (B, z, h, w)`` (one
        for every slice of a clip) or ``(B, F, z, h, w)``, or from slice positions ``pos (B,)`` in [0, 1]."""
        spec = self.spec
        if spec.conditioning == "crossattn":
            if pos is None:
                raise ValueError(f"variant {self.variant!r} needs pos (relative slice positions in [0, 1])")
            pos = torch.as_tensor(pos, dtype=torch.float32, device=self.device).reshape(-1)
            return {"concat": None, "context": position_embedding(pos, self.position_embed_dim).to(self.device)}
        if mask_latent is None:
            raise ValueError(f"variant {self.variant!r} needs mask_latent (B, F, z, h, w)")
        if mask_latent.shape[-3] != self.mask_channels:
            raise ValueError(f"mask_latent has {mask_latent.shape[-3]} channels; mask_encoding={self.mask_encoding!r} "
                             f"gives {self.mask_channels} (encode masks with Denoiser.encode_mask)")
        if spec.use_informed and informed_latent is None:
            raise ValueError(f"variant {self.variant!r} needs informed_latent (B, z, h, w) or (B, F, z, h, w)")
        if not spec.use_informed and informed_latent is not None:
            raise ValueError(f"variant {self.variant!r} is mask-only; informed_latent must be None")
        factor = self.condition_latent_factor
        informed = None if informed_latent is None else informed_latent * factor
        return {"concat": concat_condition(mask_latent * factor, informed), "context": None}

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        """The model output (noise, or v for ``prediction_type="v_prediction"``) for clips ``x (B, F, z, h, w)`` at
        timesteps ``t`` ``(B,)`` (per clip) or ``(B, F)`` (per slice; not for the volume variants) -> ``(B, F, z,
        h, w)``. ``cond`` from :meth:`condition`."""
        if x.ndim != 5:
            raise ValueError(f"x must be clips (B, F, z, h, w), got shape {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).long()
        if t.ndim == 2:
            if self.spec.volumetric and not bool((t == t[:, :1]).all()):
                raise ValueError("the volume variants take one timestep per clip; got different timesteps within a clip")
            t = rearrange(t, "b f -> (b f)")
        h = x if cond.get("concat") is None else torch.cat([x, cond["concat"].to(x.dtype)], dim=2)
        context = cond.get("context")
        return self.unet(h, t, context=None if context is None else context.to(x.dtype))

    forward = eps

    def model_fn(self, cond: Mapping[str, torch.Tensor | None], null_cond: Mapping[str, torch.Tensor | None] | None = None,
                 guidance: float = 1.0):
        """``eps_fn(x (B, F, z, h, w), t (B,))`` with ``cond`` bound in: the samplers' denoiser (its output is
        :attr:`prediction_type`'s). With ``guidance != 1`` and ``null_cond`` (the condition with
        :meth:`null_informed_latent`) it is informed-slice guidance, ``eps_null + guidance * (eps_informed -
        eps_null)``, from one batched UNet call (the same combination of v outputs: v is linear in eps at fixed x)."""
        if guidance == 1.0 or null_cond is None:
            return lambda x, t: self.eps(x, t, cond)
        both = {k: None if v is None else torch.cat([null_cond[k], v]) for k, v in cond.items()}

        def guided_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(t, device=x.device)
            eps_null, eps_informed = self.eps(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return eps_null + guidance * (eps_informed - eps_null)

        return guided_eps

    @staticmethod
    def null_informed_latent(informed_latent: torch.Tensor) -> torch.Tensor:
        """The "no informed slice" latent (zeros) that informed-slice dropout trains and guidance contrasts with."""
        return torch.zeros_like(informed_latent)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising ``sqrt(a_t) z0 + sqrt(1 - a_t) noise`` with ``t (B, F)``."""
        a = rearrange(self.alphas_cumprod.to(z0.device)[t].to(z0.dtype), "b f -> b f 1 1 1")
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def target(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What :meth:`eps` learns for :meth:`q_sample` ``(z0, t (B, F), noise)``: ``noise`` (epsilon, the very
        tensor) or ``v = sqrt(a_t) noise - sqrt(1 - a_t) z0`` (v_prediction)."""
        if self.prediction_type == "epsilon":
            return noise
        a = self.alphas_cumprod.to(z0.device)[t].to(z0.dtype)
        return model_target(z0, noise, a, self.prediction_type)

    def architecture(self) -> dict[str, Any]:
        """The constructor kwargs that rebuild this denoiser from its weights alone (no checkpoint paths)."""
        return {**self.denoiser_kwargs, "first_stage_config": self.first_stage.architecture()}
