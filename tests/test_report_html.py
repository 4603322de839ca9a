"""gem3d.metrics.report: the headline table, its marks and intervals, the folded details, the gallery, the short
summary.md, small-multiple plots, and a headless-Chromium check that the page renders."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gem3d.metrics import report
from gem3d.metrics.report import AUTOENCODER_ROW, COPY_ROW, REAL_ROW

CASES = ("case_000", "case_001", "case_002")
SYNTHETIC_ROWS = ("gem3d", "base", "stage1-alone", "ic", "icma", "ig", "igma")  # the evaluation's order
# per-row means of the headline metrics; gem3d loses to the copy row on PSNR and to base on Dice
MEANS = {
    COPY_ROW: dict(psnr_body=20.0, ssim_axial_body=0.60, slice_jump_ratio=0.5, through_plane_ratio=0.50,
                   outside_mean_diff=0.0, label_order_kept=1.0),
    AUTOENCODER_ROW: dict(psnr_body=30.0, ssim_axial_body=0.90, slice_jump_ratio=1.1, through_plane_ratio=0.74,
                          outside_mean_diff=0.001, label_order_kept=1.0),
    "gem3d": dict(psnr_body=19.0, ssim_axial_body=0.70, slice_jump_ratio=1.3, through_plane_ratio=0.888,
                  outside_mean_diff=0.05, label_order_kept=1 / 3, dice_mean=0.06, dice_ratio=0.08),
    "base": dict(psnr_body=22.0, ssim_axial_body=0.65, slice_jump_ratio=1.05, through_plane_ratio=0.80,
                 outside_mean_diff=0.01, label_order_kept=1.0, dice_mean=0.51, dice_ratio=0.68),
    "stage1-alone": dict(psnr_body=21.0, ssim_axial_body=0.66, slice_jump_ratio=1.2, through_plane_ratio=0.90,
                         outside_mean_diff=-0.03, label_order_kept=2 / 3, dice_mean=0.05, dice_ratio=0.07),
    "ic": dict(psnr_body=float("nan"), ssim_axial_body=float("nan"), slice_jump_ratio=1.0, through_plane_ratio=0.75,
               outside_mean_diff=0.0, label_order_kept=1.0, dice_mean=0.60, dice_ratio=0.80),
}


class _Tables(HTMLParser):
    """Every ``<table>``: its class, whether it sits inside ``<details>``, and its rows of ``(tag, attrs, text)``."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.pre = [], [], 0
        self._details = 0
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self._details += 1
        elif tag == "table":
            self.tables.append({"class": attrs.get("class", ""), "folded": self._details > 0, "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = [tag, attrs, ""]
            self.tables[-1]["rows"][-1].append(self._cell)
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if tag == "details":
            self._details -= 1
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data


def parse(text: str) -> _Tables:
    parser = _Tables()
    parser.feed(text)
    return parser


def headline(page: _Tables) -> dict[str, dict[str, list]]:
    """``{row: {column header: [tag, attrs, text]}}`` of the page's one headline table."""
    (table,) = [t for t in page.tables if t["class"] == "headline"]
    header = [cell[2] for cell in table["rows"][0]]
    return {row[0][2]: dict(zip(header, row)) for row in table["rows"][1:]}


def _sample_rows() -> list[dict]:
    """Three cases per row (case_002 of ``ig`` missing); the second case's values 10 % above the row mean, the third
    10 % below, so each mean is MEANS'."""
    rng = np.random.default_rng(0)
    rows = []
    for name in (COPY_ROW, AUTOENCODER_ROW, *SYNTHETIC_ROWS):
        means = MEANS.get(name, MEANS["base"])
        for index, case in enumerate(CASES):
            if name == "ig" and case == "case_002":
                continue
            scale = (1.0, 1.1, 0.9)[index] if name not in ("gem3d", "stage1-alone") else 1.0
            row = {"row": name, "case": case, "setting": name, "sample": 0, "informed_from": f"{case}:6"}
            row.update({m: v * scale for m, v in means.items()})
            if name == "gem3d":  # label_order_kept per sample: 1, 0, 0
                row["label_order_kept"] = float(index == 0)
            row.update({f"mean_diff_{label}": float(rng.normal(0, 0.1)) for label in ("edema", "enhancing")})
            row["dice_edema"] = row.get("dice_mean", math.nan)
            rows.append(row)
    return rows


def build_report(folder: Path, embed: bool = True, missing_preview: tuple[str, str] = ("ig", "case_000")) -> dict:
    """A report of 9 rows x 3 cases written by ``report``'s own functions: previews as small PNGs, two plots."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = _sample_rows()
    samples = []
    for index, row in enumerate(rows):
        preview = folder / "previews" / f"{index:02d}.png"
        if (row["row"], row["case"]) != missing_preview:
            preview.parent.mkdir(exist_ok=True)
            Image.fromarray(np.full((40, 60, 3), 10 * index, np.uint8)).save(preview)
        samples.append((preview, row))
    real = [{"row": REAL_ROW, "case": c, "sample": 0, "slice_jump_ratio": 1.0, "through_plane_ratio": 0.69,
             "outside_mean_diff": 0.0, "label_order_kept": 1.0} for c in CASES]
    summary = report.summarise(rows + real)
    summary["gem3d"]["fid_25d"] = (12.5, math.nan, 3)  # a set-level value
    summary |= report.summarise([{"row": "counterfactual: ic vs icma", "mean_abs_diff": 0.25, "follows_donor": 1.0}])
    x = np.linspace(0, 1, 20)
    series = {"real": (x, x)} | {name: (x, x ** (i + 2)) for i, name in enumerate((COPY_ROW, *SYNTHETIC_ROWS))}
    plots = [report.line_plot(folder / "histogram_label1.png", series, "intensity histogram", "intensity", "density"),
             report.line_plot(folder / "profile.png", dict(list(series.items())[:3]), "profile", "slice", "mean")]
    columns = list(dict.fromkeys(k for _, r in samples for k in r))
    notes = ["a note with <angle brackets>"]
    markdown = report.summary_markdown(summary, ["psnr_body", "ms_ssim", "fid_25d"], notes,
                                       {"Per label": ["mean_diff_edema", "mean_diff_enhancing"]})
    path = report.write_html(folder / "report.html", markdown, plots, samples, columns, notes, embed=embed,
                             summary=summary)
    return {"path": path, "markdown": markdown, "summary": summary, "samples": samples, "plots": plots}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_report(tmp_path_factory.mktemp("report"))


# ------------------------------------------------------------------------------------------------ headline
def test_headline_is_one_table_with_the_yardsticks_first_and_the_deciding_columns(built):
    page = parse(built["path"].read_text())
    table = headline(page)
    assert list(table) == [COPY_ROW, AUTOENCODER_ROW, REAL_ROW, "stage1-alone", "gem3d", "base", "ic", "icma", "ig",
                           "igma"]
    headers = list(table["gem3d"])
    assert headers == ["row", "n"] + [c.header for c in report.HEADLINE]
    assert page.pre == 0  # no markdown in <pre>
    assert not [t for t in page.tables if t["class"] == "headline" and t["folded"]]
    assert table["ig"]["n"][2] == "2" and table["gem3d"]["n"][2] == "3"
    assert {row: cells["row"][1].get("scope") for row, cells in table.items()} == dict.fromkeys(table, "row")


def test_values_that_lose_to_a_yardstick_or_miss_a_target_are_marked(built):
    table = headline(parse(built["path"].read_text()))
    psnr, dice = "PSNR body (dB)", "Dice mean"
    tag, attrs, text = table["gem3d"][psnr]
    assert attrs["class"] == "loses" and "▼" in text
    assert attrs["title"] == f"below the row '{COPY_ROW}' (20)"
    assert table["gem3d"][dice][1] == {"class": "loses", "title": "below the row 'base' (0.51)"}
    assert "class" not in table["ic"][dice][1] and "class" not in table["base"][dice][1]  # base: the yardstick
    assert "class" not in table["base"][psnr][1]  # 22 > 20
    assert table["gem3d"]["outside diff"][1]["class"] == "misses" and "✗" in table["gem3d"]["outside diff"][2]
    assert table["stage1-alone"]["outside diff"][1]["class"] == "misses"  # |-0.03| > 0.02
    assert table["gem3d"]["label order kept"][1]["title"] == "below the target 0.9"
    gradient = "through / in-plane gradient"
    assert table["gem3d"][gradient][1]["title"] == f"above 1.1 × the row '{AUTOENCODER_ROW}' (0.74)"  # 1.2 x 0.74
    assert "class" not in table["base"][gradient][1]  # 0.80 < 1.1 x 0.74
    jumps = "slice jumps ×real"
    assert table["gem3d"][jumps][1]["class"] == "loses" and "class" not in table["base"][jumps][1]
    for row in (COPY_ROW, AUTOENCODER_ROW, REAL_ROW):  # yardsticks are never marked
        assert not any("class" in cell[1] for cell in table[row].values()), row


def test_cells_hold_mean_std_and_the_bootstrap_interval_and_an_em_dash_when_missing(built):
    text = built["path"].read_text()
    table = headline(parse(text))
    values = [20.0, 22.0, 18.0]  # the copy row's psnr_body
    low, high = report.bootstrap_ci(values)
    assert table[COPY_ROW]["PSNR body (dB)"][2] == f"20 ± {np.std(values):.2g}[{low:.4g}, {high:.4g}]"
    assert table["ic"]["PSNR body (dB)"][2] == "—"  # all NaN
    assert table[REAL_ROW]["PSNR body (dB)"][2] == "—"  # not measured for the real volumes
    assert table[REAL_ROW]["through / in-plane gradient"][2] == "0.69 ± 0[0.69, 0.69]0.932×AE"
    assert table["gem3d"]["through / in-plane gradient"][2] == "0.888 ± 0▼[0.888, 0.888]1.2×AE"
    assert not re.search(r">\s*nan\b", text, re.IGNORECASE) and "n/a" not in text


def test_bootstrap_interval_known_answers():
    # two values: the resampled means are 0, 0.5 and 1 with probabilities 1/4, 1/2, 1/4
    assert report.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert report.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    assert all(math.isnan(v) for v in report.bootstrap_ci([1.0, math.nan]))
    values = np.random.default_rng(1).normal(5.0, 2.0, 400)
    low, high = report.bootstrap_ci(values)
    half = 1.96 * values.std() / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.04)
    assert high == pytest.approx(values.mean() + half, abs=0.04)
    assert report.bootstrap_ci(values) == (low, high)  # seeded
    assert report.format_interval(report.Aggregate(5.0, 0.0, 1, [5.0])) == ""


def test_summarise_keeps_values_and_stays_a_mean_std_n_tuple():
    summary = report.summarise([{"row": "a", "x": 1.0}, {"row": "a", "x": 3.0}, {"row": "a", "x": math.nan}])
    assert summary["a"]["x"] == (2.0, 1.0, 2) and summary["a"]["x"].values == (1.0, 3.0)
    mean, std, n = summary["a"]["x"]
    assert (mean, std, n) == (2.0, 1.0, 2)


def test_rows_are_ordered_yardsticks_then_lead_rows_then_as_given():
    given = ["ic", "base", "gem3d", "reference: other", REAL_ROW, "stage1-alone", AUTOENCODER_ROW, COPY_ROW]
    assert report.order_rows(given) == [COPY_ROW, AUTOENCODER_ROW, REAL_ROW, "reference: other", "stage1-alone",
                                        "gem3d", "base", "ic"]


def test_an_unknown_rule_is_named_with_the_allowed_ones():
    column = report.HeadlineColumn("psnr_body", "PSNR", "", "worse", COPY_ROW)
    summary = {COPY_ROW: {"psnr_body": (1.0, 0.0, 1)}, "x": {"psnr_body": (0.5, 0.0, 1)}}
    with pytest.raises(ValueError, match=r"unknown headline rule 'worse'; allowed: \['above_times', 'abs_above', "
                                         r"'below', 'below_bound', 'farther_from_one'\]"):
        report.mark(column, "x", summary)


# ------------------------------------------------------------------------------------------------ the rest of the page
def test_details_fold_the_per_label_every_metric_and_per_sample_tables(built):
    page = parse(built["path"].read_text())
    folded = [t for t in page.tables if t["folded"]]
    assert len(folded) == len(page.tables) - 1  # all but the headline
    headers = [[c[2] for c in t["rows"][0]] for t in folded]
    assert ["row", "edema", "enhancing"] in headers and ["row", "edema"] in headers  # mean_diff, dice
    every = [t for t in folded if t["rows"][0][0][2] == "metric" and "#" not in t["rows"][0][1][2]]
    assert [len(t["rows"][0]) for t in every] == [1 + 8, 1 + 2]  # 10 rows: stacked, at most 8 value columns each
    assert [c[2] for t in every for c in t["rows"][0][1:]] == list(headline(page))
    assert "fid_25d" in [r[0][2] for r in every[0]["rows"]]
    assert [[c[2] for c in r] for t in folded for r in t["rows"] if t["rows"][0][0][2] == "counterfactual pair"] == [
        ["counterfactual pair", "mean_abs_diff", "follows_donor"], ["counterfactual: ic vs icma", "0.25", "1"]]
    gem3d = [t for t in folded if [c[2] for c in t["rows"][0]][1:] == ["case_000 #0from case_000:6",
                                                                       "case_001 #0from case_001:6",
                                                                       "case_002 #0from case_002:6"]]
    assert gem3d and ["psnr_body", "19", "19", "19"] in [[c[2] for c in r] for t in gem3d for r in t["rows"]]


def test_gallery_shows_the_case_most_rows_have_and_every_preview_once(built):
    text = built["path"].read_text()
    assert report.gallery_case(built["samples"]) == "case_001"  # ig has no case_000 preview, no case_002 sample
    gallery = text.split("<h2>Gallery: case case_001 in every row</h2>")[1].split("<h2>")[0]
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", gallery)
    assert captions == [COPY_ROW, AUTOENCODER_ROW, "stage1-alone", "gem3d", "base", "ic", "icma", "ig", "igma"]
    previews = sum(1 for p, _ in built["samples"] if p.is_file())
    assert text.count("data:image/png;base64,") == previews + len(built["plots"])
    assert "&lt;angle brackets&gt;" in text


def test_linked_images_point_at_files_next_to_the_page(tmp_path):
    built = build_report(tmp_path, embed=False)
    page = parse(built["path"].read_text())
    assert page.images and "data:image" not in built["path"].read_text()
    for image in page.images:
        assert (tmp_path / image["src"]).is_file(), image["src"]


def test_summary_markdown_is_short_the_headline_with_the_same_columns(built):
    text = built["markdown"]
    tables = [line for line in text.splitlines() if line.startswith("| row |")]
    headline_metrics = [c.metric for c in report.HEADLINE]
    assert tables[0] == "| row | n | " + " | ".join(headline_metrics) + " |"
    assert tables[1] == "| row | n | fid_25d |"  # the set-level table
    assert len(tables) == 2 and "mean_diff_edema" not in text.split("## More")[0]
    lines = text.splitlines()
    gem3d = next(line for line in lines if line.startswith("| gem3d | 3 |"))
    assert "| 19 ± 0 [19, 19] ▼ |" in gem3d and "| 0.05 ± 0 [0.05, 0.05] ✗ |" in gem3d
    real = next(line for line in lines if line.startswith(f"| {REAL_ROW} | 3 |"))
    assert real.count("—") == 4  # no PSNR, SSIM, Dice
    assert "Per label: 2 metrics" in text and "`ms_ssim`" in text and "a note with <angle brackets>" in text
    assert len(lines) < 50  # 10 rows; the old summary had an 18-column table and one line per metric


# ------------------------------------------------------------------------------------------------ plots
def test_many_series_become_one_panel_each_with_the_reference_beside_it(tmp_path):
    x = np.linspace(0, 1, 40)
    series = {"real": (x, np.full_like(x, 0.5))} | {f"row {i}": (x, x * (i + 1) / 7) for i in range(7)}
    path = report.line_plot(tmp_path / "p.png", series, "histograms", "intensity", "density")
    with Image.open(path) as handle:
        png = np.asarray(handle.convert("RGB"))
    width, height = report.PANEL_SIZE
    assert png.shape == (2 * height + 40, 5 * width, 3)  # 7 panels: 5 + 2
    for index in range(10):  # the middle of each panel's axes: the lines only, no text or spines
        line, column = divmod(index, 5)
        top, left = 40 + line * height, column * width
        inner = png[top + height // 4:top + 3 * height // 4, left + width // 5:left + 9 * width // 10].astype(int)
        grey = (np.ptp(inner, axis=-1) < 4) & (inner[..., 0] > 100) & (inner[..., 0] < 180)  # REFERENCE_COLOUR 0.55
        blue = np.all(np.abs(inner - (31, 119, 180)) < 4, axis=-1)  # matplotlib's C0
        assert [bool(grey.any()), bool(blue.any())] == ([True, True] if index < 7 else [False, False]), index
    with pytest.raises(ValueError, match=r"reference 'nope' is not a series; the series are \['real', 'row 0'"):
        report.line_plot(tmp_path / "q.png", series, "t", "x", "y", reference="nope")
    assert not (tmp_path / "q.png").exists()


# ------------------------------------------------------------------------------------------------ in a browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => d.open = true);
  const headline = document.querySelector("table.headline");
  const images = [...document.images];
  const result = {
    tables: document.querySelectorAll("table").length,
    headline_rows: headline ? headline.tBodies[0].rows.length : 0,
    headline_display: headline ? getComputedStyle(headline).display : "",
    headline_overflow: headline ? headline.parentElement.scrollWidth - headline.parentElement.clientWidth : -1,
    headline_right: headline ? headline.getBoundingClientRect().right : -1,
    page_overflow: document.documentElement.scrollWidth - window.innerWidth,
    wide_tables: [...document.querySelectorAll("div.wide")].filter(d => d.scrollWidth > d.clientWidth).length,
    viewport: window.innerWidth,
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
  };
  const out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def render_check(page: Path, width: int = 1280) -> dict:
    """Open ``page`` in headless Chromium at ``width`` pixels and return what CHECK_SCRIPT measured."""
    probe = page.with_name(page.stem + "_check.html")
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},900",
           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, f"no check result from chromium (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium): the page is "
                                             "not opened in a browser")
@pytest.mark.parametrize("embed", [True, False], ids=["embedded", "linked"])
def test_the_page_renders_in_headless_chromium(tmp_path, embed):
    built = build_report(tmp_path, embed=embed)
    result = render_check(built["path"])
    assert result["viewport"] == 1280
    assert result["headline_display"] == "table" and result["headline_rows"] == 10
    assert result["tables"] == len(parse(built["path"].read_text()).tables)
    assert result["images"] == sum(1 for p, _ in built["samples"] if p.is_file()) + len(built["plots"])
    assert result["broken"] == []
    assert result["headline_overflow"] <= 0 and result["headline_right"] <= 1280
    assert result["page_overflow"] <= 0
    assert result["wide_tables"] == 0  # with every <details> open, no table scrolls sideways either


def test_sections_follow_the_headline_as_tables_in_the_page_and_the_summary(tmp_path):
    x = np.linspace(0, 1, 10)
    plot = report.line_plot(tmp_path / "histogram_informed_slices.png", {"real": (x, x), "ig": (x, x ** 2)},
                            "informed", "intensity", "density", panels=False)
    sections = [report.scale_section({"gem3d": "the window [-200, 300] <HU>", REAL_ROW: "the window [-200, 300]"}),
                report.Section("Generated informed slices", ("row", "n", "informed_w1"), [("ig", "2", "0.1")],
                               ("a line",), plot)]
    summary = report.summarise([{"row": "gem3d", "case": "a", "psnr_body": 20.0}])
    markdown = report.summary_markdown(summary, ["psnr_body"], [], sections=sections)
    assert markdown.index("## Columns") < markdown.index("## Intensity scale") < markdown.index(
        "## Generated informed slices") < markdown.index("## More")
    assert "| real | the window [-200, 300] |\n| gem3d | the window [-200, 300] <HU> |" in markdown  # report order
    text = report.write_html(tmp_path / "report.html", markdown, [], [], [], [], summary=summary,
                             sections=sections).read_text()
    assert text.index("<h2>Headline</h2>") < text.index("<h2>Intensity scale</h2>") < text.index(
        "<h2>Generated informed slices</h2>")
    assert "&lt;HU&gt;" in text and "<HU>" not in text
    page = parse(text)
    scale = next(t for t in page.tables if [c[2] for c in t["rows"][0]] == ["row", "intensity scale"])
    assert [(r[0][2], r[0][0]) for r in scale["rows"][1:]] == [(REAL_ROW, "th"), ("gem3d", "th")]
    assert 'alt="histogram informed slices"' in text and text.count("data:image/png;base64,") == 1
