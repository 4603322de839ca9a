"""2. Volume synthesis end to end (load, propagate, decode, write) for the original recipe and gem3d's.

Demo size: one 48-slice 64x64 volume (the demo's UNet and autoencoder configs, random weights). Paper size on the
CPU: one window of 512x512 slices (the paper's stage-2 UNet, latent-diffusion's KL-f8): one sampling step on 2 slices
and one decoded slice, extrapolated to 16 slices per recipe (said in each row). UNet evaluations are counted by a hook
on the UNet (calls, and slices through it) and, for a 155-slice volume, from the propagation plan. Everything runs on
the benchmark's ``--device``; on a GPU each phase's clock is read after the device's queue has drained.
"""
from __future__ import annotations

import dataclasses
import io
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from common import fmt_bytes, fmt_seconds, peak_memory, sync
from peers import CONFIGS

from gem3d.training.ldm import Gem3dLDM
from gem3d.export.nifti import save_nifti
from gem3d.models.precision import default_precision, sampling_precision
from gem3d.inference.cli import load_inference_config
from gem3d.inference.volume import SamplerOptions, decode_volume, encode_slices, sample_volume_latents
from gem3d.sampling.propagation import plan_windows, window_rounds

DEMO_STEPS = int(load_inference_config("demo")["sampler"]["steps"])
RECIPES = {  # name: (options, what it is)
    "original": (SamplerOptions(steps=200, eta=1.0, batch_directions=False),
                 "DDIM 200, eta 1, one direction at a time"),
    "gem3d default": (SamplerOptions(), "DDIM 200, eta 1, both directions in one call (SamplerOptions())"),
    "demo steps": (SamplerOptions(steps=DEMO_STEPS), f"DDIM {DEMO_STEPS}, eta 1, both directions, from pure noise "
                   "(the steps of gem3d/configs/inference/demo.yaml, not its informed_start)"),
    "fastest": (SamplerOptions(sampler="dpmpp", steps=10), "DPM-Solver++ 10, both directions"),
}
DEMO_FIRST_STAGE = {"target": "gem3d.models.autoencoder.FirstStage.from_diffusers_config",
                    "params": {"in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64, 64],
                               "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 64,
                               "mid_block_add_attention": False}}
PAPER_FIRST_STAGE = {"target": "gem3d.models.autoencoder.FirstStage.from_ldm_config", "params": {}}


def build_model(size: str, device: str) -> Gem3dLDM:
    unet = {"target": "gem3d.models.unet.UNetModel", "params": CONFIGS[f"{size} stage 2"]}
    first_stage = DEMO_FIRST_STAGE if size == "demo" else PAPER_FIRST_STAGE
    torch.manual_seed(0)
    with warnings.catch_warnings():  # "volume stage without ckpt_path": random weights on purpose
        warnings.simplefilter("ignore", UserWarning)
        model = Gem3dLDM(unet_config=unet, first_stage_config=first_stage, variant="volume_stage", use_ema=False,
                         sample_with_ema=False)
    return model.to(device).eval()


class EvaluationCounter:
    """Counts UNet calls and the slices that go through them (a forward pre-hook)."""

    def __init__(self, unet: torch.nn.Module):
        self.calls = self.slices = 0
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1
        x = args[0]
        self.slices += int(x.shape[0] * x.shape[1]) if x.ndim == 5 else int(x.shape[0])  # clips (B, F, ...) or rows


def planned_calls(num_slices: int, start: int, options: SamplerOptions) -> tuple[int, int]:
    """(UNet calls, slice evaluations) of one volume from the propagation plan: steps x (rounds or windows)."""
    up, down = plan_windows(num_slices, start, options.window, options.overlap)
    rounds = window_rounds(up, down) if options.batch_directions else [[w] for w in up + down]
    slices = sum(options.window * len(r) for r in rounds)
    return options.steps * len(rounds), options.steps * slices


def end_to_end(model: Gem3dLDM, state: bytes, grey_mask: torch.Tensor, informed_index: int, options: SamplerOptions,
               decode_slices: int | None, device: str, out: Path) -> dict:
    """Seconds per phase and the UNet calls of one run (each phase timed up to the end of its device work)."""
    seconds = {}
    sync(device)
    t0 = time.perf_counter()
    model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    sync(device)
    seconds["load"] = time.perf_counter() - t0
    counter = EvaluationCounter(model.unet)
    try:
        t0 = time.perf_counter()
        mask_latent = encode_slices(model, grey_mask)
        informed = mask_latent[informed_index].clone()  # stands in for the encoded real slice (same cost)
        sync(device)
        seconds["encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        latents = sample_volume_latents(model, mask_latent, informed, informed_index, options, generator)
        sync(device)
        seconds["propagate"] = time.perf_counter() - t0
    finally:
        counter.handle.remove()
    t0 = time.perf_counter()
    volume = decode_volume(model, latents[:decode_slices]).cpu().numpy()
    seconds["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_nifti(np.ascontiguousarray(volume.transpose(1, 2, 0)), np.eye(4), out / "volume.nii.gz")
    seconds["write"] = time.perf_counter() - t0
    return {"seconds": seconds, "calls": counter.calls, "slices": counter.slices}


def bench_volume(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    tmp = Path(tempfile.mkdtemp(prefix="gem3d-bench-"))
    # ---------------------------------------------------------------- demo: one whole 48-slice volume
    model = build_model("demo", device)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    state = buffer.getvalue()
    num_slices, informed_index = 48, 24
    grey_mask = torch.rand(num_slices, 64, 64, device=device)
    scale_steps = 10  # the 200-step recipes are timed at 10 steps and scaled by 20 (the per-step cost is constant)
    measured = {}
    for name, (options, what) in RECIPES.items():
        run_options = options
        if options.steps > 50:
            run_options = dataclasses.replace(options, steps=scale_steps)
        memory, result = peak_memory(
            lambda: end_to_end(model, state, grey_mask, informed_index, run_options, None, device, tmp), device)
        factor = options.steps / run_options.steps
        s = result["seconds"]
        total = sum(s.values()) + s["propagate"] * (factor - 1)
        measured[name] = total
        rows.append({
            "what": "demo volume, 48x64x64", "recipe": f"{name}: {what}",
            "UNet calls (slice evaluations)": f"{result['calls'] * factor:.0f} ({result['slices'] * factor:.0f})",
            "seconds": f"{total:.1f} s" + (f" (propagation timed at {run_options.steps} steps, x{factor:.0f})"
                                           if factor != 1 else ""),
            "load / encode / propagate / decode / write": " / ".join(
                fmt_seconds(v * (factor if k == "propagate" else 1)) for k, v in s.items()),
            "peak memory": fmt_bytes(memory), "ratio": "",
        })
        print("  " + " | ".join(rows[-1].values()), flush=True)
    for row, name in zip(rows, RECIPES):
        row["ratio"] = f"{measured[name] / measured['original']:.3f}x original"
    del model
    # ---------------------------------------------------------------- paper: one 16-slice window, one step
    model = build_model("paper", device)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    state = buffer.getvalue()
    del buffer
    window = 16
    measured_slices, decoded = (2, 1) if device == "cpu" else (16, 16)  # CPU: 2 slices through the UNet, 1 decoded
    grey_mask = torch.rand(measured_slices, 512, 512, device=device)
    one_step = SamplerOptions(steps=1, batch_directions=False, window=measured_slices)
    memory, result = peak_memory(lambda: end_to_end(model, state, grey_mask, 0, one_step, decoded, device, tmp), device)
    s = result["seconds"]
    notes.append(
        f"Paper window measured: {measured_slices} slices of 64x64 latents ({result['calls']} UNet call of "
        f"{result['slices']} slices, extrapolated linearly to a 16-slice window): load {fmt_seconds(s['load'])}, "
        f"mask encode of {measured_slices} slices at 512x512 {fmt_seconds(s['encode'])}, one sampling step "
        f"{fmt_seconds(s['propagate'])}, decode of {decoded} slice(s) at 512x512 {fmt_seconds(s['decode'])}, write "
        f"{fmt_seconds(s['write'])}; peak memory {fmt_bytes(memory)} (weights held before the call are not counted).")
    step_seconds = s["propagate"] * window / measured_slices  # per 16-slice UNet call (linear in slices)
    decode_per_slice = s["decode"] / decoded
    encode_per_slice = s["encode"] / measured_slices
    for name, (options, what) in RECIPES.items():
        window_calls = options.steps
        calls, slices = planned_calls(155, 77, options)
        volume_seconds = slices / window * step_seconds + 155 * (encode_per_slice + decode_per_slice)
        window_seconds = (s["load"] + window_calls * step_seconds + window * (encode_per_slice + decode_per_slice)
                          + s["write"])
        rows.append({
            "what": "paper: one 16x512x512 window; a 155-slice brain volume", "recipe": f"{name}: {what}",
            "UNet calls (slice evaluations)":
                f"window {window_calls} ({window_calls * window}); volume {calls} ({slices})",
            "seconds": f"window {window_seconds:.0f} s; "
                       f"volume {volume_seconds / 60:.0f} min (extrapolated from 1 step on {measured_slices} slices, "
                       f"{decoded} decoded slice(s))",
            "load / encode / propagate / decode / write": "",
            "peak memory": f"{fmt_bytes(memory)} (measured run)", "ratio": "",
        })
        print("  " + " | ".join(rows[-1].values()), flush=True)
    if device != "cpu":  # a GPU: whole 155-slice volumes for the recipes of <= 50 steps, at the default precision
        grey_mask = torch.rand(155, 512, 512, device=device)
        for name, (options, what) in RECIPES.items():
            if options.steps > 50:
                continue
            with sampling_precision("auto"):
                memory, result = peak_memory(
                    lambda: end_to_end(model, state, grey_mask, 77, options, None, device, tmp), device)
            rows.append({
                "what": "paper: one 155x512x512 volume, measured", "recipe": f"{name}: {what}, precision "
                f"{default_precision(device)}",
                "UNet calls (slice evaluations)": f"{result['calls']} ({result['slices']})",
                "seconds": f"{sum(result['seconds'].values()):.1f} s",
                "load / encode / propagate / decode / write": " / ".join(
                    fmt_seconds(v) for v in result["seconds"].values()),
                "peak memory": fmt_bytes(memory), "ratio": "",
            })
            print("  " + " | ".join(rows[-1].values()), flush=True)
    original_calls = planned_calls(155, 77, RECIPES["original"][0])
    for row, (name, (options, _)) in zip(rows[len(RECIPES):2 * len(RECIPES)], RECIPES.items()):
        calls, slices = planned_calls(155, 77, options)
        row["ratio"] = (f"{calls / original_calls[0]:.3f}x the original's UNet calls, "
                        f"{slices / original_calls[1]:.3f}x its slice evaluations")
    return rows, notes
