"""Benchmark: a diffusion training step with the first-stage latent cache vs encoding every batch.

- demo scale: the demo stage-1 model (``configs/latent-diffusion/demo_stage1.yaml``: f = 4 autoencoder, 12-channel
  UNet) on one 16-slice clip of 64x64 slices: the whole training step (batch -> loss -> backward -> AdamW), the
  two variants interleaved so that a machine shared with other work slows both alike;
- paper scale: the encoder half of latent-diffusion's KL-f8 autoencoder (its parameter count, read from the model,
  is printed in the row) on one 512x512 slice, times the 33 slices one training step of the paper's configs encodes (16-slice clip + 16 mask slices + the informed slice), against drawing the same
  latents from the cache (what the step does instead).

Random weights: cost, not quality. Run alone (``python bench/latent_cache.py``) or through ``bench/run_all.py --only latent_cache``.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from common import sync  # noqa: E402


def _demo_stage1(device: str):
    from gem3d.training.ldm import Gem3dLDM

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "latent-diffusion" / "demo_stage1.yaml"))
    ae = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "latent-diffusion" / "demo_autoencoder.yaml"))
    params = cfg["model"]["params"]
    params["first_stage_config"] = ae["model"]["params"]["first_stage_config"]
    params["first_stage_config"]["params"]["frozen"] = True
    return Gem3dLDM(**{k: v for k, v in params.items() if k not in ("base_learning_rate", "scale_lr")}).to(device)


def _median_pair(step_a, step_b, repeats: int, device: str) -> tuple[float, float]:
    """Median seconds of ``step_a`` and ``step_b``, measured alternately after one warm-up each (the device's queue
    drained before each clock read)."""
    step_a(), step_b()
    sync(device)
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((step_a, a), (step_b, b)):
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def bench_latent_cache(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    from gem3d.data.datasets import LatentCache
    from gem3d.training.ldm import FirstStageLatentEncoder

    torch.manual_seed(0)
    model = _demo_stage1(device).train()
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    frames, size = 16, 64
    images = {"image": torch.rand(1, frames, 1, size, size, generator=g) * 2 - 1,
              "mask": torch.randint(-1, 4, (1, frames, 1, size, size), generator=g).float() * (2 / 3) - 1,
              "informed": torch.rand(1, 1, size, size, generator=g) * 2 - 1}
    images = {k: v.to(device) for k, v in images.items()}
    encoder = FirstStageLatentEncoder(model.first_stage)
    with torch.no_grad():
        mean, std = encoder(images["image"][0])
        mask_mean, _ = encoder(images["mask"][0])

    cache = LatentCache.__new__(LatentCache)  # its arrays in memory: the memmap reads are measured below
    cache.scale_factor = model.first_stage.scale_factor
    cache._loaded = {"case": {"image_mean": mean.cpu().numpy(), "image_std": std.cpu().numpy(),
                              "mask_mean": mask_mean.cpu().numpy()}}
    rng = np.random.default_rng(0)

    def cached_batch():
        return {"latent": cache.sample("case", 0, frames, rng)[None].to(device),
                "mask_latent": cache.mean("case", "mask_mean", 0, frames)[None].to(device),
                "informed_latent": cache.mean("case", "image_mean", 3, 4).to(device)}

    def step(make_batch):
        def run():
            optimiser.zero_grad(set_to_none=True)
            model.loss(make_batch()).backward()
            optimiser.step()
        return run

    repeats = 5 if quick else 20
    encoded, cached = _median_pair(step(lambda: images), step(cached_batch), repeats, device)
    rows = [{"what": "demo stage-1 training step, 1 clip x 16 x 64x64", "variant": "encode every batch",
             "time": f"{encoded * 1e3:.1f} ms", "ratio": "1.00x"},
            {"what": "", "variant": "latent cache", "time": f"{cached * 1e3:.1f} ms",
             "ratio": f"{cached / encoded:.2f}x ({1 - cached / encoded:.0%} of the step was the encoder)"}]

    # paper scale: the encoder's share alone (the paper's UNet step is a GPU figure)
    from gem3d.models.autoencoder import FirstStage

    kl_f8 = FirstStage.from_ldm_config().to(device)
    one = (torch.rand(1, 1, 512, 512, generator=g) * 2 - 1).to(device)
    with torch.no_grad():
        per_slice = min(_median_pair(lambda: kl_f8.encode(one, sample=True), lambda: kl_f8.encode_mask(one), 1,
                                     device))
    encoder_m = sum(p.numel() for p in kl_f8.vae.encoder.parameters()) / 1e6
    autoencoder_m = sum(p.numel() for p in kl_f8.vae.parameters()) / 1e6
    folder = Path(tempfile.mkdtemp(prefix="gem3d_bench_"))
    for i, field in enumerate(LatentCache.FIELDS):
        np.save(folder / f"{field}.npy", np.random.default_rng(i).standard_normal((33, 4, 64, 64), dtype=np.float32))
    cache._loaded = {"paper": {f: np.load(folder / f"{f}.npy", mmap_mode="r") for f in LatentCache.FIELDS}}
    t0 = time.perf_counter()
    cache.sample("paper", 0, 16, rng), cache.mean("paper", "mask_mean", 0, 16), cache.mean("paper", "image_mean", 3, 4)
    read = time.perf_counter() - t0
    row = {"what": "paper-scale encoding per step, 33 x 512x512, KL-f8",
           "variant": f"encoder ({encoder_m:.1f} M of the autoencoder's {autoencoder_m:.1f} M)",
           "time": f"{33 * per_slice:.2f} s",
           "ratio": f"33 x {per_slice:.2f} s per slice, saved every step; the cache's draw (memmap) {read * 1e3:.1f} ms"}
    notes = ["Both variants of the demo step measured alternately; the paper-scale row is the encoder's cost alone, "
             "which the cache removes from every step (the paper's UNet step is a GPU figure)."]
    return rows + [row], notes


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    rows, notes = bench_latent_cache(args.device, args.quick)
    for row in rows:
        print("  " + " | ".join(row.values()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
