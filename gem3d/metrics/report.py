"""Writing the evaluation: ``metrics.csv``, ``summary.md``, PNG line plots (matplotlib; histograms are plotted as
densities) and an offline ``report.html``."""
from __future__ import annotations

import base64
import csv
import html
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from gem3d.files import atomic_path, atomic_write_text

PLOT_DPI = 100
METRIC_DESCRIPTIONS = {
    "psnr_body": "PSNR (dB) against the real volume inside the body, 3D, on the real volume's [0, 1] scale (higher = closer)",
    "psnr_axial_body": "PSNR (dB) per axial slice inside the body, mean over slices",
    "ssim_body": "3D SSIM (Gaussian window 11, sigma 1.5) inside the body (1 = identical)",
    "ssim_axial_body": "2D SSIM per axial slice inside the body, mean",
    "ms_ssim": "3D multi-scale SSIM of the whole volume (scales: see ms_ssim_scales; small volumes get fewer)",
    "ms_ssim_axial": "2D multi-scale SSIM per axial slice, mean",
    "ms_ssim_scales": "number of MS-SSIM scales the volume size allowed (5 = standard)",
    "slice_jump": "mean |difference| between neighbouring axial slices inside the body (stripes raise it)",
    "slice_jump_p95": "95th percentile of the per-slice-pair jumps",
    "slice_jump_ratio": "slice_jump / the real volume's (1 = as smooth as the real volume)",
    "through_plane_grad": "mean |through-plane gradient| inside the body",
    "through_plane_ratio": "through-plane / in-plane gradient (stripes raise it)",
    "through_plane_grad_ratio": "through_plane_grad / the real volume's",
    "outside_mean": "mean intensity outside the body on the [0, 1] scale (the real volume's is ~0)",
    "outside_mean_diff": "outside_mean minus the real volume's (target |x| <= 0.02)",
    "label_order_kept": "1 if the labels' mean intensities keep the real volume's order",
    "mean_diff": "synthetic minus real mean intensity inside a label ([0, 1] scale)",
    "std_diff": "synthetic minus real intensity std inside a label",
    "psnr": "PSNR (dB) inside one label",
    "ssim_axial": "axial SSIM inside one label",
    "dice": "Dice of nnU-Net's prediction on the synthetic volume with its conditioning mask",
    "mean_abs_diff": "counterfactual: mean |output(donor A) - output(donor B)| inside the body",
    "follows_donor": "counterfactual: 1 if each output's label means correlate better with its own donor's",
    "order_b_is_donor_bs": "counterfactual: 1 if the second output's label intensity order is its donor's",
    "fid_25d": "2.5D FID (mean of axial/coronal/sagittal FIDs, RadImageNet ResNet-50 features; lower = closer)",
    "fid_3d": "3D FID (MedicalNet ResNet features; lower = closer)",
    "mmd": "MMD (MONAI, linear kernel) between real and synthetic volumes resampled to one grid",
    "ms_ssim_diversity": "mean MS-SSIM between pairs of samples (lower = more diverse)",
    "frd": "Fréchet Radiomics Distance inside the body (frd-score v1, log(d_F^2); lower = closer)",
}


def describe(metric: str) -> str:
    """One line on what ``metric`` measures (per-label metrics share their family's line)."""
    if metric in METRIC_DESCRIPTIONS:
        return METRIC_DESCRIPTIONS[metric]
    for prefix in sorted(METRIC_DESCRIPTIONS, key=len, reverse=True):
        if metric.startswith(prefix + "_"):
            return METRIC_DESCRIPTIONS[prefix] + f" ({metric[len(prefix) + 1:]})"
    if metric.startswith("fid_2d_"):
        return f"FID of {metric[7:]} slices (RadImageNet ResNet-50 features)"
    if metric.startswith("corr_"):
        return "counterfactual: correlation of an output's per-label means with a donor's"
    return ""


# ------------------------------------------------------------------------------------------------ tables
def write_csv(path: str | Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """One row per dict; columns: the union of the keys, in first-seen order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return Path(path)


def _cell(value) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else (f"{value:.6g}" if math.isfinite(value) else str(value))
    return value


def summarise(rows: Sequence[Mapping[str, object]], group: str = "row") -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{group value: {metric: (mean, std, n)}}`` over the numeric, finite values of every metric."""
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for metric, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample":
                finite = values.setdefault(str(row[group]), {}).setdefault(metric, [])
                if math.isfinite(value):
                    finite.append(float(value))
    return {k: {m: (float(np.mean(v)) if v else math.nan, float(np.std(v)) if v else math.nan, len(v))
                for m, v in metrics.items()} for k, metrics in values.items()}


def format_value(mean: float, std: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "n/a" if n == 0 else str(mean)
    return f"{mean:.4g}" if n == 1 or not math.isfinite(std) else f"{mean:.4g} ± {std:.2g}"


def _table(summary: Mapping[str, Mapping[str, tuple[float, float, int]]], metrics: Sequence[str]) -> list[str]:
    lines = ["| row | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for row, values in summary.items():
        if not any(m in values for m in metrics):
            continue
        n = max((v[2] for v in values.values()), default=0)
        cells = [format_value(*values[m]) if m in values else "" for m in metrics]
        lines.append(f"| {row} | {n} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(summary: Mapping[str, Mapping[str, tuple[float, float, int]]], metrics: Sequence[str],
                     notes: Sequence[str] = (), extra_tables: Mapping[str, Sequence[str]] | None = None) -> str:
    """Markdown: a table (rows = report rows, columns = ``metrics``: mean ± std over samples; set-level metrics
    without ±), one more per ``extra_tables`` entry (title -> metrics), a line per metric on what it measures, and
    ``notes`` (skipped metrics and why, conventions)."""
    lines = ["# Evaluation summary", ""] + _table(summary, metrics)
    for title, columns in (extra_tables or {}).items():
        if columns:
            lines += ["", f"## {title}", ""] + _table(summary, columns)
    described = list(metrics) + [m for columns in (extra_tables or {}).values() for m in columns]
    lines += ["", "## What each metric measures", ""]
    lines += [f"- `{m}`: {describe(m)}" for m in described if describe(m)]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots
def line_plot(path: str | Path, series: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str,
              ylabel: str, size: tuple[int, int] = (480, 320)) -> Path:
    """A PNG line plot (matplotlib, Agg) of named ``(x, y)`` series with a legend; NaNs break lines, dots mark the
    points. ``size``: ``(width, height)`` in pixels."""
    figure = Figure(figsize=(size[0] / PLOT_DPI, size[1] / PLOT_DPI), dpi=PLOT_DPI, layout="constrained")
    axes = figure.add_subplot()
    for name, (x, y) in series.items():
        axes.plot(x, y, marker=".", markersize=3, label=name)
    axes.set_title(title, fontsize="small")
    axes.set(xlabel=xlabel, ylabel=ylabel)
    if series:
        axes.legend(fontsize="x-small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def density(values: np.ndarray, bins: int = 50, value_range: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """``(bin centres, density)`` of the finite ``values`` (numpy histogram, density=True; NaN without values)."""
    values = np.asarray(values, float)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    with np.errstate(invalid="ignore"):
        hist, _ = np.histogram(values[np.isfinite(values)], bins=edges, density=True)
    return (edges[:-1] + edges[1:]) / 2, hist


# ------------------------------------------------------------------------------------------------ html
def _image_tag(path: Path, base: Path, embed: bool, width: int | None = None) -> str:
    style = f' width="{width}"' if width else ""
    if embed:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}"{style} alt="{html.escape(path.name)}">'
    return f'<img src="{html.escape(str(path.relative_to(base)) if path.is_relative_to(base) else str(path))}"{style}>'


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def write_html(path: str | Path, summary_md_table: str, plots: Sequence[Path], samples: Sequence[tuple[Path | None, Mapping]],
               columns: Sequence[str], notes: Sequence[str], embed: bool = True) -> Path:
    """``report.html``: the summary table, notes, the plots, and every sample's preview beside its metrics. Images are
    embedded as base64 (``embed``) or linked by relative path; no external resource, so it opens offline."""
    base = Path(path).parent
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>gem3d evaluation</title><style>",
             "body{font-family:sans-serif;margin:1em} table{border-collapse:collapse;font-size:12px}",
             "td,th{border:1px solid #bbb;padding:2px 5px} .sample{display:flex;gap:1em;margin:1em 0}",
             "pre{background:#f4f4f4;padding:.5em;overflow:auto}</style></head><body>",
             "<h1>gem3d evaluation</h1>", f"<pre>{html.escape(summary_md_table)}</pre>"]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Plots</h2>" + "".join(_image_tag(p, base, embed) for p in plots))
    parts.append("<h2>Samples</h2>")
    for preview, row in samples:
        image = _image_tag(preview, base, embed, 360) if preview is not None and preview.is_file() else "(no preview)"
        cells = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(str(_fmt(row[c])))}</td></tr>"
                        for c in columns if c in row and row[c] != "")
        parts.append(f"<div class='sample'><div>{image}</div><div><table><tr><th>metric</th><th>value</th></tr>{cells}"
                     "</table></div></div>")
    parts.append("</body></html>")
    return atomic_write_text(path, "\n".join(parts))
