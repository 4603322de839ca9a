"""UNet configurations of the benchmarks and the peer UNets built to the same widths, depth and attention levels.

``CONFIGS`` holds gem3d ``UNetModel`` keyword sets: the paper's stage-1 / stage-2 UNets
(configs/latent-diffusion/brain_stage{1,2}.yaml) and the demo's (configs/latent-diffusion/demo_stage{1,2}.yaml).
Peers: diffusers ``UNet2DModel`` and MONAI ``DiffusionModelUNet`` (2D, no conditioning) with the same level widths
``model_channels * mult``, ``num_res_blocks`` per level, attention at the same downsample rates, the same
channels per head, and SDPA attention where the peer offers it.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch import nn  # noqa: E402

PAPER = dict(in_channels=12, out_channels=4, model_channels=224, channel_mult=[1, 2, 3, 4], num_res_blocks=2,
             attention_resolutions=[8, 4, 2], num_head_channels=32)
DEMO = dict(in_channels=12, out_channels=4, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
            attention_resolutions=[4], num_head_channels=32)
CONFIGS = {
    "paper stage 1": dict(PAPER),
    "paper stage 2": dict(PAPER, volumetric=True),
    "demo stage 1": dict(DEMO),
    "demo stage 2": dict(DEMO, volumetric=True),
}
LATENT_SIZE = {"paper": 64, "demo": 16}  # latent H = W: 512 / 8 (KL-f8) for the paper, 64 / 4 for the demo


def widths_and_attention(config: dict) -> tuple[list[int], list[bool]]:
    """Level widths and which levels attend (downsample rate 2**level in ``attention_resolutions``)."""
    widths = [config["model_channels"] * m for m in config["channel_mult"]]
    return widths, [2**level in config["attention_resolutions"] for level in range(len(widths))]


def diffusers_unet(config: dict) -> nn.Module:
    from diffusers import UNet2DModel

    widths, attends = widths_and_attention(config)
    return UNet2DModel(
        in_channels=config["in_channels"], out_channels=config["out_channels"], block_out_channels=tuple(widths),
        layers_per_block=config["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        attention_head_dim=config["num_head_channels"], norm_num_groups=32,
    )


def monai_unet(config: dict) -> nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    widths, attends = widths_and_attention(config)
    return DiffusionModelUNet(
        spatial_dims=2, in_channels=config["in_channels"], out_channels=config["out_channels"],
        num_res_blocks=config["num_res_blocks"], channels=widths, attention_levels=attends,
        num_head_channels=config["num_head_channels"], norm_num_groups=32, use_flash_attention=True,
    )


PEERS = {"diffusers UNet2DModel": diffusers_unet, "MONAI DiffusionModelUNet": monai_unet}


def parameters_m(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6
