"""gem3d benchmarks: print figures and rewrite their blocks of BENCHMARKS.md (never timed assertions in tests).

Sections (``--only`` picks some; each rewrites only its own block, per device kind, in BENCHMARKS.md):

- ``unet``: UNet forward and forward + backward at the paper's stage-1 / stage-2 and the demo's configs, against
  diffusers ``UNet2DModel`` and MONAI ``DiffusionModelUNet`` built to the same widths (time, peak memory, FLOP/s);
- ``volume``: volume synthesis end to end (load, propagate, decode, write): the original recipe against gem3d's
  default and fastest, UNet evaluations per volume, seconds, peak memory;
- ``training``: one training step at demo and paper size, fp32 vs bf16 autocast, checkpointing on vs off;
- ``data``: clips per second with 0, 2 and 4 loader workers against the training step rate;
- ``batch``: the inference engine end to end at demo size with ``batch_windows`` 1, 2 and 4;
- ``channels_last``: the UNet forward with and without the channels_last memory format;
- ``unet_paper`` (opt-in): the paper's stage-1 forward against both peers, with more slices and repeats;
- ``compile`` (opt-in): ``torch.compile`` of the demo UNet against eager;
- ``quality_steps`` (opt-in, needs trained demo models: ``--demo-out DIR``): ``test``-setting PSNR, SSIM and slice
  consistency against UNet evaluations for DDIM and DPM-Solver++ step counts, with the curve as a PNG;
- ``latent_cache`` (opt-in; also ``python bench/latent_cache.py``): encoding a case into the latent cache (time,
  peak memory, bytes per case) and a demo training step with and without the cache; at paper size the KL-f8
  encoder's cost per volume and per step against the cache's read;
- ``profile``: ``torch.profiler`` of the paper's stage-1 forward, self time per op, gem3d against both peers;
- ``temporal_conv``: the volumetric layers' temporal ``Conv1d`` against three shifted 1x1 convolutions;
- ``segmenter``: the MONAI segmenter's training step and forward in ``channels_last_3d`` against contiguous, and its
  sliding-window prediction with one window against ``sw_batch_size`` windows per forward pass;
- ``optimiser``: torch's fused Adam kernel against the default loop, on the demo's models (CPU);
- ``targets`` (last): the targets table, read from the blocks the other sections wrote (measures nothing).

Comparisons run side by side in one process, interleaved (A B A B ...), as medians and ratios.

    python bench/run_all.py [--device cuda] [--quick] [--only unet,volume,training,data,...] [--threads N]
    python bench/run_all.py --only quality_steps --demo-out demo_out [--work DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import torch  # noqa: E402

from common import MEMORY_METHOD, run_info  # noqa: E402

SECTIONS = {
    "unet": ("1. UNet forward and forward + backward", "unet_bench", "bench_unet"),
    "volume": ("2. Volume synthesis, end to end", "volume_bench", "bench_volume"),
    "training": ("3. Training step", "training_bench", "bench_training"),
    "data": ("4. Data loading", "data_bench", "bench_data"),
    "unet_paper": ("1b. UNet forward at the paper's stage 1, more slices and repeats", "unet_bench",
                   "bench_unet_paper"),
    "compile": ("Optional torch.compile", "unet_bench", "bench_compile"),
    "quality_steps": ("5. Quality vs steps (trained demo models)", "quality_steps", "bench_quality_steps"),
    "latent_cache": ("6. Latent cache: each case encoded once, training steps without the encoder", "latent_cache",
                     "bench_latent_cache"),
    "batch": ("7. Cases batched in lockstep (batch_windows)", "batch_bench", "bench_batch"),
    "channels_last": ("8. channels_last memory format", "unet_bench", "bench_channels_last"),
    "profile": ("9. Profile of the paper stage-1 forward, per op (torch.profiler)", "profile_bench", "bench_profile"),
    "temporal_conv": ("10. Temporal convolution: Conv1d against shifted 1x1 convolutions", "temporal_conv_bench",
                      "bench_temporal_conv"),
    "segmenter": ("11. Segmenter training step and prediction, by memory format; sliding windows per pass", "segmenter_bench",
                  "bench_segmenter"),
    "optimiser": ("12. Optimiser: the fused Adam kernel against the loop (the demo's trainings)", "optimiser_bench",
                  "bench_optimiser"),
    "targets": ("Targets, read from the sections' blocks", "targets", "bench_targets"),
}
DEFAULT = ("unet", "volume", "training", "data", "batch", "channels_last", "profile", "temporal_conv", "segmenter",
           "optimiser", "targets")
GPU_PLACEHOLDERS = DEFAULT[:-1]  # "targets" measures nothing: one block, whatever the device
# opt-in: unet_paper (minutes), compile (minutes of compilation), quality_steps (trained demo models, minutes),
# latent_cache (the KL-f8 encoder on 512x512 slices: a minute or two with --quick)
INTRO = """# gem3d benchmarks

Written by `python bench/run_all.py` (`make bench`); each section rewrites its own block below. Every comparison is
measured side by side in one run, interleaved (A B A B ...) so that load on the shared machine hits both alike, and
given as the median of the repeats and as a ratio. Random weights: these figures describe cost, not sample quality.
Each block names its command, machine, date, torch version, threads and whether it ran on the CPU or a GPU.
"""


def block_key(kind: str, section: str) -> str:
    return f"bench:{kind}:{section}"


def render(section: str, kind: str, rows: list[dict], info: dict, command: str, notes: list[str]) -> str:
    """One block of BENCHMARKS.md: title, the command and machine line, the table, the notes. ``kind``: cpu, gpu, or
    all (a block that measures nothing, such as the targets)."""
    title = SECTIONS[section][0]
    if kind == "all":
        lines = [f"<!-- {block_key(kind, section)} -->", f"### {title}", "", f"`{command}` · {info['date']}", ""]
    else:
        lines = [f"<!-- {block_key(kind, section)} -->", f"### {title} ({info['device']})", "",
                 f"`{command}` · {info['machine']} · {info['date']} · torch {info['torch']} · threads "
                 f"{info['threads']} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}) · "
                 + (f"scheduling {info['scheduling']} · " if info.get("scheduling") else "")
                 + f"{info['device']} · peak memory: {MEMORY_METHOD['cuda' if kind == 'gpu' else 'cpu']}", ""]
    if rows:
        columns = list(rows[0])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
        lines.append("")
    lines += [f"- {note}" for note in notes]
    lines += ["", f"<!-- /{block_key(kind, section)} -->"]
    return "\n".join(lines)


def not_measured(section: str, kind: str) -> str:
    how = "`python bench/run_all.py --device cuda`" if kind == "gpu" else "`python bench/run_all.py`"
    return (f"<!-- {block_key(kind, section)} -->\n### {SECTIONS[section][0]} ({kind.upper()})\n\n"
            f"Not measured (run {how}).\n\n<!-- /{block_key(kind, section)} -->")


def write_blocks(path: Path, blocks: dict[str, str]) -> None:
    """Replace (or add) the named blocks of BENCHMARKS.md; blocks not named keep their text."""
    text = path.read_text() if path.exists() else ""
    if "<!-- bench:" not in text:
        text = INTRO
    for kind in ("cpu", "gpu"):
        for section in GPU_PLACEHOLDERS:
            key = block_key(kind, section)
            if f"<!-- {key} -->" not in text and key not in blocks:
                blocks[key] = not_measured(section, kind)
    for key, block in blocks.items():
        pattern = re.compile(rf"<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text)
            continue
        end = preceding_block_end(text, key)
        if end is None:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        else:
            text = text[:end] + "\n\n" + block + text[end:]
    path.write_text(text.rstrip("\n") + "\n")


def preceding_block_end(text: str, key: str) -> int | None:
    """Where a new block ``key`` goes: the end of the block of the nearest section before it in ``SECTIONS`` that
    the text holds, of the same device kind (so the page keeps the sections' order); None: at the end."""
    _, kind, section = key.split(":")
    names = list(SECTIONS)
    if section not in names:
        return None
    for earlier in reversed(names[:names.index(section)]):
        marker = f"<!-- /{block_key(kind, earlier)} -->"
        if marker in text:
            return text.index(marker) + len(marker)
    return None


def shown_arguments(argv: list[str]) -> list[str]:
    """The command-line arguments that decide the figures: ``--out`` (which file the blocks go to) is left out."""
    shown, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--out":
            skip = True
        elif not argument.startswith("--out="):
            shown.append(argument)
    return shown


def section_function(name: str):
    """The function that measures section ``name``: ``fn(device, quick, **section_options(name, args))`` returns
    ``(rows, notes)``."""
    _, module_name, function = SECTIONS[name]
    return getattr(__import__(module_name), function)


def section_options(name: str, args: argparse.Namespace) -> dict:
    """The keyword arguments a section takes beside the device and ``quick``."""
    if name == "quality_steps":
        return {"demo_out": args.demo_out, "work": args.work}
    if name == "targets":
        return {"out": args.out}
    return {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="fewer repeats (the CPU default of make bench)")
    p.add_argument("--only", default=",".join(DEFAULT), help=f"comma list of {list(SECTIONS)}")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--demo-out", type=Path,
                   help="quality_steps: the output of `make demo` (DIR/models/demo, DIR/dataset)")
    p.add_argument("--work", type=Path, default=Path("/tmp/gem3d-quality-steps"),
                   help="quality_steps: where the sampled volumes go (reused on a rerun)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here (torch {torch.__version__})")
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    kind = "gpu" if args.device.startswith("cuda") else "cpu"
    command = "python bench/run_all.py " + shlex.join(shown_arguments(argv if argv is not None else sys.argv[1:]))
    blocks = {}
    for name in names:
        title = SECTIONS[name][0]
        print(f"[bench] {title} on {args.device} ...", flush=True)
        info = run_info(args.device)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        result = section_function(name)(args.device, args.quick, **section_options(name, args))
        rows, notes = result if isinstance(result, tuple) else (result, [])
        if name != "targets":  # measures nothing
            notes = list(notes) + [f"Section wall time {time.perf_counter() - t0:.0f} s; load average (1 min) "
                                   f"{load_before:.1f} at its start, {os.getloadavg()[0]:.1f} at its end."]
        block_kind = "all" if name == "targets" else kind
        blocks[block_key(block_kind, name)] = render(name, block_kind, rows, info, command.strip(), notes)
        write_blocks(args.out, dict(blocks))  # after each section, so a stopped run keeps what it measured
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
