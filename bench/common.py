"""Shared helpers of the benchmarks: interleaved median timing, peak memory, FLOPs, the machine line.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the call; on the CPU the
process's peak resident set size above the resident size before the call (``VmHWM`` - ``VmRSS`` from
``/proc/self/status``, the peak reset through ``/proc/self/clear_refs``), after ``malloc_trim(0)`` has handed
freed memory back to the OS. tracemalloc does not see torch's allocations.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

GiB = 2**30


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def abba_order(names: list[str], repeats: int) -> list[list[str]]:
    """``repeats`` rounds of ``names``, every second one reversed: A B C, C B A, A B C, ..."""
    return [names if r % 2 == 0 else names[::-1] for r in range(repeats)]


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: str,
                        warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each ``fns[name]()``, interleaved so that load hits all of them alike, in the
    order A B C, C B A, A B C, ... (:func:`abba_order`): each function runs first as often as last (with an even
    ``repeats``), so the position in a round (a warm cache after the one before, a throttled core) does not favour
    one of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for order in abba_order(list(fns), repeats):
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """(bytes of peak memory above the level before ``fn()``, ``fn()``'s result)."""
    if str(device).startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated() - before), result
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the OS: VmRSS is live memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    result = fn()
    return float(_status_kib("VmHWM") - before) * 1024, result


MEMORY_METHOD = {
    "cpu": "peak RSS above the RSS before the call (VmHWM after malloc_trim and clear_refs, /proc/self/status)",
    "cuda": "torch.cuda.max_memory_allocated above the allocation before the call",
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` by torch.utils.flop_counter (run it on the meta device to count for free)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo); without them torch
    emulates bf16 matrix products, many times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine(device: str) -> str:
    text = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPU cores"
    if str(device).startswith("cuda"):
        text += f", {torch.cuda.get_device_name()}"
    return text


def scheduling() -> str:
    """This process's CPU scheduling policy when it is not the default (``chrt -r 1``: "SCHED_RR priority 1", a
    real-time policy that keeps other processes off the core it runs on), else ""."""
    policy = os.sched_getscheduler(0)
    if policy == os.SCHED_OTHER:
        return ""
    names = {os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR", os.SCHED_BATCH: "SCHED_BATCH",
             os.SCHED_IDLE: "SCHED_IDLE"}
    return f"{names.get(policy, f'policy {policy}')} priority {os.sched_getparam(0).sched_priority}"


def run_info(device: str) -> dict[str, str]:
    return {
        "device": "GPU" if str(device).startswith("cuda") else "CPU",
        "machine": machine(device),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "scheduling": scheduling(),
    }


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if abs(b) >= 0.1 * GiB else f"{b / 2**20:.0f} MiB"
