"""10. The volumetric layers' temporal convolution: as gem3d runs it, against a measured alternative.

gem3d's ``TemporalConv`` (gem3d/models/unet.py) applies ``Conv1d(C, C, 3, padding=1)`` across the F slices of a
clip at every position: the features ``(B*F, C, H, W)`` are rearranged to ``(B*H*W, C, F)`` and back, two permuting
copies per layer. The alternative computes the same thing without the permutes: three 1x1 ``conv2d``s with the
kernel's three taps on the ``(B*F, C, H, W)`` features, the outer two shifted by one frame and summed. Both run on
the same weights (a random kernel, not the identity it starts as), interleaved; the table gives their medians, the
ratio and the largest difference of their outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from common import fmt_seconds, interleaved_medians

from gem3d.models.unet import TemporalConv

SHAPES = {  # (frames, channels, side): where the layer runs
    "paper stage 2, level 1, 2 frames (the CPU rows of sections 1-3)": (2, 224, 64),
    "paper stage 2, level 3, 2 frames": (2, 672, 16),
    "paper stage 2, level 1, a 16-slice clip": (16, 224, 64),
    "demo stage 2, level 1, a 16-slice clip": (16, 32, 16),
}


def shifted_taps(layer: TemporalConv, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The same output as ``layer(x, num_frames)``, ``(B*F, C, H, W)``, from three 1x1 convolutions: tap k of the
    kernel weighs frame ``f + k - 1`` (zero outside the clip)."""
    weight, bias = layer.temporal_conv.weight, layer.temporal_conv.bias
    taps = [F.conv2d(x, rearrange(weight[:, :, k], "o i -> o i 1 1")) for k in range(3)]
    before, centre, after = (rearrange(tap, "(b f) c h w -> b f c h w", f=num_frames) for tap in taps)
    out = centre + rearrange(bias, "c -> 1 1 c 1 1")
    out[:, 1:] += before[:, :-1]
    out[:, :-1] += after[:, 1:]
    return rearrange(out, "b f c h w -> (b f) c h w")


def bench_temporal_conv(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    rows = []
    repeats = 5 if quick else 15
    for what, (frames, channels, side) in SHAPES.items():
        torch.manual_seed(0)
        layer = TemporalConv(channels).to(device).eval()
        torch.nn.init.normal_(layer.temporal_conv.weight, std=channels**-0.5)
        torch.nn.init.normal_(layer.temporal_conv.bias)
        x = torch.randn(frames, channels, side, side, device=device)
        with torch.no_grad():
            difference = (shifted_taps(layer, x, frames) - layer(x, frames)).abs().max().item()
            seconds = interleaved_medians({"Conv1d on (B*H*W, C, F)": lambda: layer(x, frames),
                                           "three shifted 1x1 conv2d": lambda: shifted_taps(layer, x, frames)},
                                          repeats, device)
        reference = seconds["Conv1d on (B*H*W, C, F)"]
        for variant, s in seconds.items():
            rows.append({"where": what, "shape": f"{frames}x{channels}x{side}x{side}", "variant": variant,
                         "time": fmt_seconds(s), "ratio": f"{s / reference:.2f}x Conv1d",
                         "max abs difference": f"{difference:.1g}" if variant != "Conv1d on (B*H*W, C, F)" else "",
                         "repeats": str(repeats)})
            print("  " + " | ".join(rows[-1].values()), flush=True)
    notes = ["gem3d runs the Conv1d; the alternative is measured here, not used. Either way the layer keeps the "
             "original's parameter names and shapes, so checkpoints would load unchanged."]
    return rows, notes
