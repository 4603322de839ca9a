"""5. Quality vs steps: the ``test`` setting on the trained demo models for DDIM 200 / 100 / 50 / 25 / 10,
DPM-Solver++ 25 / 15 / 10 and the demo's own sampler (demo.yaml) where it is none of these, one seed for all,
scored with the evaluation metrics.

Needs trained demo models (``make demo``): ``DEMO_OUT/models/demo`` (stage 2) and ``DEMO_OUT/dataset`` with its
``splits.json`` (the held-out ``val`` cases are sampled). The other sampler options (eta, window, overlap,
known_noise, clip_x0, ...) are the demo's, from ``gem3d/configs/inference/demo.yaml``. Per recipe: PSNR and SSIM
inside the head on canonical axial slices (:func:`gem3d.metrics.volumes.reconstruction_quality`), the slice-jump
ratio to the real volume (:func:`gem3d.metrics.consistency.consistency_metrics`), UNet evaluations per volume
(counted by a hook on the UNet) and seconds per volume (the manifest's, load to write). Outputs go to ``--work``
(reused on a rerun); the curve is written to ``bench/quality_vs_steps.png``.

    python bench/run_all.py --only quality_steps --demo-out demo_out [--work /tmp/gem3d-quality-steps]
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from volume_bench import EvaluationCounter

from gem3d.export.manifest import Manifest
from gem3d.inference.cli import load_inference_config
from gem3d.inference.engine import Enhancer, InferenceConfig
from gem3d.inference.volume import SamplerOptions
from gem3d.metrics import report
from gem3d.metrics.consistency import consistency_metrics
from gem3d.metrics.volumes import RealData, load_samples, reconstruction_quality

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "bench" / "quality_vs_steps.png"
RECIPES = [("ddim", 200), ("ddim", 100), ("ddim", 50), ("ddim", 25), ("ddim", 10),
           ("dpmpp", 25), ("dpmpp", 15), ("dpmpp", 10)]
REFERENCE = ("ddim", 200)  # the original's sampler and steps, with the demo's other options
# the original recipe: DDIM 200 from pure noise (informed_start 1.0) with independent noise per slice, whatever the
# demo's start and slice noise
ORIGINAL = {"informed_start": 1.0, "slice_noise_correlation": 0.0}
NAMES = {"ddim": "DDIM", "dpmpp": "DPM-Solver++"}
# the "fewer steps" target of issue 14
MIN_SAVING, MAX_PSNR_DROP, MAX_CONSISTENCY_CHANGE = 8.0, 0.5, 0.10


def recipe_name(sampler: str, steps: int, overrides: dict | None = None) -> str:
    return f"{sampler}{steps}" + ("-noise" if overrides else "")


def run_recipe(sampler: str, steps: int, demo_out: Path, work: Path, base: dict, seed: int, device: str,
               overrides: dict | None = None) -> dict:
    """Sample the ``test`` setting of the ``val`` cases with one recipe and score it (cached in ``work``)."""
    folder = work / recipe_name(sampler, steps, overrides)
    cached = folder / "quality.json"
    model_dir = demo_out / "models" / "demo"
    stamp = {"model": str(model_dir), "model_mtime": max(p.stat().st_mtime for p in model_dir.rglob("*.ckpt"))}
    if cached.is_file():
        result = json.loads(cached.read_text())
        if {k: result.get(k) for k in stamp} != stamp:
            raise SystemExit(f"{cached} was sampled from {result.get('model')} (checkpoint time "
                             f"{result.get('model_mtime')}), not {stamp}; choose another --work")
        print(f"  {recipe_name(sampler, steps, overrides)}: reused {cached}", flush=True)
        return {**result, "reused": True}
    options = SamplerOptions(**{**base, "sampler": sampler, "steps": steps, **(overrides or {})})
    cfg = InferenceConfig(setting="test", data=demo_out / "dataset", out=folder, model=model_dir,
                          split="Tr", cases="split:val", sampler=options, seed=seed, device=device,
                          previews=False, progress=False)
    if folder.exists():  # samples of an interrupted run would be skipped by the engine and not counted
        raise SystemExit(f"{folder} holds an unfinished run of this recipe; delete it, or choose another --work")
    enhancer = Enhancer(cfg)
    counter = EvaluationCounter(enhancer.volume_model.model.unet)
    try:
        manifest_path = enhancer.run()
    finally:
        counter.handle.remove()
    records = [r for r in Manifest(manifest_path).records if r["setting"] == "test"]
    quality = reconstruction_quality(cfg.setting_dir, records)
    real = RealData(demo_out / "dataset")
    jumps = [consistency_metrics(s.image, real.case(s.case).image, real.case(s.case).body)["slice_jump_ratio"]
             for s in load_samples(cfg.setting_dir, "test", real)]
    result = {
        "sampler": sampler, "steps": steps, "volumes": len(records),
        "unet_calls": counter.calls / len(records),
        "unet_evaluations": counter.slices / options.window / len(records),  # 16-slice clips per volume
        "seconds": float(np.mean([r["seconds"] for r in records])),
        "psnr": quality["psnr_axial_body"], "ssim": quality["ssim_axial_body"],
        "psnr_3d": quality["psnr_body"], "slice_jump_ratio": float(np.mean(jumps)), **stamp,
    }
    cached.write_text(json.dumps(result, indent=1))
    print(f"  {recipe_name(sampler, steps, overrides)}: {result}", flush=True)
    return result


def meets_target(result: dict, reference: dict, original: dict) -> tuple[bool, dict]:
    """Whether ``result`` meets the "fewer steps" target, and the figures: evaluations against ``original`` (the
    original recipe, DDIM 200 from pure noise), quality against ``reference`` (DDIM 200 with the demo's options).
    Consistency: how much further the slice-jump ratio lies from the real volume's 1.0 than the reference's, as a
    fraction of the reference's ratio (a recipe nearer 1.0 loses nothing)."""
    distance = abs(result["slice_jump_ratio"] - 1) - abs(reference["slice_jump_ratio"] - 1)
    figures = {
        "saving": original["unet_evaluations"] / result["unet_evaluations"],
        "psnr_drop": reference["psnr"] - result["psnr"],
        "consistency_change": max(0.0, distance) / reference["slice_jump_ratio"],
    }
    ok = (figures["saving"] >= MIN_SAVING - 1e-9 and figures["psnr_drop"] <= MAX_PSNR_DROP
          and figures["consistency_change"] <= MAX_CONSISTENCY_CHANGE)
    return ok, figures


def shortfalls(figures: dict, result: dict, reference: dict) -> list[str]:
    """Why a recipe misses the target, in words (empty when it meets it)."""
    out = []
    if figures["saving"] < MIN_SAVING - 1e-9:
        out.append(f"only {figures['saving']:.1f}x fewer evaluations")
    if figures["psnr_drop"] > MAX_PSNR_DROP:
        out.append(f"PSNR {figures['psnr_drop']:.2f} dB below")
    if figures["consistency_change"] > MAX_CONSISTENCY_CHANGE:
        out.append(f"slice-jump ratio {figures['consistency_change']:.0%} further from the real volume's")
    return out


def plot(results: list[dict], path: Path) -> Path:
    """PSNR and slice-jump ratio against UNet evaluations per volume (log10), one line per sampler, side by side."""
    panels = []
    panel_specs = (("psnr", "test PSNR (axial, in the head) vs UNet evaluations", "PSNR dB"),
                   ("slice_jump_ratio", "slice-jump ratio to the real volume vs UNet evaluations", "jump/real"))
    for key, title, ylabel in panel_specs:
        series = {}
        for sampler in dict.fromkeys(r["sampler"] for r in results):
            rows = sorted((r for r in results if r["sampler"] == sampler), key=lambda r: r["unet_evaluations"])
            series[NAMES[sampler]] = (np.log10([r["unet_evaluations"] for r in rows]), np.array([r[key] for r in rows]))
        panel = path.with_name(f".{path.stem}.{key}.png")
        report.line_plot(panel, series, title, "log10 UNet evaluations / volume", ylabel, size=(480, 320))
        panels.append(panel)
    images = [Image.open(p).convert("RGB") for p in panels]
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), (255, 255, 255))
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    canvas.save(path, format="PNG", optimize=True)
    for p in panels:
        p.unlink()
    return path


def bench_quality_steps(device: str, quick: bool, demo_out: Path | None = None, work: Path | None = None,
                        seed: int = 0) -> tuple[list[dict], list[str]]:
    if demo_out is None:
        raise SystemExit("--only quality_steps needs --demo-out DIR (the output of `make demo`: DIR/models/demo, "
                         "DIR/dataset)")
    demo_out = Path(demo_out).resolve()
    for needed in (demo_out / "models" / "demo", demo_out / "dataset" / "splits.json"):
        if not needed.exists():
            raise SystemExit(f"--demo-out {demo_out}: {needed} does not exist (run `make demo` first)")
    work = Path(work or "/tmp/gem3d-quality-steps")
    base = dict(load_inference_config("demo")["sampler"])
    demo_default = (base["sampler"], int(base["steps"]))  # measured too, wherever it falls among RECIPES
    recipes = RECIPES if demo_default in RECIPES else sorted(
        [*RECIPES, demo_default], key=lambda r: (list(NAMES).index(r[0]), -r[1]))
    results = [run_recipe(s, n, demo_out, work, base, seed, device) for s, n in recipes]
    reference = next(r for r in results if (r["sampler"], r["steps"]) == REFERENCE)
    original = reference
    if any(base.get(k) != v for k, v in ORIGINAL.items()):
        original = run_recipe(*REFERENCE, demo_out, work, base, seed, device, overrides=ORIGINAL)
        original["sampler_label"] = (f"{NAMES[REFERENCE[0]]} {REFERENCE[1]} from pure noise, independent slice noise "
                                     "(the original recipe)")
    rows, passing, misses = [], [], []
    for r in ([original] if original is not reference else []) + results:
        ok, f = meets_target(r, reference, original)
        if ok:
            passing.append(r)
        elif f["saving"] >= MIN_SAVING - 1e-9:
            misses.append(f"{NAMES[r['sampler']]} {r['steps']}: " + ", ".join(shortfalls(f, r, reference)))
        rows.append({
            "sampler": r.get("sampler_label", f"{NAMES[r['sampler']]} {r['steps']}"),
            "UNet evaluations / volume (calls)": f"{r['unet_evaluations']:.0f} ({r['unet_calls']:.0f})",
            "s / volume": f"{r['seconds']:.1f}",
            "PSNR axial (dB)": f"{r['psnr']:.2f}", "SSIM axial": f"{r['ssim']:.4f}",
            "slice-jump ratio": f"{r['slice_jump_ratio']:.3f}",
            "vs DDIM 200 (evaluations: vs the original recipe) / PSNR / jump ratio / time": (
                f"{1 / f['saving']:.3f}x / {-f['psnr_drop']:+.2f} dB / "
                f"{r['slice_jump_ratio'] / reference['slice_jump_ratio'] - 1:+.1%} / "
                f"{r['seconds'] / reference['seconds']:.3f}x"),
            "target": "meets" if ok and r is not original else "-",
        })
    plot(results, PLOT)
    default = dict(load_inference_config("demo")["sampler"])
    default_key = (default["sampler"], default["steps"])
    default_result = next((r for r in results if (r["sampler"], r["steps"]) == default_key), None)
    best = min(passing, key=lambda r: (r["unet_evaluations"], -r["psnr"])) if passing else None
    notes = [
        f"Demo models from {demo_out}; `test` setting on the `val` cases of splits.json "
        f"({reference['volumes']} volumes), seed {seed} for every recipe; other sampler options from "
        "gem3d/configs/inference/demo.yaml: "
        + ", ".join(f"{k}={v}" for k, v in base.items() if k not in ("sampler", "steps")) + ".",
        "PSNR / SSIM: gem3d.metrics.volumes.reconstruction_quality (mean over canonical axial slices, inside the head, "
        "real volume's [0, 1] scale); slice-jump ratio: gem3d.metrics.consistency (synthetic / real mean |neighbouring "
        "slice difference| inside the head; 1 = as smooth as the real volume). UNet evaluations: 16-slice clips "
        "through the UNet per volume (hook on the UNet); calls: UNet forward calls (both directions batched). "
        "Seconds: the manifest's per volume, load to write, on this CPU.",
        f"Target (issue 14, \"fewer steps\"): at least {MIN_SAVING:.0f}x fewer UNet evaluations than the original "
        f"recipe (DDIM 200 from pure noise, independent slice noise), within {MAX_PSNR_DROP} dB PSNR of DDIM 200 "
        f"and a slice-jump ratio at most {MAX_CONSISTENCY_CHANGE:.0%} further from the real volume's than DDIM 200's. "
        + (f"Fewest evaluations meeting it: {NAMES[best['sampler']]} {best['steps']}." if best
           else "No recipe meets it."),
    ]
    if misses:
        notes.append("Recipes with the saving that miss the target: " + "; ".join(misses) + ".")
    notes.append(f"A small sample ({reference['volumes']} volumes, one seed): "
                 "differences of a few tenths of a dB between recipes are not established by it.")
    reused = [recipe_name(r["sampler"], r["steps"]) for r in results if r.get("reused")]
    if reused:
        notes.append(f"Reused from {work} (sampled by an earlier run of this command, not timed again): "
                     f"{', '.join(reused)}.")
    if default_result is not None:
        ok, f = meets_target(default_result, reference, original)
        notes.append(f"The demo's default ({NAMES[default['sampler']]} {default['steps']}, demo.yaml): "
                     f"{f['saving']:.1f}x fewer evaluations than the original recipe, {-f['psnr_drop']:+.2f} dB and a "
                     f"slice-jump ratio of {default_result['slice_jump_ratio']:.3f} against DDIM 200's "
                     f"{reference['slice_jump_ratio']:.3f}: target {'met' if ok else 'NOT met'}.")
    notes.append(f"![quality vs steps](bench/{PLOT.name}) (`bench/{PLOT.name}`: PSNR and slice-jump ratio against "
                 f"log10 UNet evaluations per volume, one line per sampler)")
    return rows, notes

