"""Writing the evaluation: ``metrics.csv``, a short ``summary.md``, PNG plots (matplotlib; histograms are plotted as
densities; many series become small multiples) and an offline ``report.html``.

The report leads with a headline table: the rows (yardsticks first) against the few metrics that decide
(``HEADLINE``), mean ± std over samples with a 95 % bootstrap interval of the mean, and marks on values that lose to
a yardstick row or miss a target. Per-label, per-sample and every-metric tables are folded away in ``<details>``."""
from __future__ import annotations

import argparse
import base64
import csv
import html
import math
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from gem3d.files import atomic_path, atomic_write_text

PLOT_DPI = 100
METRIC_DESCRIPTIONS = {
    "psnr_body": "PSNR (dB) against the real volume inside the body, 3D, on the real volume's [0, 1] scale "
                 "(higher = closer)",
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
    "dice": "Dice of a segmenter's prediction on the volume against the mask it was generated from",
    "dice_mean": "Dice of a segmenter's prediction against the generating mask, mean over the labels the mask holds",
    "dice_ratio": "dice_mean / the same segmenter's dice_mean on the real volumes (1 = as segmentable as real)",
    "mean_abs_diff": "counterfactual: mean |output(donor A) - output(donor B)| inside the body",
    "follows_donor": "counterfactual: 1 if each output's label means correlate better with its own donor's",
    "order_b_is_donor_bs": "counterfactual: 1 if the second output's label intensity order is its donor's",
    "fid_25d": "2.5D FID (mean of axial/coronal/sagittal FIDs, RadImageNet ResNet-50 features; lower = closer)",
    "fid_3d": "3D FID (MedicalNet ResNet features; lower = closer)",
    "mmd": "MMD (MONAI, linear kernel) between real and synthetic volumes resampled to one grid",
    "ms_ssim_diversity": "mean MS-SSIM between pairs of samples (lower = more diverse)",
    "frd": "Fréchet Radiomics Distance inside the body (frd-score v1, log(d_F^2); lower = closer)",
    "informed_w1": "generated informed slice's plane: 1-D Wasserstein distance of its body intensities to the real "
                   "slices of the other evaluated cases at the same relative position, mean (lower = closer)",
    "informed_w1_real": "the same distance from the real slice of the sample's own case at that plane: the "
                        "real-vs-real yardstick",
    "informed_dice": "Dice of the segmenter at the generated informed slice's plane of the volume against its mask "
                     "there, mean over the labels the plane holds",
    "informed_dice_real": "the segmenter's Dice on the real volume of the same case at that plane: the yardstick",
}
PER_LABEL_FAMILIES = ("mean_diff", "std_diff", "psnr", "ssim_axial", "dice")  # metric = f"{family}_{label name}"
SET_METRICS = ("fid_25d", "fid_3d", "mmd", "ms_ssim_diversity", "frd")  # one value per row, not per sample
COUNTERFACTUAL_METRICS = ("mean_abs_diff", "follows_donor", "order_b_is_donor_bs")

# report rows the headline orders and compares against (the names the evaluation gives them)
COPY_ROW = "reference: copy informed slice"
AUTOENCODER_ROW = "reference: autoencoder"
REAL_VOLUME_ROW = "reference: real volume"
REAL_ROW = "real"
BASE_ROW = "base"
REFERENCE_PREFIX = "reference:"
YARDSTICK_ORDER = (COPY_ROW, AUTOENCODER_ROW, REAL_VOLUME_ROW, REAL_ROW)
LEAD_ROWS = ("stage1-alone", "gem3d", BASE_ROW)  # after the yardsticks, before the other rows
MISSING = "—"
THROUGH_PLANE_TARGET = 1.1  # the through-plane gradient ratio: at most this x the autoencoder's
LABEL_ORDER_TARGET = 0.9  # the label intensity order: kept on at least this fraction of samples
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999


@dataclass(frozen=True)
class HeadlineColumn:
    """A headline metric, its short header and meaning, and when a row's value is marked.

    ``rule``: ``"below"`` (under the ``yardstick`` row's mean), ``"above_times"`` (over ``bound`` x the yardstick's),
    ``"farther_from_one"`` (further from 1 than the yardstick's), ``"abs_above"`` (|value| over ``bound``, a target),
    ``"below_bound"`` (under ``bound``, a target)."""

    metric: str
    header: str
    meaning: str
    rule: str
    yardstick: str | None = None
    bound: float = math.nan


HEADLINE = (
    HeadlineColumn("psnr_body", "PSNR body (dB)", "PSNR against the real volume inside the body; higher = closer",
                   "below", COPY_ROW),
    HeadlineColumn("ssim_axial_body", "axial SSIM", "SSIM per axial slice inside the body, mean; 1 = identical",
                   "below", COPY_ROW),
    HeadlineColumn("slice_jump_ratio", "slice jumps ×real",
                   "mean jump between neighbouring axial slices / the real volume's; 1 = as smooth as real",
                   "farther_from_one", AUTOENCODER_ROW),
    HeadlineColumn("through_plane_ratio", "through / in-plane gradient",
                   "through-plane / in-plane gradient inside the body; stripes raise it. The row 'real' holds the "
                   "real volumes' value, the autoencoder's is the ceiling; '×AE' = this row's value / the "
                   "autoencoder's", "above_times", AUTOENCODER_ROW, THROUGH_PLANE_TARGET),
    HeadlineColumn("outside_mean_diff", "outside diff",
                   "mean intensity outside the body minus the real volume's, [0, 1] scale; target |x| ≤ 0.02",
                   "abs_above", None, 0.02),
    HeadlineColumn("label_order_kept", "label order kept",
                   "fraction of samples whose labels' mean intensities keep the real volume's order; target ≥ 0.9",
                   "below_bound", None, LABEL_ORDER_TARGET),
    HeadlineColumn("dice_mean", "Dice mean",
                   "a segmenter's Dice against the mask the volume was generated from, mean over labels",
                   "below", BASE_ROW),
    HeadlineColumn("dice_ratio", "Dice ×real",
                   "dice_mean / the same segmenter's on the real volumes; 1 = as segmentable as real",
                   "below", BASE_ROW),
)
LOSES = ("loses", "▼")  # (CSS class, symbol): worse than a yardstick row
MISSES = ("misses", "✗")  # worse than a fixed target
RULE_TEXT = {"below": "below the row '{yardstick}'", "above_times": "above {bound:g} × the row '{yardstick}'",
             "farther_from_one": "further from 1 than the row '{yardstick}'",
             "abs_above": "|x| above the target {bound:g}", "below_bound": "below the target {bound:g}"}


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


@dataclass(frozen=True)
class Section:
    """A table of its own in summary.md and report.html (after the headline): ``columns``, ``rows`` (their cells
    as text; a row whose first cell is a yardstick row is shaded), ``lines`` (what the columns mean) and, in
    report.html, a ``plot``."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    lines: Sequence[str] = ()
    plot: Path | None = None
    figures: Sequence[Path] = ()  # more pictures after the plot (report.html)

    def markdown(self) -> list[str]:
        lines = ["", f"## {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return lines + ([""] + [f"- {line}" for line in self.lines] if self.lines else [])

    def html(self, base: Path, embed: bool) -> str:
        head = "".join(f'<th scope="col">{_esc(c)}</th>' for c in self.columns)
        body = []
        for row in self.rows:
            kind = ' class="yardstick"' if row and is_yardstick(str(row[0])) else ""
            cells = "".join(f"<td>{_esc(c)}</td>" for c in row[1:])
            body.append(f'<tr{kind}><th scope="row">{_esc(row[0]) if row else ""}</th>{cells}</tr>')
        parts = [f"<h2>{_esc(self.title)}</h2>", f'<div class="wide"><table><thead><tr>{head}</tr></thead>'
                 f'<tbody>{"".join(body)}</tbody></table></div>']
        if self.lines:
            parts.append("<ul>" + "".join(f"<li>{_esc(line)}</li>" for line in self.lines) + "</ul>")
        for picture in [p for p in (self.plot, *self.figures) if p is not None and Path(p).is_file()]:
            parts.append(_image_tag(Path(picture), base, embed, "plot", Path(picture).stem.replace("_", " ")))
        return "".join(parts)


def scale_section(scales: Mapping[str, str]) -> Section:
    """The ``Intensity scale`` section: ``{row: how its volumes were mapped to [0, 1]}``, rows in report order."""
    return Section("Intensity scale", ("row", "intensity scale"), [(r, scales[r]) for r in order_rows(scales)],
                   ("every metric compares a row's volume with its real case on the row's scale: a CT model's "
                    "training window (from the manifest's preprocessing, or --window), else each real case's "
                    "min/max",))


MEMORY_SCOPES = {"volume": "since the volume started", "run": "since the run started (volumes in lockstep)",
                 "process": "since the process started (the peak could not be reset)"}


def time_memory_section(records: Mapping[str, Sequence[Mapping]]) -> Section | None:
    """The ``Time and memory per setting`` section from the manifest records of each row (``seconds``,
    ``memory``: see :class:`gem3d.inference.engine.PeakMemory`); None when no record has seconds."""
    rows = []
    for name in order_rows(records):
        seconds = [float(r["seconds"]) for r in records[name] if r.get("seconds") is not None]
        if not seconds:
            continue
        memory = [r["memory"] for r in records[name] if isinstance(r.get("memory"), Mapping)]
        devices = sorted({str(m.get("device")) for m in memory}) or [MISSING]
        rss = [float(m["peak_rss_mb"]) for m in memory if m.get("peak_rss_mb") is not None]
        cuda = [float(m["cuda_peak_allocated_mb"]) for m in memory if m.get("cuda_peak_allocated_mb") is not None]
        scopes = sorted({str(m.get("peak_rss_scope")) for m in memory if m.get("peak_rss_mb") is not None})
        rows.append((name, str(len(seconds)), ", ".join(devices),
                     f"{np.mean(seconds):.4g} ({min(seconds):.4g}–{max(seconds):.4g})",
                     f"{max(rss):,.0f}" if rss else MISSING, ", ".join(scopes) or MISSING,
                     f"{max(cuda):,.0f}" if cuda else MISSING))
    if not rows:
        return None
    lines = ("seconds: each volume's share of its run's wall time in the manifest (its loading, decoding and "
             "writing, and of each sampling round the round's time over the volumes sampled in it: volumes in "
             "lockstep split it), mean and min–max over the row's volumes",
             "peak RSS: the largest of the volumes' peak resident memory of the generating process, in MiB; its "
             "scope: " + "; ".join(f"{k} = {v}" for k, v in MEMORY_SCOPES.items()),
             "CUDA peak: torch.cuda.max_memory_allocated, reset at each volume (or run), the largest, in MiB; "
             f"{MISSING} = not measured (CPU, or a manifest written before memory was recorded)")
    return Section("Time and memory per setting", ("row", "n", "device", "seconds per volume: mean (min–max)",
                                                   "peak RSS (MiB)", "RSS scope", "CUDA peak (MiB)"), rows, lines)


# ------------------------------------------------------------------------------------------------ targets
# the mask-true work's targets on label fidelity: each label's Dice as a ratio of the real volumes', by report row (the
# names gem3d.demo gives: gem3d = the test setting; ig and igma generate their informed slice); other rows have none
FIDELITY_TARGETS = {"gem3d": 0.8, "test": 0.8, "stage1-alone": 0.8, "ic": 0.8, "icma": 0.8, "ig": 0.6, "igma": 0.6}
COUNTERFACTUAL_ROW_PREFIX = "counterfactual-"  # the demo's ic rows with a chosen donor: the ic target
COUNTERFACTUAL_TARGET = 0.8
MET, UNMET = "✓", "✗"
DICE_SUMMARY_COLUMNS = ("dice_mean", "dice_ratio")  # dice_* columns that are not one label's Dice


def fidelity_target(row: str) -> float | None:
    """The label-fidelity target of a report row (per-label Dice / the real volumes'), None where none is set."""
    if row in FIDELITY_TARGETS:
        return FIDELITY_TARGETS[row]
    return COUNTERFACTUAL_TARGET if row.startswith(COUNTERFACTUAL_ROW_PREFIX) else None


def fidelity_targets_text() -> str:
    """``≥ 0.8× real on every label for gem3d, ..., counterfactual-*; ≥ 0.6× for ig, igma``, from the targets."""
    by_target: dict[float, list[str]] = {}
    for row, target in FIDELITY_TARGETS.items():
        by_target.setdefault(target, []).append(row)
    by_target.setdefault(COUNTERFACTUAL_TARGET, []).append(COUNTERFACTUAL_ROW_PREFIX + "*")
    parts = [f"≥ {target:g}×" + (" real on every label" if index == 0 else "") + " for " + ", ".join(rows)
             for index, (target, rows) in enumerate(sorted(by_target.items(), reverse=True))]
    return "; ".join(parts)


def dice_label_metrics(summary: Mapping[str, Mapping[str, Sequence]]) -> list[str]:
    """The per-label Dice metrics (``dice_<label>``) of ``summary``: the real volumes' row's first, first-seen order."""
    rows = [REAL_VOLUME_ROW, *summary] if REAL_VOLUME_ROW in summary else list(summary)
    return list(dict.fromkeys(m for row in rows for m in summary[row]
                              if m.startswith("dice_") and m not in DICE_SUMMARY_COLUMNS))


def ratio_to(summary: Mapping[str, Mapping[str, Sequence]], row: str, yardstick: str, metric: str) -> float:
    """``row``'s mean of ``metric`` / ``yardstick``'s (NaN where either is missing or the yardstick's is not > 0)."""
    value, reference = _mean(summary, row, metric), _mean(summary, yardstick, metric)
    return value / reference if math.isfinite(value) and math.isfinite(reference) and reference > 0 else math.nan


def format_ratio(ratio: float, passes: Callable[[float], bool] | None = None) -> str:
    """``0.82×`` (an em dash when not measured), with more decimals where two would cross a target: with ``passes``
    (the target's test), ``0.599×`` and not ``0.60×`` under a 0.6× target."""
    if not math.isfinite(ratio):
        return MISSING
    for digits in range(2, 7):
        text = f"{ratio:.{digits}f}"
        if passes is None or passes(float(text)) == passes(ratio):
            break
    return text + "×"


def _verdict(text: str, met: bool | None, marked: bool) -> str:
    return f"{text} {MET if met else UNMET}" if marked and met is not None else text


def labels_below_base(summary: Mapping[str, Mapping[str, Sequence]], row: str,
                      metrics: Sequence[str]) -> list[str] | None:
    """The ``metrics`` on which ``row``'s mean is below the row ``base``'s (over the metrics both measured); None
    for ``base`` itself, without a ``base`` row, or without a metric both measured."""
    if row == BASE_ROW or BASE_ROW not in summary:
        return None
    pairs = [(m, _mean(summary, row, m), _mean(summary, BASE_ROW, m)) for m in metrics]
    pairs = [(m, value, base) for m, value, base in pairs if math.isfinite(value) and math.isfinite(base)]
    return None if not pairs else [m for m, value, base in pairs if value < base]


def order_kept_cell(aggregate: Sequence | None, marked: bool) -> str:
    """``4/6 ✗``: samples that kept the label intensity order, of the row's samples, marked against the target."""
    if aggregate is None or not aggregate[2] or not math.isfinite(aggregate[0]):
        return MISSING
    n = int(aggregate[2])
    values = getattr(aggregate, "values", ())
    kept = sum(values) if len(values) == n else aggregate[0] * n
    return _verdict(f"{kept:.3g}/{n}", aggregate[0] >= LABEL_ORDER_TARGET, marked)


def targets_section(summary: Mapping[str, Mapping[str, Sequence]]) -> Section | None:
    """The ``Label fidelity per label and targets`` section: one line per synthetic row (not the yardsticks, not
    the counterfactual pairs) with each label's mean Dice / the ``reference: real volume`` row's, the row's
    fidelity target and whether it is met, whether it is >= ``base`` on every label, its through-plane ratio / the
    ``reference: autoencoder`` row's and its kept label order. Targets are marked met (✓) or unmet (✗) only on rows
    with a fidelity target (:func:`fidelity_target`, the GEM-3D rows); a missing reference row gives em dashes.
    None when no synthetic row has one of these metrics."""
    dice = dice_label_metrics(summary)
    wanted = {*dice, "through_plane_ratio", "label_order_kept"}
    rows = [r for r in order_rows(summary)
            if not is_yardstick(r) and not is_pair_row(summary[r]) and wanted & set(summary[r])]
    if not rows:
        return None
    labels = [m[len("dice_"):] for m in dice]
    table = []
    for row in rows:
        target = fidelity_target(row)
        marked = target is not None
        ratios = [ratio_to(summary, row, REAL_VOLUME_ROW, m) for m in dice]
        cells = [format_ratio(r) if not marked
                 else format_ratio(r, lambda x: x >= target) + (f" {UNMET}" if r < target else "") for r in ratios]
        if target is None:
            verdict = "none"
        else:
            measured = bool(ratios) and all(map(math.isfinite, ratios))
            met = False if any(r < target for r in ratios) else (True if measured else None)
            verdict = f"≥ {target:g}× " + {True: MET, False: UNMET, None: MISSING}[met]
        below = labels_below_base(summary, row, dice)
        versus_base = (MISSING if below is None
                       else _verdict("yes" if not below else "no: " + ", ".join(m[len("dice_"):] for m in below),
                                     not below, marked))
        stripes = ratio_to(summary, row, AUTOENCODER_ROW, "through_plane_ratio")
        stripes_cell = (_verdict(format_ratio(stripes, (lambda x: x <= THROUGH_PLANE_TARGET) if marked else None),
                                 stripes <= THROUGH_PLANE_TARGET, marked) if math.isfinite(stripes) else MISSING)
        table.append((row, str(_row_n(summary[row])), *cells, verdict, versus_base, stripes_cell,
                      order_kept_cell(summary[row].get("label_order_kept"), marked)))
    columns = ("row", "n", *(f"{label} ×real" for label in labels), "Dice target", f"≥ {BASE_ROW} on every label",
               "through-plane ×AE", "label order kept")
    lines = (f"LABEL ×real: the row's mean dice_LABEL / that of the row '{REAL_VOLUME_ROW}' (the same segmenter on "
             f"the real volumes); through-plane ×AE: the row's mean through_plane_ratio / that of the row "
             f"'{AUTOENCODER_ROW}'; label order kept: samples that keep the real volume's label intensity order, "
             f"of n; {MISSING} = not measured (no such reference row or metric)",
             f"targets ({MET} met, {UNMET} unmet; marked only on the GEM-3D rows): Dice {fidelity_targets_text()} "
             f"(gem3d = the test setting); ≥ {BASE_ROW} on every label; through-plane ≤ {THROUGH_PLANE_TARGET:g}× "
             f"the autoencoder's; label order kept on ≥ {LABEL_ORDER_TARGET:.0%} of samples")
    return Section("Label fidelity per label and targets", columns, table, lines)


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


def read_csv(path: str | Path) -> list[dict[str, object]]:
    """The rows of a metrics.csv that :func:`write_csv` wrote: the identity columns (``IDENTITY_KEYS``) as text,
    the other cells as floats where they are numbers, empty cells left out (as :func:`summarise` reads them)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            row: dict[str, object] = {}
            for key, text in record.items():
                if text in ("", None):
                    continue
                try:
                    row[key] = text if key in IDENTITY_KEYS else float(text)
                except ValueError:
                    row[key] = text
            rows.append(row)
    return rows


def _cell(value) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else (f"{value:.6g}" if math.isfinite(value) else str(value))
    return value


class Aggregate(tuple):
    """``(mean, std, n)`` of a metric over samples (a plain tuple to its readers), with the finite sample values
    kept in ``values`` for intervals."""

    def __new__(cls, mean: float, std: float, n: int, values: Iterable[float] = ()):
        aggregate = super().__new__(cls, (mean, std, n))
        aggregate.values = tuple(values)
        return aggregate


def summarise(rows: Sequence[Mapping[str, object]], group: str = "row") -> dict[str, dict[str, Aggregate]]:
    """``{group value: {metric: (mean, std, n)}}`` over the numeric, finite values of every metric (each an
    ``Aggregate`` that keeps its values)."""
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for metric, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample":
                finite = values.setdefault(str(row[group]), {}).setdefault(metric, [])
                if math.isfinite(value):
                    finite.append(float(value))
    return {k: {m: Aggregate(float(np.mean(v)) if v else math.nan, float(np.std(v)) if v else math.nan, len(v), v)
                for m, v in metrics.items()} for k, metrics in values.items()}


def bootstrap_ci(values: Sequence[float], confidence: float = CONFIDENCE, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (scipy.stats.bootstrap, seeded); ``(nan, nan)`` with
    fewer than 2 finite values."""
    finite = np.asarray([v for v in values if math.isfinite(v)], float)
    if finite.size < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical values: a zero-width interval, which is the right answer
        result = stats.bootstrap((finite,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                 method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def format_value(mean: float, std: float, n: int) -> str:
    """``mean ± std`` (``mean`` alone for one sample or a set-level value; an em dash when nothing was measured)."""
    if n == 0 or math.isnan(mean):
        return MISSING
    if not math.isfinite(mean):
        return str(mean)
    std = 0.0 if abs(std) <= 1e-12 * max(abs(mean), 1.0) else std  # rounding noise of identical values
    return f"{mean:.4g}" if n == 1 or not math.isfinite(std) else f"{mean:.4g} ± {std:.2g}"


def format_interval(aggregate: Sequence) -> str:
    """``[low, high]``: the 95 % bootstrap interval of the mean where ``aggregate`` keeps >= 2 values, else ``""``."""
    low, high = bootstrap_ci(getattr(aggregate, "values", ()))
    return f"[{low:.4g}, {high:.4g}]" if math.isfinite(low) and math.isfinite(high) else ""


def is_yardstick(row: str) -> bool:
    """Reference rows and the real volumes: they set the bars, and are never marked."""
    return row == REAL_ROW or row.startswith(REFERENCE_PREFIX)


def order_rows(rows: Iterable[str]) -> list[str]:
    """Yardsticks first (``YARDSTICK_ORDER``, then other reference rows), then ``LEAD_ROWS``, then the rest as given."""
    rows = list(dict.fromkeys(rows))
    first = [r for r in YARDSTICK_ORDER if r in rows]
    first += [r for r in rows if is_yardstick(r) and r not in first]
    lead = [r for r in LEAD_ROWS if r in rows and r not in first]
    return first + lead + [r for r in rows if r not in first and r not in lead]


def _mean(summary: Mapping[str, Mapping[str, Sequence]], row: str | None, metric: str) -> float:
    value = summary.get(row or "", {}).get(metric)
    return float(value[0]) if value is not None and value[2] else math.nan


def mark(column: HeadlineColumn, row: str,
         summary: Mapping[str, Mapping[str, Sequence]]) -> tuple[str, str, str] | None:
    """``(CSS class, symbol, reason)`` when ``row``'s mean of ``column.metric`` loses to its yardstick row or misses
    its target, else None (also for yardstick rows and where a value is missing)."""
    value = _mean(summary, row, column.metric)
    if is_yardstick(row) or row == column.yardstick or not math.isfinite(value):
        return None
    target = _mean(summary, column.yardstick, column.metric)
    if column.yardstick is not None and not math.isfinite(target):
        return None
    loses = {"below": lambda: value < target, "above_times": lambda: value > column.bound * target,
             "farther_from_one": lambda: abs(value - 1) > abs(target - 1),
             "abs_above": lambda: abs(value) > column.bound, "below_bound": lambda: value < column.bound}
    if column.rule not in loses:
        raise ValueError(f"unknown headline rule {column.rule!r}; allowed: {sorted(loses)}")
    if not loses[column.rule]():
        return None
    kind, symbol = LOSES if column.yardstick is not None else MISSES
    reason = RULE_TEXT[column.rule].format(yardstick=column.yardstick, bound=column.bound)
    return kind, symbol, reason + (f" ({target:.4g})" if column.yardstick is not None else "")


def headline_columns(summary: Mapping[str, Mapping[str, Sequence]]) -> list[HeadlineColumn]:
    """The ``HEADLINE`` columns that some row of ``summary`` has."""
    present = {m for values in summary.values() for m in values}
    return [c for c in HEADLINE if c.metric in present]


def headline_rows(summary: Mapping[str, Mapping[str, Sequence]]) -> list[str]:
    """Rows of ``summary`` with a headline metric, in ``order_rows`` order."""
    metrics = {c.metric for c in HEADLINE}
    return [r for r in order_rows(summary) if metrics & set(summary[r])]


def versus_autoencoder(row: str, summary: Mapping[str, Mapping[str, Sequence]]) -> str:
    """``'1.15×AE'``: the row's through-plane ratio over the autoencoder's (``""`` for the autoencoder itself or
    without one)."""
    value, ceiling = (_mean(summary, r, "through_plane_ratio") for r in (row, AUTOENCODER_ROW))
    if row == AUTOENCODER_ROW or not (math.isfinite(value) and math.isfinite(ceiling) and ceiling > 0):
        return ""
    return f"{value / ceiling:.3g}×AE"


def _row_n(values: Mapping[str, Sequence]) -> int:
    return max((int(v[2]) for v in values.values()), default=0)


def _table(summary: Mapping[str, Mapping[str, Sequence]], metrics: Sequence[str], rows: Sequence[str] | None = None,
           marks: bool = False) -> list[str]:
    """Markdown table: rows x ``metrics`` (mean ± std, the bootstrap interval and a mark where ``marks``)."""
    columns = {c.metric: c for c in HEADLINE}
    lines = ["| row | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for row in rows if rows is not None else list(summary):
        values = summary[row]
        if not any(m in values for m in metrics):
            continue
        cells = []
        for metric in metrics:
            if metric not in values:
                cells.append(MISSING)
                continue
            text = " ".join(filter(None, [format_value(*values[metric][:3]), format_interval(values[metric])]))
            flag = mark(columns[metric], row, summary) if marks and metric in columns else None
            cells.append(f"{text} {flag[1]}" if flag else text)
        lines.append(f"| {row} | {_row_n(values)} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(summary: Mapping[str, Mapping[str, Sequence]], metrics: Sequence[str],
                     notes: Sequence[str] = (), extra_tables: Mapping[str, Sequence[str]] | None = None,
                     sections: Sequence[Section] = ()) -> str:
    """A short markdown summary: the headline table (``HEADLINE`` columns that are present; rows yardsticks first;
    cells mean ± std [95 % bootstrap interval], marked where they lose), the set-level and counterfactual metrics
    among ``metrics`` in a table each, a line per column on what it means, and ``notes``. The other ``metrics`` and
    the ``extra_tables`` (title -> metrics) are named with a pointer to report.html and metrics.csv. ``sections``
    follow the column lines."""
    columns = headline_columns(summary)
    headline = [c.metric for c in columns]
    lines = ["# Evaluation summary", "",
             f"Cells: mean ± std over samples, [{CONFIDENCE:.0%} bootstrap interval of the mean] where n ≥ 2; "
             f"{LOSES[1]} = loses to a yardstick row, {MISSES[1]} = misses a target (see the column lines).", ""]
    lines += _table(summary, headline, headline_rows(summary), marks=True)
    lines += ["", "## Columns", ""]
    for column in columns:
        rule = RULE_TEXT[column.rule].format(yardstick=column.yardstick, bound=column.bound)
        lines.append(f"- `{column.metric}` ({column.header}): {column.meaning}. Marked when {rule}.")
    for section in sections:
        lines += section.markdown()
    shown = set(headline)
    for title, group in (("Set-level metrics", SET_METRICS), ("Counterfactual", COUNTERFACTUAL_METRICS)):
        chosen = [m for m in metrics if m in group]
        if chosen:
            shown |= set(chosen)
            lines += ["", f"## {title}", ""] + _table(summary, chosen, order_rows(summary))
            lines += [""] + [f"- `{m}`: {describe(m)}" for m in chosen]
    elsewhere = [m for m in metrics if m not in shown]
    lines += ["", "## More", ""]
    if elsewhere:
        lines.append("- Also per row in report.html (every metric) and per sample in metrics.csv: "
                     + ", ".join(f"`{m}`" for m in elsewhere) + ".")
    for title, group in (extra_tables or {}).items():
        if group:
            lines.append(f"- {title}: {len(group)} metrics, folded in report.html, per sample in metrics.csv.")
    lines.append("- report.html also holds a gallery of one case across every row and the plots.")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots
MAX_LINES_PER_AXES = 4  # more series than this: small multiples
PANEL_SIZE = (230, 170)  # (width, height) in pixels of one small panel
PANEL_COLUMNS = 5  # panels per line: 5 x 230 px fits a 1280 px page
REFERENCE_COLOUR = "0.55"  # the reference series in every panel: grey


def line_plot(path: str | Path, series: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str,
              ylabel: str, size: tuple[int, int] = (480, 320), *, panels: bool | None = None,
              reference: str | None = None, panel_size: tuple[int, int] = PANEL_SIZE,
              columns: int = PANEL_COLUMNS) -> Path:
    """A PNG line plot (matplotlib, Agg) of named ``(x, y)`` series; NaNs break lines, dots mark the points.

    - One axes with a legend: ``size`` = ``(width, height)`` in pixels.
    - ``panels`` (default: with more than ``MAX_LINES_PER_AXES`` series): small multiples, one panel per series
      titled with its name, in ``order_rows`` order, each with ``reference`` (default: the first series) drawn in
      grey beside it, on shared axes; ``columns`` panels of ``panel_size`` pixels per line, ``size`` unused.
    """
    if panels is None:
        panels = len(series) > MAX_LINES_PER_AXES
    if not panels:
        figure = Figure(figsize=(size[0] / PLOT_DPI, size[1] / PLOT_DPI), dpi=PLOT_DPI, layout="constrained")
        axes = figure.add_subplot()
        for name, (x, y) in series.items():
            axes.plot(x, y, marker=".", markersize=3, label=name)
        axes.set_title(title, fontsize="small")
        axes.set(xlabel=xlabel, ylabel=ylabel)
        if series:
            axes.legend(fontsize="x-small")
    else:
        figure = _small_multiples(series, title, xlabel, ylabel, reference, panel_size, columns)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def _small_multiples(series: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str,
                     reference: str | None, panel_size: tuple[int, int], columns: int) -> Figure:
    """One panel per series but ``reference`` (grey in each): see ``line_plot``."""
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    names = list(series)
    reference = names[0] if reference is None and names else reference
    if reference is not None and reference not in series:
        raise ValueError(f"reference {reference!r} is not a series; the series are {names}")
    shown = order_rows(n for n in names if n != reference) or names
    n_columns = min(columns, max(len(shown), 1))
    n_lines = max(math.ceil(len(shown) / n_columns), 1)
    title_height = 40
    figure = Figure(figsize=(n_columns * panel_size[0] / PLOT_DPI,
                             (n_lines * panel_size[1] + title_height) / PLOT_DPI), dpi=PLOT_DPI, layout="constrained")
    grid = figure.subplots(n_lines, n_columns, sharex=True, sharey=True, squeeze=False)
    for axes, name in zip(grid.flat, shown):
        if reference is not None and name != reference:
            axes.plot(*series[reference], color=REFERENCE_COLOUR, linewidth=1.2, label=reference)
        axes.plot(*series[name], color="C0", marker=".", markersize=2, linewidth=1.2, label=name)
        axes.set_title("\n".join(textwrap.wrap(name, 30)) or " ", fontsize="x-small")
        axes.tick_params(labelsize="xx-small")
    for axes in list(grid.flat)[len(shown):]:
        axes.set_visible(False)
    suffix = f" (grey: {reference})" if reference is not None and len(names) > 1 else ""
    figure.suptitle(title + suffix, fontsize="small")
    figure.supxlabel(xlabel, fontsize="x-small")
    figure.supylabel(ylabel, fontsize="x-small")
    return figure


def image_grid(path: str | Path, lines: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]], title: str,
               panel_size: int = 120, value_range: tuple[float, float] = (0.0, 1.0)) -> Path:
    """A PNG grid of grey 2-D images drawn with ``origin="lower"``: ``lines`` of ``(line name, [(panel title,
    image (H, W)), ...])``, one line per entry, every panel on the grey scale ``value_range``, the line's name on
    its first panel."""
    lines = [(name, list(panels)) for name, panels in lines]
    if not lines or not any(panels for _, panels in lines):
        raise ValueError("image_grid needs at least one line with one image")
    n_columns = max(len(panels) for _, panels in lines)
    figure = Figure(figsize=(n_columns * panel_size / PLOT_DPI, (len(lines) * (panel_size + 16) + 30) / PLOT_DPI),
                    dpi=PLOT_DPI, layout="constrained")
    grid = figure.subplots(len(lines), n_columns, squeeze=False)
    for axes_line, (name, panels) in zip(grid, lines):
        for column, axes in enumerate(axes_line):
            axes.set_xticks([])
            axes.set_yticks([])
            if column >= len(panels):
                axes.set_visible(False)
                continue
            panel_title, image = panels[column]
            axes.imshow(np.asarray(image, float), cmap="gray", vmin=value_range[0], vmax=value_range[1],
                        origin="lower", interpolation="nearest")
            axes.set_title(panel_title, fontsize="xx-small")
        axes_line[0].set_ylabel(name, fontsize="x-small")
    figure.suptitle(title, fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def density(values: np.ndarray, bins: int = 50,
            value_range: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """``(bin centres, density)`` of the finite ``values`` (numpy histogram, density=True; NaN without values)."""
    values = np.asarray(values, float)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    with np.errstate(invalid="ignore"):
        hist, _ = np.histogram(values[np.isfinite(values)], bins=edges, density=True)
    return (edges[:-1] + edges[1:]) / 2, hist


# ------------------------------------------------------------------------------------------------ html
STYLE = """
body{font-family:system-ui,sans-serif;font-size:14px;color:#222;max-width:1240px;margin:1em auto;padding:0 10px}
h2{margin-top:1.4em;font-size:1.2em} table{border-collapse:collapse;font-size:12.5px;margin:.4em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
thead th{background:#eef0f4;text-align:center} th[scope=row]{text-align:left;font-weight:normal}
tr.yardstick th,tr.yardstick td{background:#f6f6fa} tr.yardstick th[scope=row]{font-style:italic}
.ci,.extra{display:block;font-size:11px;color:#666} .extra{color:#345}
td.loses{background:#fde0e0} td.misses{background:#fff0d0}
.mark{font-weight:bold;margin-left:2px} .loses .mark,span.loses{color:#b00000} .misses .mark,span.misses{color:#a05a00}
.wide{overflow-x:auto;max-width:100%} .legend dt{font-weight:bold;margin-top:.3em} .legend dd{margin-left:1.5em}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:10px}
figure{margin:0} figure img{width:100%;height:auto;border:1px solid #ddd} figcaption{font-size:12px;margin:2px 0}
img.plot{max-width:100%;height:auto;display:block;margin:10px 0;border:1px solid #eee}
.compact th,.compact td{font-size:11px;padding:2px 4px;white-space:nowrap} .compact thead th{white-space:normal}
details{margin:.5em 0} details details{margin-left:1em} summary{cursor:pointer;font-weight:600}
"""
IDENTITY_KEYS = ("row", "case", "setting", "sample", "informed_from")
TABLE_COLUMNS = 8  # value columns per folded table: wider tables are split, so that 1280 px hold them


def _esc(value: object) -> str:
    return html.escape(str(value))


def _image_tag(path: Path, base: Path, embed: bool, css_class: str = "", alt: str = "") -> str:
    attributes = f' class="{css_class}"' if css_class else ""
    alt = _esc(alt or path.name)
    if embed:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}"{attributes} alt="{alt}">'
    source = path.relative_to(base) if path.is_relative_to(base) else path
    return f'<img src="{_esc(source.as_posix())}"{attributes} alt="{alt}">'


def _fmt(value) -> str:
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:.4g}"
    return MISSING if value is None or value == "" else str(value)


def _stat_cell(aggregate: Sequence | None, flag: tuple[str, str, str] | None = None, extra: str = "",
               interval: bool = True) -> str:
    """``<td>``: mean ± std, the bootstrap interval under it (``interval``), ``extra`` under that, and a mark."""
    if aggregate is None:
        return f"<td>{MISSING}</td>"
    text = _esc(format_value(*aggregate[:3]))
    ci = format_interval(aggregate) if interval else ""
    attributes = ""
    if flag:
        attributes = f' class="{flag[0]}" title="{_esc(flag[2])}"'
        text += f'<span class="mark">{flag[1]}</span>'
    if ci:
        text += f'<span class="ci">{_esc(ci)}</span>'
    if extra:
        text += f'<span class="extra">{_esc(extra)}</span>'
    return f"<td{attributes}>{text}</td>"


def headline_html(summary: Mapping[str, Mapping[str, Sequence]]) -> str:
    """The headline ``<table class="headline">`` and its legend (empty without headline metrics)."""
    columns = headline_columns(summary)
    if not columns:
        return "<p>No headline metric was computed (see the notes).</p>"
    head = "".join(f'<th scope="col" title="{_esc(c.meaning)}">{_esc(c.header)}</th>' for c in columns)
    body = []
    for row in headline_rows(summary):
        values = summary[row]
        cells = []
        for column in columns:
            extra = versus_autoencoder(row, summary) if column.metric == "through_plane_ratio" else ""
            cells.append(_stat_cell(values.get(column.metric), mark(column, row, summary), extra))
        kind = ' class="yardstick"' if is_yardstick(row) else ""
        body.append(f'<tr{kind}><th scope="row">{_esc(row)}</th><td>{_row_n(values)}</td>{"".join(cells)}</tr>')
    table = (f'<div class="wide"><table class="headline"><thead><tr><th scope="col">row</th><th scope="col">n</th>'
             f'{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    legend = ['<dl class="legend">',
              f"<dt>cells</dt><dd>mean ± std over the row's samples (n); under it the {CONFIDENCE:.0%} bootstrap "
              "interval of the mean (percentile, 9999 resamples) where n ≥ 2; a value alone is one sample. "
              f"{MISSING} = not measured. Shaded rows (italic) are yardsticks: they are never marked.</dd>",
              f'<dt>marks</dt><dd><span class="loses">{LOSES[1]}</span> loses to a yardstick row, '
              f'<span class="misses">{MISSES[1]}</span> misses a target; hover a marked value for the bar.</dd>']
    for column in columns:
        rule = RULE_TEXT[column.rule].format(yardstick=column.yardstick, bound=column.bound)
        kind, symbol = LOSES if column.yardstick is not None else MISSES
        legend.append(f"<dt>{_esc(column.header)} <code>{_esc(column.metric)}</code></dt><dd>{_esc(column.meaning)}. "
                      f'<span class="{kind}">{symbol}</span> when {_esc(rule)}.</dd>')
    return table + "".join(legend) + "</dl>"


def per_label_tables(summary: Mapping[str, Mapping[str, Sequence]]) -> list[tuple[str, list[str], list[str]]]:
    """``[(family, labels, metrics)]``: the per-label metrics of ``summary`` (``PER_LABEL_FAMILIES``), one label per
    column, first-seen order."""
    present = list(dict.fromkeys(m for values in summary.values() for m in values))
    tables = []
    for family in PER_LABEL_FAMILIES:
        metrics = [m for m in present if m.startswith(family + "_") and m not in METRIC_DESCRIPTIONS]
        if metrics:
            tables.append((family, [m[len(family) + 1:] for m in metrics], metrics))
    return tables


def _per_label_html(summary: Mapping[str, Mapping[str, Sequence]]) -> str:
    parts = []
    rows = order_rows(summary)
    for family, labels, metrics in per_label_tables(summary):
        head = "".join(f'<th scope="col">{_esc(label)}</th>' for label in labels)
        body = "".join(f'<tr><th scope="row">{_esc(row)}</th>'
                       + "".join(_stat_cell(summary[row].get(m), interval=False) for m in metrics) + "</tr>"
                       for row in rows if any(m in summary[row] for m in metrics))
        parts.append(f"<h3><code>{_esc(family)}</code>: {_esc(METRIC_DESCRIPTIONS[family])}</h3>"
                     f'<div class="wide"><table><thead><tr><th scope="col">row</th>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table></div>")
    return "".join(parts)


def is_pair_row(values: Mapping[str, Sequence]) -> bool:
    """A counterfactual pair's row (its metrics compare two outputs, not a volume with its real case)."""
    return any(m in COUNTERFACTUAL_METRICS or m.startswith("corr_") for m in values)


def _stacked_tables(corner: str, heads: Sequence[str], lines: Sequence[tuple[str, Sequence[str]]]) -> str:
    """Compact tables of ``lines`` (``(row header HTML, cell HTMLs)``) under the column ``heads`` (HTML), at most
    ``TABLE_COLUMNS`` value columns each: wider ones are stacked instead of scrolling sideways."""
    parts = []
    for start in range(0, max(len(heads), 1), TABLE_COLUMNS):
        head = "".join(heads[start:start + TABLE_COLUMNS])
        body = "".join(f"<tr>{line}{''.join(cells[start:start + TABLE_COLUMNS])}</tr>" for line, cells in lines)
        parts.append(f'<div class="wide"><table class="compact"><thead><tr><th scope="col">{_esc(corner)}</th>'
                     f"{head}</tr></thead><tbody>{body}</tbody></table></div>")
    return "".join(parts)


def _metric_header(metric: str) -> str:
    return f'<th scope="row" title="{_esc(describe(metric))}"><code>{_esc(metric)}</code></th>'


def _every_metric_html(summary: Mapping[str, Mapping[str, Sequence]]) -> str:
    """Metrics down, rows across; counterfactual pairs apart (pairs down, their metrics across)."""
    rows = [r for r in order_rows(summary) if not is_pair_row(summary[r])]
    pairs = [r for r in order_rows(summary) if is_pair_row(summary[r])]
    parts = []
    if rows:
        metrics = list(dict.fromkeys(m for row in rows for m in summary[row]))
        lines = [(_metric_header(m), [_stat_cell(summary[r].get(m), interval=False) for r in rows]) for m in metrics]
        parts.append(_stacked_tables("metric", [f'<th scope="col">{_esc(r)}</th>' for r in rows], lines))
    if pairs:
        metrics = list(dict.fromkeys(m for pair in pairs for m in summary[pair]))
        lines = [(f'<th scope="row">{_esc(pair)}</th>', [_stat_cell(summary[pair].get(m), interval=False)
                                                          for m in metrics]) for pair in pairs]
        heads = [f'<th scope="col" title="{_esc(describe(m))}">{_esc(m)}</th>' for m in metrics]
        parts.append(_stacked_tables("counterfactual pair", heads, lines))
    return "".join(parts)


def _per_sample_html(samples: Sequence[tuple[Path | None, Mapping]], columns: Sequence[str]) -> str:
    """One folded table per row: metrics down, samples across."""
    by_row: dict[str, list[Mapping]] = {}
    for _, row in samples:
        by_row.setdefault(str(row.get("row", "")), []).append(row)
    parts = []
    for name in order_rows(by_row):
        rows = by_row[name]
        metrics = [c for c in columns if c not in IDENTITY_KEYS and any(r.get(c, "") != "" for r in rows)]
        heads = [f'<th scope="col">{_esc(r.get("case", "?"))} #{_esc(r.get("sample", 0))}'
                 + (f'<span class="ci">from {_esc(r["informed_from"])}</span>' if r.get("informed_from") else "")
                 + "</th>" for r in rows]
        lines = [(_metric_header(m), [f"<td>{_esc(_fmt(r.get(m, '')))}</td>" for r in rows]) for m in metrics]
        parts.append(f"<details><summary>{_esc(name)} ({len(rows)} sample{'s' if len(rows) != 1 else ''})</summary>"
                     f"{_stacked_tables('metric', heads, lines)}</details>")
    return "".join(parts)


def gallery_case(samples: Sequence[tuple[Path | None, Mapping]]) -> str | None:
    """The case whose existing previews cover the most rows (the first such case in sample order), or None."""
    rows_by_case: dict[str, set[str]] = {}
    for preview, row in samples:
        if preview is not None and Path(preview).is_file():
            rows_by_case.setdefault(str(row.get("case")), set()).add(str(row.get("row")))
    return max(rows_by_case, key=lambda case: len(rows_by_case[case]), default=None)


def _gallery_html(samples: Sequence[tuple[Path | None, Mapping]], case: str, base: Path, embed: bool) -> str:
    """Every row's previews of ``case``, side by side (rows in ``order_rows`` order)."""
    figures: dict[str, list[str]] = {}
    for preview, row in samples:
        if str(row.get("case")) == case and preview is not None and Path(preview).is_file():
            name = str(row.get("row"))
            caption = name if row.get("sample", 0) in (0, "0", "") else f"{name} #{row.get('sample')}"
            figures.setdefault(name, []).append(
                f"<figure>{_image_tag(Path(preview), base, embed, alt=f'{caption}: {case}')}"
                f"<figcaption>{_esc(caption)}</figcaption></figure>")
    return '<div class="gallery">' + "".join(f for name in order_rows(figures) for f in figures[name]) + "</div>"


def write_html(path: str | Path, summary_md_table: str, plots: Sequence[Path],
               samples: Sequence[tuple[Path | None, Mapping]], columns: Sequence[str], notes: Sequence[str],
               embed: bool = True, *, summary: Mapping[str, Mapping[str, Sequence]] | None = None,
               sections: Sequence[Section] = ()) -> Path:
    """``report.html``, readable in a browser and offline (no external resource):

    1. the headline table (``headline_html``) and its legend, then the ``sections``;
    2. a gallery: the previews of the case most rows have, side by side;
    3. the ``plots``;
    4. folded (``<details>``): per-label tables, every metric per row, per-sample values (metrics ``columns``),
       the previews of the other cases;
    5. the ``notes``.

    ``samples``: ``(preview PNG or None, metric row)`` per sample; ``summary``: ``summarise``'s output plus any
    set-level values (default: summarised from the samples' rows). ``summary_md_table`` (summary.md's text) is
    accepted for callers and not shown: its tables are rendered from ``summary``. Images are embedded as base64
    (``embed``) or linked by relative path."""
    del summary_md_table  # rendered from ``summary`` as real tables instead of markdown text
    base = Path(path).parent
    summary = summary if summary is not None else summarise([row for _, row in samples])
    case = gallery_case(samples)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>gem3d evaluation</title><style>{STYLE}</style></head><body>",
             "<h1>gem3d evaluation</h1>", "<h2>Headline</h2>", headline_html(summary)]
    parts += [section.html(base, embed) for section in sections]
    if case is not None:
        parts.append(f"<h2>Gallery: case {_esc(case)} in every row</h2>")
        parts.append("<p>Each preview: the real volume, the row's volume and the mask (axial, coronal, sagittal).</p>")
        parts.append(_gallery_html(samples, case, base, embed))
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [_image_tag(Path(p), base, embed, "plot", Path(p).stem.replace("_", " ")) for p in plots]
    parts.append("<h2>Details</h2>")
    per_label = _per_label_html(summary)
    if per_label:
        parts.append(f"<details><summary>Per label (inside each label of the mask)</summary>{per_label}</details>")
    parts.append(f"<details><summary>Every metric, mean ± std per row</summary>{_every_metric_html(summary)}"
                 "</details>")
    if samples:
        parts.append(f"<details><summary>Per sample</summary>{_per_sample_html(samples, columns)}</details>")
    others = list(dict.fromkeys(str(row.get("case")) for preview, row in samples
                                if preview is not None and Path(preview).is_file() and str(row.get("case")) != case))
    if others:
        parts.append("<details><summary>Previews of the other cases</summary>"
                     + "".join(f"<h3>case {_esc(other)}</h3>{_gallery_html(samples, other, base, embed)}"
                               for other in others) + "</details>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return atomic_write_text(path, "\n".join(parts))


# ------------------------------------------------------------------------------------------------ the command
def main(argv=None) -> int:
    """``python -m gem3d.metrics.report REPORT/metrics.csv``: print the label-fidelity and targets table
    (:func:`targets_section`) of an evaluation's metrics.csv, without reading a volume again."""
    parser = argparse.ArgumentParser(description="Print the label-fidelity and targets table of an evaluation's "
                                     "metrics.csv (Dice per label ×real, ≥ base, through-plane ×AE, label order "
                                     "kept), without reading a volume again.")
    parser.add_argument("metrics_csv", type=Path, help="metrics.csv of scripts/evaluate.py")
    args = parser.parse_args(argv)
    if not args.metrics_csv.is_file():
        parser.error(f"no such file: {args.metrics_csv}")
    section = targets_section(summarise(read_csv(args.metrics_csv)))
    if section is None:
        print(f"{args.metrics_csv}: no synthetic row has dice_<label>, through_plane_ratio or label_order_kept")
        return 1
    print("\n".join(section.markdown()).strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
