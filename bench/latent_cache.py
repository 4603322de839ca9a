"""6. The latent cache: what encoding each case once costs, what the cache holds, and what it saves per step.

The diffusion models train on first-stage latents. With ``data.params.latent_cache`` on, every case is encoded once
into a :class:`gem3d.data.datasets.LatentCache` and each training step reads its latents from there; off, every
training step runs the frozen encoder on its clip, the clip's masks and its informed slice. This section measures:

- demo scale (``configs/latent-diffusion/demo_stage1.yaml``: its UNet, clip length and preprocessing, with the
  architecture of ``demo_autoencoder.yaml``'s first stage): a few generated demo cases prepared and encoded into a
  latent cache (seconds and peak memory per case, bytes on disk per case), then the whole training step (dataset
  item -> loss -> backward -> AdamW -> EMA) with and without the cache, interleaved, side by side as a ratio;
- paper scale (``configs/latent-diffusion/brain_stage1.yaml``: clip length and preprocessing; latent-diffusion's
  KL-f8 architecture): the encoder on one slice, from which the encoding of one brain volume and the encoder's work
  per training step follow (slice counts read from the config and the cache's fields), against drawing the same
  latents from a cache of the paper's shape (memory-mapped ``.npy`` files).

Random weights: cost, not quality. Parameter counts, slice counts and shapes are read from the models and configs.

    python bench/latent_cache.py [--quick] [--threads 1] [--device cuda]
    (the same as python bench/run_all.py --only latent_cache ...: it writes section 6 of BENCHMARKS.md)
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from common import fmt_bytes, fmt_seconds, interleaved_medians, peak_memory  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "latent-diffusion" / "demo_stage1.yaml"
DEMO_AUTOENCODER = ROOT / "configs" / "latent-diffusion" / "demo_autoencoder.yaml"
PAPER_CONFIG = ROOT / "configs" / "latent-diffusion" / "brain_stage1.yaml"
DEMO_CASES = 3  # generated demo cases encoded into the cache
PAPER_SLICES = 155  # slices of one BraTS brain volume (240 x 240 x 155, resampled in-plane to the config's size)


def demo_model(device: str):
    """The demo stage-1 ``Gem3dLDM`` with a random-weight first stage of the demo autoencoder's architecture, and
    the demo config's data parameters."""
    from gem3d.config import load_config_file
    from gem3d.training.ldm import Gem3dLDM
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_config_file(DEMO_CONFIG), resolve=True)
    autoencoder = OmegaConf.to_container(load_config_file(DEMO_AUTOENCODER))
    params = cfg["model"]["params"]
    params["first_stage_config"] = autoencoder["model"]["params"]["first_stage_config"]
    params["first_stage_config"]["params"]["frozen"] = True
    torch.manual_seed(0)
    model = Gem3dLDM(**{k: v for k, v in params.items() if k not in ("base_learning_rate", "scale_lr")})
    return model.to(device).train(), cfg["data"]["params"]


def fmt_short(seconds: float) -> str:
    """Seconds as :func:`common.fmt_seconds`, with two decimals below 10 ms (a cache read takes well under one)."""
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else fmt_seconds(seconds)


def parameters_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def case_bytes(folder: Path, name: str) -> int:
    """Bytes of one case's ``.npy`` arrays in a cache folder."""
    return sum(p.stat().st_size for p in folder.glob(f"{name}_*.npy"))


def bench_demo(device: str, quick: bool, tmp: Path) -> tuple[list[dict], list[str]]:
    from gem3d.data.datasets import ClipDataset, LatentCache, VolumeCache
    from gem3d.data.demo import build_demo_dataset
    from gem3d.data.preprocess import PreprocessConfig
    from gem3d.training.ldm import FirstStageLatentEncoder

    model, data = demo_model(device)
    clip_len = int(data["clip_len"])
    volumes = VolumeCache(build_demo_dataset(tmp / "dataset", cases=DEMO_CASES, seed=0),
                          PreprocessConfig(**data["preprocess"]), cache_dir=tmp / "cache")
    volumes.prepare_all()
    encoder = FirstStageLatentEncoder(model.first_stage)
    latents = LatentCache(volumes, encoder)
    seconds, memory = [], []
    for name in volumes.names:  # each case encoded once, as before training
        t0 = time.perf_counter()
        memory.append(peak_memory(lambda: latents.get(name), device)[0])
        seconds.append(time.perf_counter() - t0)
    slices = volumes.num_slices(volumes.names[0])
    shape = "x".join(str(n) for n in latents.get(volumes.names[0])["image_mean"].shape)
    cached_bytes = statistics.mean(case_bytes(latents.cache_dir, n) for n in volumes.names)
    volume_bytes = statistics.mean(case_bytes(volumes.cache_dir, n) for n in volumes.names)
    passes = len([f for f in latents.fields if f.endswith("_mean")])  # one encoder pass per mean field
    side = data["preprocess"]["size"]
    rows = [{
        "what": f"demo: encode one case into the cache ({slices} slices of {side}x{side})",
        "variant": f"demo first stage, encoder {parameters_m(model.first_stage.vae.encoder):.2f} M parameters, "
                   f"{passes} passes per slice ({', '.join(latents.fields)})",
        "time": fmt_seconds(statistics.median(seconds)), "peak memory": fmt_bytes(max(memory)),
        "cache per case": f"{fmt_bytes(cached_bytes)} ({len(latents.fields)} x {shape} f32)", "ratio": "",
        "repeats": f"{len(seconds)} {'case' if len(seconds) == 1 else 'cases'}",
    }]
    print("  " + " | ".join(rows[-1].values()), flush=True)

    plain = ClipDataset(volumes, volumes.names, clip_len=clip_len, seed=0, length=10_000)
    cached = ClipDataset(volumes, volumes.names, clip_len=clip_len, seed=0, length=10_000)
    cached.use_latents(latents)
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    position = {"next": 0}

    def step(dataset: ClipDataset):
        def run():
            batch = default_collate([dataset[position["next"] % len(dataset)]])  # batch 1, as the demo configs
            position["next"] += 1
            optimiser.zero_grad(set_to_none=True)
            model.loss(batch).backward()
            optimiser.step()
            if model.ema is not None:
                model.ema.update(model.unet)
        return run

    fns = {"encode every batch": step(plain), "latent cache": step(cached)}
    step_memory = {name: peak_memory(fn, device)[0] for name, fn in fns.items()}  # also the warm-up
    repeats = 5 if quick else 20
    step_seconds = interleaved_medians(fns, repeats, device, warmup=0)
    encoded = step_seconds["encode every batch"]
    for variant, s in step_seconds.items():
        ratio = "" if variant == "encode every batch" else (
            f"{s / encoded:.2f}x time, {step_memory[variant] / step_memory['encode every batch']:.2f}x memory of "
            f"encode every batch ({1 - s / encoded:.0%} of that step was the encoder)")
        rows.append({
            "what": f"demo stage-1 training step: 1 clip of {clip_len}x{side}x{side}, item -> loss -> backward -> "
                    f"AdamW -> EMA, UNet {parameters_m(model.unet):.2f} M",
            "variant": variant, "time": fmt_seconds(s), "peak memory": fmt_bytes(step_memory[variant]),
            "cache per case": "", "ratio": ratio, "repeats": str(repeats),
        })
        print("  " + " | ".join(rows[-1].values()), flush=True)
    notes = [f"Demo: {DEMO_CASES} generated demo cases (gem3d.data.demo) prepared with the demo config's "
             f"preprocessing (volume cache {fmt_bytes(volume_bytes)} per case, needed with or without the latent "
             "cache); the first stage has random weights of the demo autoencoder's architecture (the demo trains "
             "its own). Encoding time per case: the median over the cases, reading the prepared slices and writing "
             "the `.npy` files included. Step time: the median of the interleaved steps, each from its own dataset "
             "item (the cached variant's items carry the latents; both read the same clips)."]
    return rows, notes


def bench_paper(device: str, quick: bool, tmp: Path) -> tuple[list[dict], list[str]]:
    from gem3d.config import load_config_file
    from gem3d.data.datasets import LatentCache
    from gem3d.data.preprocess import PreprocessConfig
    from gem3d.models.autoencoder import FirstStage
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(load_config_file(PAPER_CONFIG))["data"]["params"]
    clip_len = int(data["clip_len"])
    preprocess = PreprocessConfig(**data["preprocess"])
    side = int(preprocess.size)
    fields = LatentCache.FIELDS + (LatentCache.HIDDEN_FIELDS if preprocess.informed_labels == "hidden" else [])
    passes = len([f for f in fields if f.endswith("_mean")])
    kl_f8 = FirstStage.from_ldm_config().to(device)
    one = (torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
    with torch.no_grad():
        memory, (mean, _) = peak_memory(lambda: kl_f8.moments(one), device)  # also the warm-up
        per_slice = interleaved_medians({"encode": lambda: kl_f8.moments(one)}, 1 if quick else 3, device,
                                        warmup=0)["encode"]
    latent_shape = tuple(mean.shape[1:])
    per_step = 2 * clip_len + 1  # the clip's slices, its masks, the informed slice
    encoder_m, autoencoder_m = parameters_m(kl_f8.vae.encoder), parameters_m(kl_f8.vae)
    cached_bytes = PAPER_SLICES * len(fields) * int(np.prod(latent_shape)) * 4
    shape = "x".join(str(n) for n in (PAPER_SLICES, *latent_shape))

    # the cache's draw for one step, from memory-mapped files of the paper's shape
    latents = LatentCache.__new__(LatentCache)  # no volume cache behind it: only its reads are timed
    latents.cache_dir, latents.scale_factor, latents.fields = tmp / "paper-latents", kl_f8.scale_factor, fields
    latents.cache_dir.mkdir()
    rng = np.random.default_rng(0)
    for field in fields:
        np.save(latents._array_path("case", field),
                rng.standard_normal((PAPER_SLICES, *latent_shape), dtype=np.float32))
    latents._loaded = {"case": latents._open("case", fields)}
    start = PAPER_SLICES // 2

    def draw():
        return (latents.sample("case", start, start + clip_len, rng), latents.mean("case", "mask_mean", start,
                start + clip_len), latents.mean("case", "image_mean", start, start + 1))

    read = interleaved_medians({"draw": draw}, 20, device)["draw"]
    what = f"paper: {side}x{side} slices, KL-f8 encoder {encoder_m:.1f} M of the autoencoder's {autoencoder_m:.1f} M"
    rows = [
        {"what": f"{what}; encode one {PAPER_SLICES}-slice brain volume into the cache",
         "variant": f"{PAPER_SLICES} slices x {passes} passes ({', '.join(fields)}) x {fmt_seconds(per_slice)} per "
                    "slice",
         "time": fmt_seconds(PAPER_SLICES * passes * per_slice), "peak memory": f"{fmt_bytes(memory)} (one slice)",
         "cache per case": f"{fmt_bytes(cached_bytes)} ({len(fields)} x {shape} f32)", "ratio": "",
         "repeats": f"{1 if quick else 3} (one slice)"},
        {"what": f"{what}; first-stage work of one training step (clip of {clip_len})",
         "variant": f"encode every batch: {per_step} slices (clip, masks, informed slice) x {fmt_seconds(per_slice)}",
         "time": fmt_seconds(per_step * per_slice), "peak memory": f"{fmt_bytes(memory)} (one slice)",
         "cache per case": "", "ratio": "", "repeats": f"{1 if quick else 3} (one slice)"},
        {"what": f"{what}; first-stage work of one training step (clip of {clip_len})",
         "variant": "latent cache: draw the clip's latents, masks and informed slice (memmap)",
         "time": fmt_short(read), "peak memory": "", "cache per case": "",
         "ratio": f"1/{per_step * per_slice / read:,.0f} of the time of encode every batch", "repeats": "20"},
    ]
    for row in rows:
        print("  " + " | ".join(row.values()), flush=True)
    notes = [f"Paper: the encoder's time on one {side}x{side} slice times the slices it would encode (a volume "
             f"encoder pass per mean field of the cache, {per_step} slices per step with the config's clip of "
             f"{clip_len}); the paper's UNet step is not timed here (section 3 times it on the CPU with 1 slice). The "
             "cache's draw reads files written just before, so from the page cache."]
    return rows, notes


def bench_latent_cache(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    tmp = Path(tempfile.mkdtemp(prefix="gem3d-bench-latent-cache-"))
    with warnings.catch_warnings():  # "stage without ckpt_path": random weights on purpose
        warnings.simplefilter("ignore", UserWarning)
        demo_rows, demo_notes = bench_demo(device, quick, tmp)
    paper_rows, paper_notes = bench_paper(device, quick, tmp)
    return demo_rows + paper_rows, demo_notes + paper_notes


def main(argv: list[str] | None = None) -> int:
    """``python bench/latent_cache.py ARGS`` = ``python bench/run_all.py --only latent_cache ARGS``."""
    import run_all

    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--only" or a.startswith("--only=") for a in argv):
        raise SystemExit("bench/latent_cache.py runs the latent_cache section only; use bench/run_all.py --only")
    return run_all.main(["--only", "latent_cache", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
