"""gem3d benchmarks: print figures and rewrite BENCHMARKS.md (never timed assertions in tests).

Every comparison runs side by side in one process and is reported as a ratio:

- ``unet``: gem3d's UNet forward vs diffusers' ``UNet2DModel`` of the same widths (same input, same device);
- ``volumetric``: the volumetric (stage-2) UNet vs the slice (stage-1) UNet on one clip;
- ``sampling``: seconds per volume at 200 / 50 / 25 DDIM steps and DPM-Solver++ 25 steps, and batched vs
  unbatched directions, on a tiny random GEM-3D model (the cost structure, not the quality).

    python bench/run_all.py [--device cuda] [--quick] [--only unet,sampling]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def timed(fn, repeats: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup``."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tiny_unet_kwargs(in_channels: int, volumetric: bool = False) -> dict:
    return dict(in_channels=in_channels, out_channels=4, model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=2,
                attention_resolutions=[4], num_head_channels=32, volumetric=volumetric)


@torch.no_grad()
def bench_unet(device: str, quick: bool) -> list[tuple[str, str, str, str]]:
    """gem3d UNet vs diffusers UNet2DModel with the same widths, 16 slices of 12x32x32 latents."""
    from diffusers import UNet2DModel

    from gem3d.models.unet import UNetModel

    ours = UNetModel(**tiny_unet_kwargs(12)).to(device).eval()
    peer = UNet2DModel(
        in_channels=12, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=32, norm_num_groups=32,
    ).to(device).eval()
    x = torch.randn(16, 12, 32, 32, device=device)
    t = torch.full((16,), 500, device=device)
    repeats = 3 if quick else 10
    a = timed(lambda: ours(x, t), repeats, device=device)
    b = timed(lambda: peer(x, t), repeats, device=device)
    n_ours = sum(p.numel() for p in ours.parameters()) / 1e6
    n_peer = sum(p.numel() for p in peer.parameters()) / 1e6
    return [("UNet forward, 16x12x32x32", f"gem3d UNetModel ({n_ours:.1f} M)", f"{a * 1e3:.1f} ms",
             f"{a / b:.2f}x diffusers UNet2DModel ({n_peer:.1f} M, {b * 1e3:.1f} ms)")]


@torch.no_grad()
def bench_volumetric(device: str, quick: bool) -> list[tuple[str, str, str, str]]:
    from gem3d.models.unet import UNetModel

    slice_unet = UNetModel(**tiny_unet_kwargs(12)).to(device).eval()
    volume_unet = UNetModel(**tiny_unet_kwargs(12, volumetric=True)).to(device).eval()
    x = torch.randn(16, 12, 32, 32, device=device)
    t = torch.full((16,), 500, device=device)
    repeats = 3 if quick else 10
    a = timed(lambda: volume_unet(x, t, num_frames=16), repeats, device=device)
    b = timed(lambda: slice_unet(x, t), repeats, device=device)
    return [("volumetric layers, 1 clip x 16 slices", "stage-2 UNet", f"{a * 1e3:.1f} ms",
             f"{a / b:.2f}x the stage-1 UNet ({b * 1e3:.1f} ms)")]


def _tiny_volume_model(device: str):
    from gem3d.diffusion import Gem3dLDM

    model = Gem3dLDM(
        unet_config={"target": "gem3d.models.unet.UNetModel", "params": tiny_unet_kwargs(12, volumetric=True)},
        first_stage_config={"target": "gem3d.models.autoencoder.FirstStage.from_diffusers_config",
                            "params": {"block_out_channels": [32, 32, 32], "layers_per_block": 1, "latent_channels": 4,
                                       "norm_num_groups": 32, "mid_block_add_attention": False}},
        variant="volume_stage", use_ema=False, sample_with_ema=False,
    )
    return model.to(device).eval()


@torch.no_grad()
def bench_sampling(device: str, quick: bool) -> list[tuple[str, str, str, str]]:
    """Seconds per 48-slice volume (latents 4x16x16) on a tiny random model."""
    from gem3d.inference.volume import SamplerOptions, sample_volume_latents

    model = _tiny_volume_model(device)
    num_slices, (c, h, w) = 48, (4, 16, 16)
    mask_latent = torch.randn(num_slices, c, h, w, device=device)
    informed = torch.randn(c, h, w, device=device)

    def seconds(**options) -> float:
        opts = SamplerOptions(**options)

        def run():
            sample_volume_latents(model, mask_latent, informed, 20, opts, torch.Generator().manual_seed(0))

        return timed(run, 1, warmup=0, device=device)

    rows = []
    base_steps = 50 if quick else 200
    reference = seconds(steps=base_steps)
    rows.append((f"volume, 48 slices, DDIM {base_steps}", "batched directions", f"{reference:.2f} s", "1.00x"))
    for label, options in (("DDIM 50", dict(steps=50)), ("DDIM 25", dict(steps=25)),
                           ("DPM-Solver++ 25", dict(sampler="dpmpp", steps=25)),
                           (f"DDIM {base_steps}, unbatched directions", dict(steps=base_steps, batch_directions=False))):
        if quick and label == "DDIM 50":
            continue
        s = seconds(**options)
        rows.append((f"volume, 48 slices, {label}", "", f"{s:.2f} s", f"{s / reference:.2f}x DDIM {base_steps} batched"))
    return rows


BENCHES = {"unet": bench_unet, "volumetric": bench_volumetric, "sampling": bench_sampling}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {list(BENCHES)}")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    rows = []
    for name in names:
        print(f"[bench] {name} on {args.device} ...", flush=True)
        for row in BENCHES[name](args.device, args.quick):
            print("  " + " | ".join(row), flush=True)
            rows.append(row)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name()}"
    lines = [
        "# gem3d benchmarks",
        "",
        "Written by `python bench/run_all.py` (`make bench`). Each ratio compares two things measured side by side in",
        "the same run. Random tiny models: these figures describe cost, not sample quality.",
        "",
        f"Device: `{args.device}` ({machine}); {'quick' if args.quick else 'full'} run, {time.strftime('%Y-%m-%d')}.",
        "GPU figures: `python bench/run_all.py --device cuda` on a GPU machine (none measured yet)."
        if not args.device.startswith("cuda") else "",
        "",
        "| what | variant | time | ratio |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
