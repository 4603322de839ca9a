"""9. Profile: where the time of the paper's stage-1 UNet forward goes, per op, gem3d against both peers.

``torch.profiler`` records one forward of each UNet (after one warm-up forward) at the paper's stage-1 widths
(``peers.CONFIGS``), on 1 slice of 64x64 latents on the CPU and 16 on a GPU. The table lists the ops that take the
most self time in any of the three models (self time: the op's own time, without the ops it calls), with the number
of calls, and a total row. On a GPU the self time is the device's (CUDA kernels under each op).
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from common import fmt_seconds, sync
from peers import CONFIGS, LATENT_SIZE, PEERS
from unet_bench import OURS_1, forward_fn

from gem3d.models.unet import UNetModel

TOP_OPS = 10  # rows: the union of each model's TOP_OPS most expensive ops


def op_self_seconds(fn, device: str) -> dict[str, tuple[float, int]]:
    """{op name: (self seconds, calls)} of one profiled ``fn()`` (CPU self time, or device self time on a GPU)."""
    on_gpu = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    fn()  # warm-up: first-call allocations and kernel choices stay out of the profile
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    ops = {}
    for event in prof.key_averages():
        micros = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if micros > 0:
            ops[event.key] = (micros / 1e6, event.count)
    return ops


def bench_profile(device: str, quick: bool) -> tuple[list[dict], list[str]]:
    slices = 1 if device == "cpu" else 16
    config = CONFIGS["paper stage 1"]
    torch.manual_seed(0)
    models = {OURS_1: UNetModel(**config), **{name: make(config) for name, make in PEERS.items()}}
    hw = LATENT_SIZE["paper"]
    x = torch.randn(slices, 12, hw, hw, device=device)
    t = torch.full((slices,), 500, device=device)
    profiles = {}
    for name, model in models.items():
        model.to(device)
        profiles[name] = op_self_seconds(forward_fn(name, model, x, t), device)
        model.to("meta")  # frees the weights before the next model
        print(f"  [{name}] " + ", ".join(f"{op} {fmt_seconds(s)}" for op, (s, _) in
                                        sorted(profiles[name].items(), key=lambda item: -item[1][0])[:5]), flush=True)
    chosen = []
    for ops in profiles.values():
        for op, _ in sorted(ops.items(), key=lambda item: -item[1][0])[:TOP_OPS]:
            if op not in chosen:
                chosen.append(op)
    chosen.sort(key=lambda op: -profiles[OURS_1].get(op, (0.0, 0))[0])
    rows = []
    for op in chosen:
        row = {"op (self time, calls)": f"`{op}`"}
        for name, ops in profiles.items():
            seconds, calls = ops.get(op, (0.0, 0))
            row[name] = f"{fmt_seconds(seconds)} ({calls})" if calls else "-"
        rows.append(row)
    total = {"op (self time, calls)": "**all ops**"}
    for name, ops in profiles.items():
        total[name] = fmt_seconds(sum(seconds for seconds, _ in ops.values()))
    rows.append(total)
    shape = f"{slices}x12x{hw}x{hw}"
    notes = [f"One profiled forward of each model at the paper's stage-1 widths, {shape}, after one warm-up forward; "
             f"rows: each model's {TOP_OPS} most expensive ops by self time, ordered by gem3d's; `-`: the model does "
             "not call the op. A single profiled run: the totals carry the profiler's overhead and the machine's "
             "load, so read the split between ops, and sections 1 and 1b for the timings."]
    return rows, notes
