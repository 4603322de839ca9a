"""12. The optimiser: torch's fused Adam kernel (``gem3d.optim.make_adam``, what every gem3d training uses where
torch has the kernel) against Adam's default loop over the parameters, on the demo's own models.

For each model that ``make demo`` trains: one optimiser step alone (gradients already in place) and one whole
training step (forward, a plain loss, backward, the optimiser step) at the batch the demo config trains with,
loop and fused from the same weights, interleaved. Built from the demo configs (``configs/latent-diffusion/``):
the autoencoder (Adam, all of it, 8 slices of 64x64), stage 1 (AdamW, the whole UNet, one 16-slice clip of 16x16
latents), stage 2 (AdamW, the volumetric layers only, the same clip) and the label-fidelity segmenter (Adam, MONAI
BasicUNet, two 32x48x48 patches).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from common import fmt_seconds, interleaved_medians

from gem3d.config import instantiate_from_config
from gem3d.optim import make_adam
from gem3d.segmentation import SegmenterSettings
from gem3d.segmentation.monai_backend import MonaiSegmenter

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "latent-diffusion"
CLIP, LATENT, LABELS, PATCH = 16, 16, 3, (32, 48, 48)  # the demo's clip, latent side, tumour labels, segmenter patch


def _unet(config: str, device: str):
    params = OmegaConf.load(CONFIGS / f"{config}.yaml").model.params.unet_config
    torch.manual_seed(0)
    unet = instantiate_from_config(OmegaConf.to_container(params, resolve=True)).to(device).train()
    if unet.volumetric:
        unet.freeze_non_volumetric()
    x = torch.randn(CLIP, unet.in_channels, LATENT, LATENT, device=device)
    t = torch.randint(0, 1000, (CLIP,), device=device)
    zero = torch.zeros(CLIP, unet.out_channels, LATENT, LATENT, device=device)
    kwargs = {"num_frames": CLIP} if unet.volumetric else {}
    return unet, lambda: F.mse_loss(unet(x, t, **kwargs), zero)


def _autoencoder(device: str):
    params = OmegaConf.load(CONFIGS / "demo_autoencoder.yaml").model.params.first_stage_config
    torch.manual_seed(0)
    first_stage = instantiate_from_config(OmegaConf.to_container(params, resolve=True)).train()
    vae = first_stage.vae.to(device)
    x = torch.rand(8, 1, 64, 64, device=device) * 2 - 1
    return vae, lambda: F.l1_loss(vae(x).sample, x)


def _segmenter(device: str):
    settings = SegmenterSettings(backend="monai", iterations=1, seed=0, device=device)
    network = MonaiSegmenter(settings, "unused")._build(LABELS)
    image = torch.randn(2, 1, *PATCH, device=device).contiguous(memory_format=torch.channels_last_3d)
    target = torch.rand(2, LABELS + 1, *PATCH, device=device).softmax(1)
    return network.train(), lambda: F.cross_entropy(network(image), target)


MODELS = {  # what -> (builder, Adam kind)
    "demo autoencoder (demo_autoencoder.yaml), batch 8x1x64x64": (_autoencoder, "adam"),
    "demo stage 1 (demo_stage1.yaml), 16x13x16x16": (lambda device: _unet("demo_stage1", device), "adamw"),
    "demo stage 2 (demo_stage2.yaml, volumetric layers), 16x13x16x16":
        (lambda device: _unet("demo_stage2", device), "adamw"),
    "label-fidelity segmenter (MONAI BasicUNet 8-64), 2x1x32x48x48": (_segmenter, "adam"),
}


def bench_optimiser(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    repeats = 5 if quick else 15
    rows = []
    for what, (build, kind) in MODELS.items():
        built = {name: build(device) for name in ("loop", "fused")}  # each builder seeds: the same weights and inputs
        trained = {name: [p for p in model.parameters() if p.requires_grad] for name, (model, _) in built.items()}
        optimisers = {name: make_adam(kind, params, lr=1e-4, fused=name == "fused") for name, params in trained.items()}
        for name, params in trained.items():  # moments allocated before timing: a first step on random gradients
            for p in params:
                p.grad = torch.randn_like(p)
            optimisers[name].step()
        step_alone = interleaved_medians({name: optimisers[name].step for name in built}, 3 * repeats, device)
        whole = interleaved_medians({name: _training_step(optimisers[name], loss)
                                     for name, (_, loss) in built.items()}, repeats, device)
        n = sum(p.numel() for p in trained["loop"])
        for name in built:
            rows.append({"what": f"{what}, {kind} over {n / 1e6:.2f} M parameters ({len(trained[name])} tensors)",
                         "optimiser": name, "optimiser step": fmt_seconds(step_alone[name]),
                         "training step": fmt_seconds(whole[name]),
                         "ratio": "" if name == "loop" else
                         f"{step_alone[name] / step_alone['loop']:.2f}x step, "
                         f"{whole[name] / whole['loop']:.2f}x training step",
                         "repeats": f"{3 * repeats} / {repeats}"})
            print("  " + " | ".join(rows[-1].values()), flush=True)
    notes = ["optimiser step: Adam's update alone, the gradients in place; training step: forward, loss, backward "
             "and the update, at the demo config's batch; the same update up to float rounding "
             "(tests/test_optim.py)"]
    return rows, notes


def _training_step(optimiser, loss):
    def step():
        optimiser.zero_grad(set_to_none=True)
        loss().backward()
        optimiser.step()
    return step
