"""gem3d.metrics.report.targets_section: each synthetic row's Dice per label as a ratio of the real volumes', its
through-plane ratio as a ratio of the autoencoder's, >= base on every label, the kept label order, and the
label-fidelity targets marked met or unmet; known answers from fake metric records, missing reference rows, the
re-print from metrics.csv, and the table in an evaluation's summary.md and report.html."""
from __future__ import annotations

import pytest

from gem3d.metrics import evaluation, report
from gem3d.metrics.report import AUTOENCODER_ROW, COPY_ROW, REAL_VOLUME_ROW
from gem3d.segmentation import BACKENDS, SegmenterSettings

# two samples per row: {row: {metric: per-sample values}}; the means give the ratios in EXPECTED
RECORDS = {
    REAL_VOLUME_ROW: dict(dice_edema=[0.7, 0.9], dice_core=[0.5, 0.5], through_plane_ratio=[0.7, 0.7],
                          label_order_kept=[1.0, 1.0]),
    AUTOENCODER_ROW: dict(through_plane_ratio=[0.8, 0.8], label_order_kept=[1.0, 1.0]),
    COPY_ROW: dict(through_plane_ratio=[0.0, 0.0], label_order_kept=[0.0, 1.0]),
    "ic": dict(dice_edema=[0.72, 0.72], dice_core=[0.45, 0.45], through_plane_ratio=[0.96, 0.96],
               label_order_kept=[1.0, 0.0]),
    "ig": dict(dice_edema=[0.52, 0.52], dice_core=[0.05, 0.05], through_plane_ratio=[0.84, 0.84],
               label_order_kept=[1.0, 1.0]),
    "igma": dict(dice_edema=[0.56, 0.56], dice_core=[0.35, 0.35], through_plane_ratio=[0.84, 0.84],
                 label_order_kept=[0.0, 0.0]),
    "counterfactual-t2": dict(dice_edema=[0.68, 0.68], dice_core=[0.425, 0.425], through_plane_ratio=[0.84, 0.84],
                              label_order_kept=[1.0, 1.0]),
    "mine": dict(dice_edema=[0.16, 0.16], dice_core=[0.05, 0.05], through_plane_ratio=[0.84, 0.84],
                 label_order_kept=[1.0, 0.0]),
    "base": dict(dice_edema=[0.2, 0.2], dice_core=[0.1, 0.1], through_plane_ratio=[1.2, 1.2],
                 label_order_kept=[0.0, 1.0]),
    "gem3d": dict(dice_edema=[0.3, 0.5], dice_core=[0.45, 0.45], through_plane_ratio=[0.84, 0.84],
                  label_order_kept=[1.0, 1.0]),
}
COLUMNS = ("row", "n", "edema ×real", "core ×real", "Dice target", "≥ base on every label", "through-plane ×AE",
           "label order kept")
EXPECTED = [  # the lead rows (gem3d, base) first, then the others as given; no yardstick or pair row
    ("gem3d", "2", "0.50× ✗", "0.90×", "≥ 0.8× ✗", "yes ✓", "1.05× ✓", "2/2 ✓"),
    ("base", "2", "0.25×", "0.20×", "none", "—", "1.50×", "1/2"),
    ("ic", "2", "0.90×", "0.90×", "≥ 0.8× ✓", "yes ✓", "1.20× ✗", "1/2 ✗"),
    ("ig", "2", "0.65×", "0.10× ✗", "≥ 0.6× ✗", "no: core ✗", "1.05× ✓", "2/2 ✓"),
    ("igma", "2", "0.70×", "0.70×", "≥ 0.6× ✓", "yes ✓", "1.05× ✓", "0/2 ✗"),
    ("counterfactual-t2", "2", "0.85×", "0.85×", "≥ 0.8× ✓", "yes ✓", "1.05× ✓", "2/2 ✓"),
    ("mine", "2", "0.20×", "0.10×", "none", "no: edema, core", "1.05×", "1/2"),  # no target: nothing marked
]


def _records(records: dict[str, dict[str, list[float]]]) -> list[dict]:
    rows = []
    for name, metrics in records.items():
        for index in range(len(next(iter(metrics.values())))):
            rows.append({"row": name, "case": f"case_{index:03d}", "setting": name, "sample": 0,
                         **{m: values[index] for m, values in metrics.items()}})
    return rows


def _summary(records=RECORDS) -> dict:
    summary = report.summarise(_records(records))
    summary |= report.summarise([{"row": "counterfactual: ic vs gem3d", "mean_abs_diff": 0.1, "dice_edema": 0.9}])
    return summary


def test_ratios_of_the_real_and_autoencoder_rows_with_the_targets_marked_known_answers():
    section = report.targets_section(_summary())
    assert section.title == "Label fidelity per label and targets"
    assert tuple(section.columns) == COLUMNS
    assert [tuple(row) for row in section.rows] == EXPECTED
    assert ("Dice ≥ 0.8× real on every label for gem3d, test, stage1-alone, ic, icma, counterfactual-*; "
            "≥ 0.6× for ig, igma (gem3d = the test setting); ≥ base on every label") in section.lines[1]
    assert "through-plane ≤ 1.1× the autoencoder's" in section.lines[1] and "≥ 90% of samples" in section.lines[1]


def test_a_ratio_next_to_its_target_gets_the_decimals_that_show_its_verdict():
    below = lambda x: x >= 0.6  # noqa: E731
    assert [report.format_ratio(r, below) for r in (0.599, 0.5996, 0.6, 0.613, float("nan"))] == [
        "0.599×", "0.5996×", "0.60×", "0.61×", "—"]
    assert report.format_ratio(0.599) == "0.60×" and report.format_ratio(1.1004, lambda x: x <= 1.1) == "1.1004×"
    records = {REAL_VOLUME_ROW: dict(dice_edema=[1.0]), AUTOENCODER_ROW: dict(through_plane_ratio=[1.0]),
               "ig": dict(dice_edema=[0.599], through_plane_ratio=[1.1004]),
               "mine": dict(dice_edema=[0.599], through_plane_ratio=[1.1004])}
    rows = [tuple(r) for r in report.targets_section(report.summarise(_records(records))).rows]
    assert rows == [("ig", "1", "0.599× ✗", "≥ 0.6× ✗", "—", "1.1004× ✗", "—"),
                    ("mine", "1", "0.60×", "none", "—", "1.10×", "—")]  # no target: two decimals


def test_the_targets_follow_the_demos_row_names():
    assert [report.fidelity_target(r) for r in ("gem3d", "test", "stage1-alone", "ic", "icma", "counterfactual-t1",
                                                "ig", "igma", "base", "mine", "counterfactual: ic vs icma")] == [
        0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.6, 0.6, None, None, None]


def test_base_comparison_true_false_and_without_a_base_row():
    summary = _summary()
    assert report.labels_below_base(summary, "gem3d", ["dice_edema", "dice_core"]) == []
    assert report.labels_below_base(summary, "ig", ["dice_edema", "dice_core"]) == ["dice_core"]
    assert report.labels_below_base(summary, "base", ["dice_edema"]) is None
    assert report.labels_below_base(summary, "gem3d", ["dice_missing"]) is None  # no label both measured
    del summary["base"]
    rows = {row[0]: row for row in report.targets_section(summary).rows}
    assert "base" not in rows and rows["ig"][5] == "—" and rows["mine"][5] == "—"


def test_missing_reference_rows_give_em_dashes_and_never_crash():
    records = {name: metrics for name, metrics in RECORDS.items() if name not in (REAL_VOLUME_ROW, AUTOENCODER_ROW)}
    rows = {row[0]: tuple(row) for row in report.targets_section(_summary(records)).rows}
    assert rows["gem3d"] == ("gem3d", "2", "—", "—", "≥ 0.8× —", "yes ✓", "—", "2/2 ✓")
    assert rows["ig"] == ("ig", "2", "—", "—", "≥ 0.6× —", "no: core ✗", "—", "2/2 ✓")
    # a row with a Dice target but no Dice at all (no segmenter), and no base or reference row
    only = report.summarise(_records({"icma": dict(through_plane_ratio=[0.9], label_order_kept=[1.0])}))
    section = report.targets_section(only)
    assert tuple(section.columns) == ("row", "n", "Dice target", "≥ base on every label", "through-plane ×AE",
                                      "label order kept")
    assert [tuple(r) for r in section.rows] == [("icma", "1", "≥ 0.8× —", "—", "—", "1/1 ✓")]
    # a real row whose Dice is 0 on a label gives no ratio there
    zero = _records({REAL_VOLUME_ROW: dict(dice_edema=[0.0]), "ic": dict(dice_edema=[0.5])})
    assert [tuple(r) for r in report.targets_section(report.summarise(zero)).rows] == [
        ("ic", "1", "—", "≥ 0.8× —", "—", "—", "—")]


def test_no_section_without_a_synthetic_row_that_has_these_metrics():
    yardsticks = {name: RECORDS[name] for name in (REAL_VOLUME_ROW, AUTOENCODER_ROW, COPY_ROW)}
    assert report.targets_section(report.summarise(_records(yardsticks))) is None
    assert report.targets_section(report.summarise(_records({"gem3d": dict(psnr_body=[20.0])}))) is None


def test_the_section_sits_after_the_headline_in_the_summary_and_the_page(tmp_path):
    summary = _summary()
    section = report.targets_section(summary)
    markdown = report.summary_markdown(summary, ["dice_mean"], [], sections=[section])
    assert markdown.index("## Columns") < markdown.index("## Label fidelity per label and targets")
    assert "| gem3d | 2 | 0.50× ✗ | 0.90× | ≥ 0.8× ✗ | yes ✓ | 1.05× ✓ | 2/2 ✓ |" in markdown
    page = report.write_html(tmp_path / "report.html", markdown, [], [], [], [], summary=summary,
                             sections=[section]).read_text()
    assert "<h2>Label fidelity per label and targets</h2>" in page
    assert '<th scope="row">ig</th><td>2</td><td>0.65×</td><td>0.10× ✗</td><td>≥ 0.6× ✗</td>' in page


def test_metrics_csv_round_trip_reprints_the_same_table(tmp_path, capsys):
    rows = _records(RECORDS)
    path = report.write_csv(tmp_path / "metrics.csv", [dict(r, informed_from="case_000:6", label="") for r in rows])
    read = report.read_csv(path)
    assert read[0] == dict(rows[0], informed_from="case_000:6", sample="0")  # text identity cells, no empty cells
    assert report.main([str(path)]) == 0
    expected = report.targets_section(report.summarise(rows))
    assert capsys.readouterr().out == "\n".join(expected.markdown()).strip() + "\n"
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "absent.csv")])
    assert exit_info.value.code == 2 and f"no such file: {tmp_path / 'absent.csv'}" in capsys.readouterr().err
    report.write_csv(tmp_path / "plain.csv", [{"row": "gem3d", "case": "a", "psnr_body": 20.0}])
    assert report.main([str(tmp_path / "plain.csv")]) == 1
    assert "no synthetic row has dice_<label>" in capsys.readouterr().out


@pytest.fixture()
def threshold_backend(monkeypatch):
    """The ``threshold`` backend: :class:`tests._segmenters.ThresholdSegmenter`, exact on blob volumes."""
    monkeypatch.setitem(BACKENDS, "threshold", "tests._segmenters:ThresholdSegmenter")
    return SegmenterSettings(backend="threshold", iterations=1)


def test_evaluation_writes_the_table_into_summary_and_report(tmp_path, threshold_backend):
    """Blob volumes, an exact segmenter: ``ic`` draws the labels where the mask says (1.00× real on each), ``icma``
    and ``base`` draw each where the other label is (0.00×)."""
    from tests.test_metrics_labels import _blob_outputs

    data, folders = _blob_outputs(tmp_path)
    out = tmp_path / "report"
    assert evaluation.main(["--real", str(data), "--cases", "split:val", "--out", str(out), "--metrics", "labels",
                            "segmenter", "--segmenter-backend", "threshold", "--synthetic",
                            f"ic={folders['faithful']}", "--synthetic", f"icma={folders['moved']}", "--synthetic",
                            f"base={folders['moved']}"]) == 0
    summary = (out / "summary.md").read_text()
    table = summary.split("## Label fidelity per label and targets")[1].split("\n## ")[0]
    assert ("| row | n | bright_blob ×real | dark_blob ×real | Dice target | ≥ base on every label | "
            "through-plane ×AE | label order kept |") in table
    assert "| base | 2 | 0.00× | 0.00× | none | — | — | 0/2 |" in table
    assert "| ic | 2 | 1.00× | 1.00× | ≥ 0.8× ✓ | yes ✓ | — | 2/2 ✓ |" in table
    # icma equals base on each label: not below it
    assert "| icma | 2 | 0.00× ✗ | 0.00× ✗ | ≥ 0.8× ✗ | yes ✓ | — | 0/2 ✗ |" in table
    assert summary.index("## Label fidelity per label and targets") < summary.index("## Intensity scale")
    page = (out / "report.html").read_text()
    assert "<h2>Label fidelity per label and targets</h2>" in page
    assert '<th scope="row">ic</th><td>2</td><td>1.00×</td><td>1.00×</td><td>≥ 0.8× ✓</td>' in page


def test_the_section_fits_a_1280_pixel_page_in_headless_chromium(tmp_path):
    from tests.test_report_html import CHROMIUM, render_check

    if CHROMIUM is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium): the page is not rendered")
    names = {"dice_edema": "dice_peritumoral_edema_long_name", "dice_core": "dice_non-enhancing_tumor_core"}
    records = {row: {names.get(m, m): v for m, v in metrics.items()} for row, metrics in RECORDS.items()}
    summary = _summary(records)
    section = report.targets_section(summary)
    page = report.write_html(tmp_path / "report.html", "", [], [], [], [], summary=summary, sections=[section])
    result = render_check(page)
    assert result["page_overflow"] <= 0 and result["wide_tables"] == 0
