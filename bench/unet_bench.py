"""1. UNet forward and forward + backward at the paper's and the demo's configs, against diffusers and MONAI.

Peers are built to the stage-1 widths, depth and attention levels (they have no volumetric layers); the
stage-2 rows compare the volumetric UNet with gem3d's stage 1 measured in the same interleaved run.
"""
from __future__ import annotations

import copy
import gc
import time

import torch

from common import count_flops, fmt_bytes, fmt_seconds, interleaved_medians, peak_memory
from peers import CONFIGS, LATENT_SIZE, PEERS, parameters_m

from gem3d.models.unet import UNetModel

OURS_1, OURS_2 = "gem3d stage 1", "gem3d stage 2"


def build(size: str, device: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    models = {OURS_1: UNetModel(**CONFIGS[f"{size} stage 1"]), OURS_2: UNetModel(**CONFIGS[f"{size} stage 2"])}
    models.update({name: make(CONFIGS[f"{size} stage 1"]) for name, make in PEERS.items()})
    return {name: model.to(device) for name, model in models.items()}


def caller(name: str, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor):
    if name == OURS_2:
        return lambda: model(x, t, num_frames=x.shape[0])
    if name.startswith("gem3d"):
        return lambda: model(x, t)
    if name.startswith("diffusers"):
        return lambda: model(x, t).sample
    return lambda: model(x, timesteps=t)


def forward_fn(name, model, x, t):
    call = caller(name, model, x, t)

    def run():
        model.eval()
        with torch.no_grad():
            return call()
    return run


def train_fn(name, model, x, t):
    call = caller(name, model, x, t)

    def run():
        model.train()
        call().float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return run


def flops(size: str, slices: int) -> dict[str, tuple[int, int]]:
    """(forward, forward + backward) FLOPs per model, counted on the meta device."""
    with torch.device("meta"):
        models = build(size, "meta")
        x = torch.randn(slices, 12, LATENT_SIZE[size], LATENT_SIZE[size])
        t = torch.full((slices,), 500)
    out = {}
    for name, model in models.items():
        forward = count_flops(forward_fn(name, model, x, t))
        out[name] = (forward, count_flops(train_fn(name, model, x, t)))
    return out


def clip_flops_note() -> str:
    """The FLOPs of the paper's stage-2 UNet on one 16-slice clip of 64x64 latents (counted on the meta device, so
    the same on every machine): what a GPU step costs, whatever the slices this run could afford."""
    with torch.device("meta"):
        unet = UNetModel(**CONFIGS["paper stage 2"])
        x = torch.randn(16, 12, LATENT_SIZE["paper"], LATENT_SIZE["paper"])
        t = torch.full((16,), 500)
    forward = count_flops(forward_fn(OURS_2, unet, x, t))
    step = count_flops(train_fn(OURS_2, unet, x, t))
    return (f"Paper stage 2 on one 16-slice clip of 64x64 latents (counted by torch.utils.flop_counter on the meta "
            f"device): forward {forward / 1e12:.2f} TFLOP, forward + backward {step / 1e12:.2f} TFLOP.")


def bench_unet(device: str, quick: bool, sizes=("demo", "paper")) -> tuple[list[dict], list[str]]:
    rows = []
    for size in sizes:
        slices = 1 if size == "paper" and device == "cpu" else 16
        repeats = {"demo": (5, 3), "paper": (3, 0)}[size] if quick else (10, 5)
        counted = flops(size, slices)
        models = build(size, device)
        hw = LATENT_SIZE[size]
        x = torch.randn(slices, 12, hw, hw, device=device)
        t = torch.full((slices,), 500, device=device)
        shape = f"{slices}x12x{hw}x{hw}"
        modes = (("forward", forward_fn, repeats[0], 0), ("forward+backward", train_fn, repeats[1], 1))
        for mode, make, reps, index in modes:
            fns = {name: make(name, model, x, t) for name, model in models.items()}
            if mode == "forward" and size == "demo":  # warm-up (first-call caches); else the memory call warms up
                for fn in fns.values():
                    fn()
            memory, once = {}, {}
            for name, fn in fns.items():
                t0 = time.perf_counter()
                memory[name] = peak_memory(fn, device)[0]
                once[name] = time.perf_counter() - t0
            print(f"  [{size} {mode}] peak memory: " + ", ".join(f"{n} {fmt_bytes(m)}" for n, m in memory.items()),
                  flush=True)
            seconds = interleaved_medians(fns, reps, device, warmup=0) if reps else once  # reps 0: the one timed call
            for name in fns:
                ratio = []
                if name == OURS_1:
                    ratio = [f"{seconds[name] / seconds[p]:.2f}x time, {memory[name] / memory[p]:.2f}x memory of {p}"
                             for p in PEERS]
                elif name == OURS_2:
                    ratio = [f"{seconds[name] / seconds[OURS_1]:.2f}x time of {OURS_1}",
                             f"{seconds[name] / seconds[next(iter(PEERS))]:.2f}x time of {next(iter(PEERS))}"]
                rows.append({
                    "what": f"UNet {mode}, {size} config, {shape}",
                    "variant": f"{name} ({parameters_m(models[name]):.1f} M)",
                    "time": fmt_seconds(seconds[name]), "peak memory": fmt_bytes(memory[name]),
                    "FLOP/s": f"{counted[name][index] / seconds[name] / 1e9:.0f} GFLOP/s "
                              f"({counted[name][index] / 1e9:.0f} GFLOP)",
                    "ratio": "; ".join(ratio), "repeats": str(reps or 1),
                })
                print("  " + " | ".join(rows[-1].values()), flush=True)
        del models
        gc.collect()
    notes = [clip_flops_note()]
    if any(row["repeats"] == "1" for row in rows):
        notes.append("Rows with 1 repeat time one call per model, one model after the other (the peak-memory call): "
                     "a load that changes during the section changes their ratios, so read those as rough; the rows "
                     "with more repeats are interleaved medians.")
    return rows, notes


def bench_compile(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    """Opt-in (``--only compile``): ``torch.compile`` of gem3d's demo stage-1 UNet, forward, against eager."""
    torch.manual_seed(0)
    eager = UNetModel(**CONFIGS["demo stage 1"]).to(device).eval()
    compiled = torch.compile(eager)
    hw = LATENT_SIZE["demo"]
    x = torch.randn(16, 12, hw, hw, device=device)
    t = torch.full((16,), 500, device=device)
    with torch.no_grad():
        t0 = time.perf_counter()
        difference = (compiled(x, t) - eager(x, t)).abs().max().item()
        compile_seconds = time.perf_counter() - t0
        seconds = interleaved_medians({"eager": lambda: eager(x, t), "compiled": lambda: compiled(x, t)}, 7, device)
    rows = [{"what": f"UNet forward, demo config, 16x12x{hw}x{hw}", "variant": name, "time": fmt_seconds(s),
             "ratio": f"{s / seconds['eager']:.2f}x eager"} for name, s in seconds.items()]
    return rows, [f"Compilation (first call): {compile_seconds:.0f} s; max |compiled - eager| = {difference:.2g}."]


def bench_unet_paper(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    """Opt-in (``--only unet_paper``): the paper's stage-1 forward only, gem3d vs both peers, 2 slices on the CPU
    and more repeats than section 1 (the target row, with less noise)."""
    slices = 2 if device == "cpu" else 16
    torch.manual_seed(0)
    config = CONFIGS["paper stage 1"]
    models = {OURS_1: UNetModel(**config), **{name: make(config) for name, make in PEERS.items()}}
    models = {name: model.to(device) for name, model in models.items()}
    hw = LATENT_SIZE["paper"]
    x = torch.randn(slices, 12, hw, hw, device=device)
    t = torch.full((slices,), 500, device=device)
    fns = {name: forward_fn(name, model, x, t) for name, model in models.items()}
    memory = {name: peak_memory(fn, device)[0] for name, fn in fns.items()}  # also the warm-up
    repeats = 5
    seconds = interleaved_medians(fns, repeats, device, warmup=0)
    ours = "; ".join(f"{seconds[OURS_1] / seconds[p]:.2f}x time, {memory[OURS_1] / memory[p]:.2f}x memory of {p}"
                     for p in PEERS)
    rows = [{"what": f"UNet forward, paper stage 1, {slices}x12x{hw}x{hw}", "variant": name, "time": fmt_seconds(s),
             "peak memory": fmt_bytes(memory[name]), "ratio": ours if name == OURS_1 else "",
             "repeats": str(repeats)}
            for name, s in seconds.items()]
    return rows, []


def bench_channels_last(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    """The UNet forward with the weights and input in ``torch.channels_last`` against the default (contiguous)
    format, at the demo's and the paper's stage-1 / stage-2 widths (CPU: 1 paper slice)."""
    rows = []
    for size, name in (("demo", OURS_1), ("demo", OURS_2), ("paper", OURS_1), ("paper", OURS_2)):
        slices = 1 if size == "paper" and device == "cpu" else 16
        torch.manual_seed(0)
        stage = name.removeprefix("gem3d ")  # "stage 1" / "stage 2"
        model = UNetModel(**CONFIGS[f"{size} {stage}"]).to(device).eval()
        hw = LATENT_SIZE[size]
        x = torch.randn(slices, 12, hw, hw, device=device)
        t = torch.full((slices,), 500, device=device)
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        fns = {"contiguous": forward_fn(name, model, x, t),
               "channels_last": forward_fn(name, last, x.contiguous(memory_format=torch.channels_last), t)}
        difference = (fns["channels_last"]() - fns["contiguous"]()).abs().max().item()
        repeats = (15 if size == "demo" else 3) if quick else (31 if size == "demo" else 5)
        seconds = interleaved_medians(fns, repeats, device, warmup=0)
        for variant, s in seconds.items():
            rows.append({"what": f"UNet forward, {size} {stage}, {slices}x12x{hw}x{hw}",
                         "variant": variant, "time": fmt_seconds(s),
                         "ratio": f"{s / seconds['contiguous']:.2f}x contiguous" if variant != "contiguous" else "",
                         "max abs difference": f"{difference:.1g}" if variant != "contiguous" else "",
                         "repeats": str(repeats)})
            print("  " + " | ".join(rows[-1].values()), flush=True)
        del model, last
        gc.collect()
    return rows, []
