"""The targets table: each target's figures read from the blocks that the other sections wrote into BENCHMARKS.md.

Measures nothing: ``python bench/run_all.py --only targets`` (run last; ``make bench`` runs it after the others)
reads the current blocks and writes one row per target, with the figure, the block it comes from (section and
date) and whether the target is met by that figure. A target whose block is missing or says "Not measured" is
"not measured".
"""
from __future__ import annotations

import re
from pathlib import Path

PEERS = ("diffusers UNet2DModel", "MONAI DiffusionModelUNet")
RATIO = re.compile(r"([\d.]+)x time, ([\d.]+)x memory of (diffusers UNet2DModel|MONAI DiffusionModelUNet)")


def block(text: str, key: str) -> str | None:
    """The text of block ``key`` (e.g. ``cpu:unet``), or None when it is missing or not measured."""
    match = re.search(rf"<!-- bench:{re.escape(key)} -->(.*?)<!-- /bench:{re.escape(key)} -->", text, re.S)
    if match is None or "Not measured" in match.group(1):
        return None
    return match.group(1)


def table(block_text: str) -> list[dict[str, str]]:
    """The rows of the block's markdown table as ``{column: cell}``."""
    lines = [line for line in block_text.splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return []
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def stamp(block_text: str) -> str:
    """The block's date (from its command line)."""
    match = re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", block_text)
    return match.group(0) if match else "undated"


def peer_ratios(rows: list[dict], what: str) -> dict[str, tuple[float, float]] | None:
    """``{peer: (time ratio, memory ratio)}`` of gem3d's stage 1 in the row whose ``what`` starts with ``what``."""
    for row in rows:
        if row.get("what", "").startswith(what) and row.get("variant", "").startswith("gem3d stage 1"):
            return {peer: (float(t), float(m)) for t, m, peer in RATIO.findall(row.get("ratio", ""))}
    return None


def peer_rows(text: str) -> list[dict]:
    rows = []
    for key, what, label in (("cpu:unet", "UNet forward, paper config", "paper stage-1 forward"),
                             ("cpu:unet_paper", "UNet forward, paper stage 1", "paper stage-1 forward"),
                             ("cpu:unet", "UNet forward, demo config", "demo stage-1 forward")):
        found = block(text, key)
        ratios = peer_ratios(table(found), what) if found else None
        section = {"cpu:unet": "1", "cpu:unet_paper": "1b"}[key]
        for peer in PEERS:
            target = f"{label} <= 1.0x {peer}'s time, no more peak memory (CPU)"
            if not ratios or peer not in ratios:
                rows.append({"target": target, "measured": "not measured", "where": f"section {section}",
                             "status": "not measured"})
                continue
            time_ratio, memory_ratio = ratios[peer]
            met = time_ratio <= 1.0 and memory_ratio <= 1.0
            rows.append({"target": target, "measured": f"{time_ratio:.2f}x time, {memory_ratio:.2f}x memory",
                         "where": f"section {section} ({stamp(found)})", "status": "met" if met else "not met"})
    return rows


def demo_sampler() -> str:
    """The demo's default sampler as section 5 names it (e.g. ``DDIM 20``), from gem3d/configs/inference/demo.yaml."""
    from gem3d.inference.cli import load_inference_config
    from quality_steps import NAMES

    sampler = load_inference_config("demo")["sampler"]
    return f"{NAMES[sampler['sampler']]} {sampler['steps']}"


def sampler_row(text: str) -> dict:
    from quality_steps import MAX_CONSISTENCY_CHANGE, MAX_PSNR_DROP, MIN_SAVING

    target = (f"the demo's default sampler: >= {MIN_SAVING:g}x fewer UNet evaluations than the original recipe, within "
              f"{MAX_PSNR_DROP:g} dB and {MAX_CONSISTENCY_CHANGE * 100:g} % slice consistency of DDIM 200 (trained "
              "demo models)")
    found = block(text, "cpu:quality_steps")
    rows = {row.get("sampler"): row for row in table(found)} if found else {}
    name = demo_sampler()
    default = rows.get(name)
    if default is None:
        return {"target": target, "measured": "not measured", "where": "section 5", "status": "not measured"}
    versus = next((value for column, value in default.items() if column.startswith("vs DDIM 200")), "")
    return {"target": target, "measured": f"{name}, against DDIM 200 (evaluations: against the original recipe) / "
                                          f"PSNR / jump ratio / time: {versus}",
            "where": f"section 5 ({stamp(found)})", "status": "met" if default.get("target") == "meets" else "not met"}


def gpu_row(text: str) -> dict:
    measured = [key for key in ("gpu:unet", "gpu:volume", "gpu:training") if block(text, key)]
    target = "GPU: a 155x512x512 volume <= 10 s, stage-2 training <= 16 GB, inference <= 8 GB"
    if not measured:
        return {"target": target, "measured": "not measured (no GPU run recorded)",
                "where": "`python bench/run_all.py --device cuda`", "status": "not measured"}
    return {"target": target, "measured": "see the GPU blocks", "where": ", ".join(measured),
            "status": "read the GPU blocks"}


def bench_targets(device: str, quick: bool, out: Path) -> tuple[list[dict], list[str]]:
    text = out.read_text() if out.exists() else ""
    rows = peer_rows(text) + [sampler_row(text), gpu_row(text)]
    notes = ["Read from the blocks below as they stood when this block was written; a target is met when its "
             "figure is within the bound (ratios of medians from one interleaved run: on this shared machine a "
             "ratio within a few per cent of 1.0 is within the run-to-run noise)."]
    return rows, notes
