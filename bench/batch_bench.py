"""7. Batching cases: the inference engine end to end at demo size.

A demo dataset of 64x64x48 cases (``gem3d.data.demo``) and a model dir holding the demo's stage-2 UNet and first
stage with random weights (the cost, not the quality, of sampling), sampled with the demo's sampler options
(``gem3d/configs/inference/demo.yaml``) in the ``ic`` setting (each case's informed slice at a random
position, so the cases' propagation plans differ in length). Variants, interleaved: ``batch_windows`` 1, 2 and 4
(cases in lockstep, their windows in shared UNet calls). Seconds per volume: the engine's run (model loading
excluded) over the number of cases.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common import fmt_bytes, peak_memory
from targets import demo_sampler
from volume_bench import EvaluationCounter, build_model

from gem3d.data.demo import build_demo_dataset
from gem3d.inference.cli import load_inference_config
from gem3d.inference.engine import Enhancer, InferenceConfig
from gem3d.inference.volume import SamplerOptions

PREPROCESS = {"size": 64, "intensity": "minmax", "max_label": 3, "body": "nonzero"}  # configs/latent-diffusion/demo_*
BATCHES = (1, 2, 4)


def save_model_dir(model, folder: Path) -> Path:
    """A training-run-like folder (checkpoint with hyper-parameters, project config with the preprocessing)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "configs").mkdir()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save(checkpoint, folder / "checkpoints" / "last.ckpt")
    project = {"model": {"target": "gem3d.training.ldm.Gem3dLDM", "params": dict(model.hparams)},
               "data": {"target": "gem3d.data.module.Gem3dDataModule", "params": {"preprocess": PREPROCESS}}}
    (folder / "configs" / "bench-project.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(project))))
    return folder


def run_once(data: Path, model_dir: Path, out: Path, batch: int, device: str) -> dict:
    sampler = load_inference_config("demo")["sampler"]
    cfg = InferenceConfig("ic", data, out, model=model_dir, device=device, progress=False,
                          sampler=SamplerOptions(**{**sampler, "batch_windows": batch}))
    enhancer = Enhancer(cfg)
    counter = EvaluationCounter(enhancer.volume_model.model.unet)
    t0, cpu0 = time.perf_counter(), time.process_time()
    memory, _ = peak_memory(enhancer.run, device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    counter.handle.remove()
    return {"seconds": seconds, "cpu": cpu, "memory": memory, "calls": counter.calls, "slices": counter.slices}


def bench_batch(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    tmp = Path(tempfile.mkdtemp(prefix="gem3d-bench-batch-"))
    cases = 4
    data = build_demo_dataset(tmp / "dataset", cases=cases)
    model_dir = save_model_dir(build_model("demo", "cpu"), tmp / "model")
    repeats = 2 if quick else 5
    load = [os.getloadavg()[0]]
    results: dict[int, list[dict]] = {batch: [] for batch in BATCHES}
    for repeat in range(repeats):
        for batch in BATCHES:
            results[batch].append(run_once(data, model_dir, tmp / f"out-{repeat}-{batch}", batch, device))
            print(f"  batch_windows {batch}: {results[batch][-1]}", flush=True)
            load.append(os.getloadavg()[0])
    seconds = {batch: statistics.median(r["seconds"] for r in runs) / cases for batch, runs in results.items()}
    cpu = {batch: statistics.median(r["cpu"] for r in runs) / cases for batch, runs in results.items()}
    rows = []
    for batch, runs in results.items():
        rows.append({
            "what": f"demo: {cases} cases of 48x64x64, ic, {demo_sampler()} (demo.yaml)",
            "variant": f"batch_windows {batch}",
            "s / volume": f"{seconds[batch]:.2f} s", "CPU s / volume": f"{cpu[batch]:.2f} s",
            "UNet calls (slice evaluations) / volume":
                f"{runs[0]['calls'] / cases:.1f} ({runs[0]['slices'] / cases:.0f})",
            "peak memory": fmt_bytes(max(r["memory"] for r in runs)),
            "ratio": f"{seconds[batch] / seconds[1]:.2f}x time, {cpu[batch] / cpu[1]:.2f}x CPU time of batch_windows 1",
            "repeats": str(repeats),
        })
    notes = [f"Random weights (the demo's UNet and first-stage configs), model loading excluded; seconds: the median "
             f"of {repeats} interleaved runs of all {cases} cases, divided by {cases}; CPU seconds: the process's CPU "
             f"time (one torch thread), less sensitive than wall time to other load on the machine (load average "
             f"{min(load):.1f}-{max(load):.1f} during the runs)."]
    return rows, notes
