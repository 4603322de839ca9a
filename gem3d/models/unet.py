"""The GEM-3D denoiser: the ADM / latent-diffusion "openaimodel" UNet, optionally volumetric (docs/method.md §3, §7).

:class:`UNetModel` covers the slice denoisers (concat conditioning with ``AttentionBlock``, or the position model's
``SpatialTransformer`` cross-attending to a context) and stage 2 (``volumetric=True``: temporal layers across the
slices, identity at initialisation). Parameter names equal the original's ``model.diffusion_model.*`` (prefix
stripped), so its weights load strictly. A volumetric model sees ``N = B*F`` rows, clip-major.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from gem3d.checkpoint import load_weights
from gem3d.config import check_keys
from gem3d.models.conditioning import timestep_embedding
from gem3d.models.precision import denoiser_autocast

__all__ = ["UNetModel", "UNetConfig", "is_volumetric_parameter_name"]

NORM_GROUPS = 32


def is_volumetric_parameter_name(name: str) -> bool:
    """True for the names of the volumetric (temporal) layers: a ``*_tem`` component or ``temporal_conv``."""
    return any(part.endswith("_tem") or part == "temporal_conv" for part in name.split("."))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups computed in float32 (input and affine parameters), returned in the input's dtype."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(NORM_GROUPS, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.type(x.dtype)


def pointwise(conv: nn.Conv1d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``Conv1d`` (the original's names and shapes) applied as one GEMM to channels-last tokens
    ``(N, T, C_in) -> (N, T, C_out)``."""
    return F.linear(tokens, rearrange(conv.weight, "o i 1 -> o i"), conv.bias)


def self_attention(tokens: torch.Tensor, norm: nn.GroupNorm, qkv: nn.Conv1d, proj_out: nn.Conv1d, heads: int) -> torch.Tensor:
    """``tokens + proj_out(attention(qkv(norm(tokens))))`` for ``tokens (N, C, T)``; returns ``(N, C, T)``.

    The original's *legacy* head order: ``qkv`` splits into heads first, then into q, k, v of ``C/heads`` each. The
    head dimension stays innermost, so SDPA can take a fused kernel.
    """
    qkv_tokens = pointwise(qkv, rearrange(norm(tokens), "n c t -> n t c"))
    q, k, v = rearrange(qkv_tokens, "n t (h three d) -> three n h t d", h=heads, three=3)
    attended = rearrange(F.scaled_dot_product_attention(q, k, v), "n h t d -> n t (h d)")
    return tokens + rearrange(pointwise(proj_out, attended), "n t c -> n c t")


class TemporalConv(nn.Module):
    """Temporal ``Conv1d(C, C, 3, padding=1)`` across the slices at every position, replacing its input (no
    residual); identity at initialisation (Dirac weight, zero bias). ``(B*F, C, H, W) -> (B*F, C, H, W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.temporal_conv = nn.Conv1d(channels, channels, 3, padding=1)
        nn.init.dirac_(self.temporal_conv.weight)
        nn.init.zeros_(self.temporal_conv.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        height, width = x.shape[-2:]
        y = self.temporal_conv(rearrange(x, "(b f) c h w -> (b h w) c f", f=num_frames))
        return rearrange(y, "(b h w) c f -> (b f) c h w", h=height, w=width)


def temporal(layer: TemporalConv | None, x: torch.Tensor, num_frames: int | None) -> torch.Tensor:
    """``layer(x, num_frames)``, or ``x`` where a 2D model has no temporal layer (None)."""
    return x if layer is None else layer(x, num_frames)


class ResBlock(nn.Module):
    """ADM residual block, the time embedding added as a per-channel bias (no scale-shift)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, volumetric: bool):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.in_layers_tem = TemporalConv(out_channels) if volumetric else None
        self.out_layers_tem = TemporalConv(out_channels) if volumetric else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        h = temporal(self.in_layers_tem, self.in_layers(x), num_frames)
        h = h + rearrange(self.emb_layers(emb).type(h.dtype), "n c -> n c 1 1")
        h = temporal(self.out_layers_tem, self.out_layers(h), num_frames)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, then, when volumetric, over the F slices at every position (reusing
    ``norm``): ``(N, C, H, W) -> (N, C, H, W)``."""

    def __init__(self, channels: int, heads: int, volumetric: bool):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        self.volumetric = volumetric
        if volumetric:
            self.qkv_tem = nn.Conv1d(channels, 3 * channels, 1)
            self.proj_out_tem = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = self_attention(rearrange(x, "n c h w -> n c (h w)"), self.norm, self.qkv, self.proj_out, self.heads)
        out = rearrange(tokens, "n c (h w) -> n c h w", h=height, w=width)
        if self.volumetric:
            seq = rearrange(out, "(b f) c h w -> (b h w) c f", f=num_frames)
            seq = self_attention(seq, self.norm, self.qkv_tem, self.proj_out_tem, self.heads)
            out = rearrange(seq, "(b h w) c f -> (b f) c h w", h=height, w=width)
        return out


class BasicTransformerBlock(nn.Module):
    """Pre-norm: ``x += attn1(norm1 x)``; ``x += attn2(norm2 x, context)``; ``x += ff(norm3 x)`` (GEGLU), with
    diffusers' ``Attention`` and ``FeedForward``: the original's parameter names, registered in its order."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn="geglu")
        self.attn2 = Attention(dim, context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6) -> 1x1 ``proj_in`` -> transformer blocks over H*W tokens -> zero 1x1 ``proj_out``, residual.
    ``x (N, C, H, W)``, ``context (N, L, context_dim)`` -> ``(N, C, H, W)``."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm32(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)]
        )
        self.proj_out = zero_module(nn.Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = rearrange(self.proj_in(self.norm(x)), "n c h w -> n (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context)
        h = rearrange(h, "n (h w) c -> n c h w", h=height, w=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """``op``: conv 3x3 stride 2 padding 1 (+ ``op_tem`` when volumetric)."""

    def __init__(self, channels: int, volumetric: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.op_tem = TemporalConv(channels) if volumetric else None

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        return temporal(self.op_tem, self.op(x), num_frames)


class Upsample(nn.Module):
    """Nearest x2 then ``conv`` 3x3 (+ ``conv_tem`` when volumetric)."""

    def __init__(self, channels: int, volumetric: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_tem = TemporalConv(channels) if volumetric else None

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        return temporal(self.conv_tem, self.conv(F.interpolate(x, scale_factor=2, mode="nearest")), num_frames)


class TimestepEmbedSequential(nn.ModuleList):
    """A UNet block: runs its layers in order, handing each the inputs it needs (emb, context, num_frames).
    With ``use_checkpoint`` the whole block is recomputed in the backward pass (training only)."""

    def __init__(self, layers: Iterable[nn.Module], use_checkpoint: bool = False):
        super().__init__(layers)
        self.use_checkpoint = use_checkpoint

    def _run(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, num_frames: int | None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, (AttentionBlock, TemporalConv, Downsample, Upsample)):
                x = layer(x, num_frames)
            else:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None, num_frames: int | None = None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._run, x, emb, context, num_frames, use_reentrant=False)
        return self._run(x, emb, context, num_frames)


@dataclass(frozen=True)
class UNetConfig:
    """:class:`UNetModel`'s hyperparameters, with the original latent-diffusion names; validated on construction.

    Args:
        in_channels: noisy latent + concat condition (e.g. 12 = 4 + 4 mask + 4 informed).
        channel_mult: width multiplier per level (a Downsample between levels).
        num_res_blocks: ResBlocks per level on the way down (``+1`` on the way up).
        attention_resolutions: downsample rates (1, 2, 4, ...) whose levels get attention.
        num_head_channels: channels per head; -1 to use a fixed ``num_heads``.
        context_dim: cross-attention context width (required with ``use_spatial_transformer``).
        volumetric: add the temporal layers of GEM-3D stage 2 (identity at initialisation).

    Sequences are stored as tuples; ``UNetModel(**dataclasses.asdict(config))`` rebuilds a model.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_head_channels: int = 32
    num_heads: int = -1
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    use_checkpoint: bool = False
    dropout: float = 0.0
    volumetric: bool = False

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "transformer_depth"):
            self._set(name, _positive_int(name, getattr(self, name)))
        if isinstance(self.channel_mult, (str, bytes)) or not self.channel_mult or any(int(m) < 1 for m in self.channel_mult):
            raise ValueError(f"UNetModel: channel_mult must be a non-empty list of positive integers, got {self.channel_mult!r}")
        self._set("channel_mult", tuple(int(m) for m in self.channel_mult))
        self._set("attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        for name in ("use_spatial_transformer", "use_checkpoint", "volumetric"):
            self._set(name, bool(getattr(self, name)))
        self._set("dropout", float(self.dropout))
        self._set("num_head_channels", int(self.num_head_channels))
        self._set("num_heads", int(self.num_heads) if not isinstance(self.num_heads, bool) else self.num_heads)
        widths = sorted({self.model_channels * m for m in self.channel_mult})
        bad = [w for w in widths if w % NORM_GROUPS]
        if bad:
            raise ValueError(
                f"UNetModel: every level width model_channels * mult must be divisible by the {NORM_GROUPS} GroupNorm "
                f"groups; model_channels={self.model_channels}, channel_mult={list(self.channel_mult)} give widths "
                f"{widths} (not divisible: {bad}); use a model_channels that is a multiple of {NORM_GROUPS}"
            )
        reachable = [2**level for level in range(len(self.channel_mult))]
        unreachable = [r for r in self.attention_resolutions if r not in reachable]
        if unreachable:
            raise ValueError(
                f"UNetModel: attention_resolutions are downsample rates; {unreachable} is not one of the rates "
                f"{reachable} reached with channel_mult={list(self.channel_mult)}"
            )
        if self.num_head_channels == -1:
            name, divisor = "num_heads", _positive_int("num_heads", self.num_heads)
        else:
            divisor = _positive_int("num_head_channels (or -1 to use num_heads)", self.num_head_channels)
            name = "num_head_channels"
        bad = [w for w in widths if w % divisor]
        if bad:
            raise ValueError(
                f"UNetModel: level widths {bad} are not divisible by {name}={divisor} (all widths: {widths})"
            )
        if self.use_spatial_transformer:
            if self.context_dim is None:
                raise ValueError("UNetModel: use_spatial_transformer=True needs context_dim (the cross-attention context width)")
            self._set("context_dim", _positive_int("context_dim", self.context_dim))
            if self.volumetric:
                raise ValueError(
                    "UNetModel: volumetric=True is defined for AttentionBlock UNets only (use_spatial_transformer=False); "
                    "the original pseudo-3D UNet has no temporal layers for spatial transformers"
                )
        elif self.context_dim is not None:
            raise ValueError(
                f"UNetModel: context_dim={self.context_dim!r} is only used by the spatial transformer; "
                "set use_spatial_transformer=True or context_dim=None"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetModel: dropout must be in [0, 1), got {self.dropout!r}")

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"UNetModel: {name} must be a positive integer, got {value!r}")
    return int(value)


def per_row(value: torch.Tensor, name: str, rows: int, clips: int | None) -> torch.Tensor:
    """``value`` with one entry per input row; one per clip ``(B, ...)`` is repeated over the clip's slices."""
    if clips is not None and value.shape[0] == clips != rows:
        value = repeat(value, "b ... -> (b f) ...", f=rows // clips)
    if value.shape[0] != rows:
        clip_note = "" if clips is None else f" ({clips} clips)"
        raise ValueError(f"UNetModel: {name} has {value.shape[0]} rows, the input has {rows}{clip_note}")
    return value


CONFIG_FIELDS = frozenset(f.name for f in fields(UNetConfig))


class UNetModel(nn.Module):
    """ADM / latent-diffusion UNet; 2D slice denoiser, optionally with volumetric (temporal) layers.

    ``UNetModel(**params)`` takes the keywords of :class:`UNetConfig` (the original's names, so YAML configs and
    checkpoints load unchanged). The hyperparameters live in ``model.config`` and read as attributes.
    """

    def __init__(self, **params):
        super().__init__()
        check_keys(params, CONFIG_FIELDS, "UNetModel's hyperparameters")
        self.config = UNetConfig(**params)
        mc = self.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def block(*layers: nn.Module) -> TimestepEmbedSequential:
            return TimestepEmbedSequential(layers, use_checkpoint=self.use_checkpoint)

        def attention(channels: int) -> nn.Module:
            heads = self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels
            if self.use_spatial_transformer:
                dim_head, depth = channels // heads, self.transformer_depth
                return SpatialTransformer(channels, heads, dim_head, depth, self.context_dim, self.dropout)
            return AttentionBlock(channels, heads, self.volumetric)

        def resblock(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, self.dropout, self.volumetric)

        first = [nn.Conv2d(self.in_channels, mc, 3, padding=1)]
        if self.volumetric:
            first.append(TemporalConv(mc))
        self.input_blocks = nn.ModuleList([block(*first)])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(block(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(block(Downsample(ch, self.volumetric)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = block(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch, self.volumetric))
                    ds //= 2
                self.output_blocks.append(block(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )
        self.out_tem = TemporalConv(self.out_channels) if self.volumetric else None

    def __getattr__(self, name: str):
        config = self.__dict__.get("config")
        if config is not None and name in CONFIG_FIELDS:  # hyperparameters are read from the one config
            return getattr(config, name)
        return super().__getattr__(name)

    def volumetric_parameters(self) -> Iterator[nn.Parameter]:
        """The temporal-layer parameters (what stage 2 trains)."""
        return (param for name, param in self.named_parameters() if is_volumetric_parameter_name(name))

    def freeze_non_volumetric(self) -> None:
        """``requires_grad = False`` for every 2D parameter, True for the temporal ones (stage-2 training)."""
        for name, param in self.named_parameters():
            param.requires_grad_(is_volumetric_parameter_name(name))

    def load_slice_weights(self, state_dict_2d: Mapping[str, torch.Tensor]) -> None:
        """Load a 2D (slice) UNet's weights; temporal layers keep their current (identity) values.
        A missing 2D tensor raises KeyError, a shape that differs ValueError; other keys are ignored."""
        own = self.state_dict()
        wanted = [k for k in own if not is_volumetric_parameter_name(k)]
        missing = [k for k in wanted if k not in state_dict_2d]
        if missing:
            raise KeyError(
                f"load_slice_weights: {len(missing)} slice (2D) tensors are missing from the state dict, e.g. "
                f"{missing[:8]}; got {len(state_dict_2d)} keys such as {list(state_dict_2d)[:4]}"
            )
        load_weights(self, {**own, **{k: state_dict_2d[k] for k in wanted}}, "load_slice_weights")

    def _prepare_context(self, context: torch.Tensor | None, rows: int, clips: int | None) -> torch.Tensor | None:
        if not self.use_spatial_transformer:
            if context is not None:
                raise ValueError("UNetModel: got a context, but this model has no spatial transformer (use_spatial_transformer=False)")
            return None
        if context is None:
            raise ValueError(f"UNetModel: this model cross-attends to a context of width {self.context_dim}; got context=None")
        if context.ndim == 2:
            context = rearrange(context, "n d -> n 1 d")
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"UNetModel: context must be (N, L, {self.context_dim}) or (N, {self.context_dim}), "
                f"got shape {tuple(context.shape)}"
            )
        return per_row(context, "context", rows, clips)

    @staticmethod
    def _prepare_timesteps(timesteps: torch.Tensor | float | int, rows: int, clips: int | None, device) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=device)
        if timesteps.ndim == 0:
            timesteps = repeat(timesteps, " -> n", n=rows)
        if timesteps.ndim != 1:
            raise ValueError(f"UNetModel: timesteps must be a scalar or 1-D, got shape {tuple(timesteps.shape)}")
        return per_row(timesteps, "timesteps", rows, clips)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float | int,
        context: torch.Tensor | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        """The model output (eps) for noisy inputs ``x (N, C_in, H, W)``, H and W divisible by ``2 ** (levels - 1)``.

        A volumetric model takes ``N = B*F`` rows clip-major with ``num_frames=F``, or clips ``(B, F, C_in, H, W)``
        (returned as ``(B, F, C_out, H, W)``). ``timesteps``: ``(N,)``, ``(B,)`` for clips, or a scalar.
        ``context``: ``(N, L, D)`` or ``(N, D)`` (one token); one per clip ``(B, ...)`` is repeated.
        """
        clips: int | None = None
        five_d = x.ndim == 5
        if five_d:
            clips, frames = x.shape[:2]
            if num_frames is not None and num_frames != frames:
                raise ValueError(f"UNetModel: num_frames={num_frames} disagrees with the 5-D input's F={frames}")
            num_frames = frames
            x = rearrange(x, "b f c h w -> (b f) c h w")
        elif x.ndim != 4:
            raise ValueError(f"UNetModel: x must be (N,C,H,W) or (B,F,C,H,W), got shape {tuple(x.shape)}")
        rows, channels, height, width = x.shape
        if channels != self.in_channels:
            raise ValueError(f"UNetModel: x has {channels} channels, the model expects in_channels={self.in_channels}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"UNetModel: spatial size {height}x{width} must be divisible by {factor} "
                f"(2 ** (levels - 1) for channel_mult={list(self.channel_mult)})"
            )
        if not self.volumetric:
            num_frames = None
        elif num_frames is None:
            raise ValueError("UNetModel (volumetric): a volumetric layer needs num_frames (slices per clip), got None")
        elif num_frames < 1 or rows % num_frames:
            raise ValueError(
                f"UNetModel (volumetric): {rows} rows are not a whole number of clips of num_frames={num_frames}"
            )
        else:
            clips = rows // num_frames

        timesteps = self._prepare_timesteps(timesteps, rows, clips, x.device)
        context = self._prepare_context(context, rows, clips)
        with denoiser_autocast(x.device):  # gem3d.models.precision.sampling_precision; a no-op by default
            h = self._unet(x, timesteps, context, num_frames)
        h = h.type(x.dtype)  # float32 out of a reduced-precision scope: the sampler's arithmetic stays float32
        if five_d:
            h = rearrange(h, "(b f) c h w -> b f c h w", b=clips)
        return h

    def _unet(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None, frames: int | None) -> torch.Tensor:
        """The network proper on validated inputs: ``(N, C_in, H, W) -> (N, C_out, H, W)``."""
        t_emb = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)
        h = x
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, context, frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, frames)
        for module in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = module(h, emb, context, frames)
        return temporal(self.out_tem, self.out(h), frames)
