"""4. Data loading: clips per second of ``ClipDataset`` through a DataLoader with 0, 2 and 4 workers, delivered to
the benchmark's device, against the training step rate on that device (one clip per step, batch 1 as in the
configs).

Dataset: 3 generated demo cases (gem3d.data.demo, 64x64 in-plane) prepared at the demo size (64x64 slices,
8-slice clips) and at the paper's (resampled to 512x512 slices, 16-slice clips) through VolumeCache. The first
batch (worker start) is timed apart from the steady rate. On a GPU every batch is copied to the device (from
pinned memory) and the copy is waited for, as a training step would; on the CPU the batch stays where it is.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import training_bench
from common import fmt_seconds, sync

from gem3d.data.datasets import ClipDataset, EpochSampler, VolumeCache
from gem3d.data.demo import build_demo_dataset
from gem3d.data.preprocess import PreprocessConfig

SIZES = {"demo": (64, 8), "paper": (512, 16)}  # slice side, clip length


def to_device(batch, device: str):
    """The batch's tensors on ``device`` (nested dicts and lists kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def clips_per_second(dataset: ClipDataset, workers: int, device: str) -> tuple[float, float, float]:
    """(steady clips/s after the first batch, seconds to the first batch, this process's CPU seconds per clip), each
    batch delivered to ``device``."""
    on_gpu = str(device).startswith("cuda")
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, pin_memory=on_gpu,
                        sampler=EpochSampler(len(dataset), shuffle=True, seed=0))
    t0 = time.perf_counter()
    iterator = iter(loader)
    to_device(next(iterator), device)
    sync(device)
    first = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), time.process_time()
    count = 0
    for batch in iterator:
        to_device(batch, device)
        count += 1
    sync(device)
    return count / (time.perf_counter() - t0), first, (time.process_time() - cpu0) / count


def bench_data(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    where = "GPU" if str(device).startswith("cuda") else "CPU"
    step_column = f"vs training steps/s (stage 2, fp32, {where}, section 3 of this run)"
    root = Path(tempfile.mkdtemp(prefix="gem3d-bench-data-"))
    dataset_dir = build_demo_dataset(root / "dataset", cases=3, seed=0)
    for size, (side, clip_len) in SIZES.items():
        cache = VolumeCache(dataset_dir, PreprocessConfig(size=side, max_label=3), cache_dir=root / "cache")
        t0 = time.perf_counter()
        for name in cache.names:
            cache.get(name)  # prepared once into the cache, as before training
        prepare = time.perf_counter() - t0
        clips = 24 if quick else 96
        dataset = ClipDataset(cache, cache.names, clip_len=clip_len, seed=0, length=clips)
        per_slice = training_bench.MEASURED.get((size, 2, "fp32", False))
        step = per_slice * clip_len if per_slice else None  # seconds per training step on one clip (linear)
        for workers in (0, 2, 4):
            rate, first, cpu = clips_per_second(dataset, workers, device)
            rows.append({
                "what": f"{size}: {clip_len}-slice clips of {side}x{side} to the {where}", "workers": str(workers),
                "clips/s": f"{rate:.1f}", "first batch": fmt_seconds(first),
                "CPU time per clip (main process)": fmt_seconds(cpu),
                step_column: (f"{rate * step:.0f}x the step rate ({1 / step:.3f} steps/s)"
                              if step else "training section not run"),
            })
            print("  " + " | ".join(rows[-1].values()), flush=True)
        notes.append(f"{size}: preparing the 3 cases into the cache took {fmt_seconds(prepare)} (once, before "
                     "training).")
    return rows, notes
