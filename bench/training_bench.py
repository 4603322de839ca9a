"""3. One training step (UNet forward + backward + AdamW) at demo and paper size: fp32 vs bf16 autocast (what
Lightning's ``precision: bf16-mixed`` does), gradient checkpointing on vs off. With ``--quick`` on a CPU without bf16
instructions the paper-size rows are fp32 only (emulated bf16 takes minutes a step there).

The step is the denoiser's: latents in, noise-prediction MSE, backward, AdamW over what the stage trains (all of
the UNet for stage 1; only the volumetric layers for stage 2). The frozen first-stage encoding of the batch is
not included (no gradients; its cost is in section 2). Paper size on the CPU: 1 slice instead of a 16-slice clip,
one step per variant.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from common import GiB, cpu_has_bf16, fmt_bytes, fmt_seconds, peak_memory, sync
from peers import CONFIGS, LATENT_SIZE

from gem3d.models.unet import TimestepEmbedSequential, UNetModel


MEASURED: dict[tuple, float] = {}  # (size, stage, precision, checkpointing) -> step seconds per slice (section 4)


def set_checkpointing(unet: UNetModel, enabled: bool) -> None:
    for module in unet.modules():
        if isinstance(module, TimestepEmbedSequential):
            module.use_checkpoint = enabled


def make_step(unet: UNetModel, optimizer, x, t, frames: int | None, precision: str, device: str):
    kwargs = {"num_frames": frames} if frames else {}
    noise = torch.randn(x.shape[0], 4, *x.shape[2:], device=device)

    def step():
        autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            loss = F.mse_loss(unet(x, t, **kwargs).float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_training(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for size in ("demo", "paper"):
        slices = 1 if size == "paper" and device == "cpu" else 16
        hw = LATENT_SIZE[size]
        for stage in (1, 2):
            torch.manual_seed(0)
            unet = UNetModel(**CONFIGS[f"{size} stage {stage}"]).to(device).train()
            if stage == 2:
                unet.freeze_non_volumetric()
            trainable = [p for p in unet.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-5)
            x = torch.randn(slices, 12, hw, hw, device=device)
            t = torch.full((slices,), 500, device=device)
            frames = slices if stage == 2 else None
            n_train = sum(p.numel() for p in trainable)
            for param in trainable:  # AdamW state allocated before measuring (a zero-gradient step)
                param.grad = torch.zeros_like(param)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if size == "demo":  # warm-up
                make_step(unet, optimizer, x, t, frames, "fp32", device)()
            results = {}
            for precision in precisions(size, device, quick):
                for checkpointing in (False, True):
                    set_checkpointing(unet, checkpointing)
                    step = make_step(unet, optimizer, x, t, frames, precision, device)
                    t0 = time.perf_counter()
                    memory, _ = peak_memory(step, device)
                    seconds = time.perf_counter() - t0
                    if size == "demo":  # cheap: median of 3 more
                        times = []
                        for _ in range(2 if quick else 5):
                            t0 = time.perf_counter()
                            step()
                            sync(device)
                            times.append(time.perf_counter() - t0)
                        seconds = sorted(times + [seconds])[len(times) // 2 + 0]
                    results[precision, checkpointing] = (seconds, memory)
                    MEASURED[size, stage, precision, checkpointing] = seconds / slices
                    reference = results["fp32", False]
                    rows.append({
                        "what": f"{size} stage {stage}, {slices}x12x{hw}x{hw}, {n_train / 1e6:.1f} M trained",
                        "precision": precision, "checkpointing": "on" if checkpointing else "off",
                        "step time": fmt_seconds(seconds), "peak memory": fmt_bytes(memory),
                        "ratio": f"{seconds / reference[0]:.2f}x time, {memory / reference[1]:.2f}x memory of fp32 off",
                        "repeats": "3" if size == "demo" else "1",
                    })
                    print("  " + " | ".join(rows[-1].values()), flush=True)
            if size == "paper" and stage == 2:
                notes += paper_stage2_estimate(unet, n_train, results, slices)
            del unet, optimizer
    if precisions("paper", device, quick) == ("fp32",):
        notes.append("bf16 at paper size not timed: --quick on a CPU without bf16 instructions (no avx512_bf16 or "
                     "amx_bf16 in /proc/cpuinfo), where torch emulates bf16 and one paper-size step takes minutes; "
                     "the demo rows show the emulation's cost. Without --quick, or on a GPU, both precisions run.")
    return rows, notes


def precisions(size: str, device: str, quick: bool) -> tuple[str, ...]:
    """The precisions timed: fp32 and bf16, except fp32 alone at paper size with ``quick`` on a CPU without bf16
    instructions."""
    if quick and size == "paper" and not str(device).startswith("cuda") and not cpu_has_bf16():
        return ("fp32",)
    return ("fp32", "bf16")


def paper_stage2_estimate(unet: UNetModel, n_train: int, results: dict, slices: int) -> list[str]:
    """What stage 2 at the paper's size (one 16-slice clip per GPU) needs, from the measured step memory."""
    n_all = sum(p.numel() for p in unet.parameters())
    weights = 4 * n_all
    grads_and_adam = 3 * 4 * n_train  # grads + two AdamW moments, fp32
    notes = [f"Paper stage 2: {n_all / 1e6:.1f} M parameters ({fmt_bytes(weights)} fp32), {n_train / 1e6:.1f} M "
             f"trained (gradients + AdamW moments {fmt_bytes(grads_and_adam)}). Activations per slice = the step's "
             "peak above the "
             "held weights and optimizer state, less the gradients (and autocast's cached bf16 copies of the trained "
             "weights); from one CPU step on 1 slice, so a rough figure (RSS-based, single run)."]
    for (precision, checkpointing), (_, memory) in sorted(results.items()):
        copies = 2 * n_train if precision == "bf16" else 0  # autocast caches bf16 copies of trainable weights only
        per_slice = (memory - 4 * n_train - copies) / slices  # the step's peak less gradients and copies: activations
        need = weights + grads_and_adam + copies + 16 * per_slice
        notes.append(f"{precision}, checkpointing {'on' if checkpointing else 'off'}: activations "
                     f"{fmt_bytes(per_slice)} per slice (measured on {slices} slice(s)) -> one 16-slice clip needs "
                     f"about {need / GiB:.1f} GiB on one GPU (weights + gradients + AdamW moments + bf16 copies + 16 x "
                     "activations per slice, linear).")
    return notes
