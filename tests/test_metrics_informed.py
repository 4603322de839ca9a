"""Generated informed slices (ig / igma) against real slices at the same position: intensity distances with the
real-vs-real yardstick and the segmenter's Dice at the plane, with known answers (gem3d.metrics.informed and the
evaluation's ``informed`` group)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gem3d.data.case import load_case
from gem3d.export.manifest import Manifest, make_record
from gem3d.export.nifti import save_nifti
from gem3d.metrics import evaluation
from gem3d.metrics.informed import informed_plane, plane_dice, relative_index, slice_distances
from gem3d.metrics.volumes import RealData
from gem3d.segmentation import BACKENDS
from tests._segmenters import blob_dataset

VAL = ["case_002", "case_003", "case_004"]


def _volumes(seed: int, n: int = 3, shape=(10, 16, 16)):
    """``n`` real-like ``(image, body)`` pairs: a body disc of tissue around 0.4 (its width varies per case) and
    zero outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    out = []
    for i in range(n):
        body = np.broadcast_to(((yy - 8) ** 2 + (xx - 8) ** 2) < 30 + 5 * i, shape).copy()
        image = np.where(body, rng.normal(0.4 + 0.02 * i, 0.05, shape), 0.0)
        out.append((image, body))
    return out


def test_a_real_slice_scores_the_yardstick_and_a_flat_one_far_off():
    (own, own_body), *others = _volumes(0)
    plane = 4
    real = slice_distances(own, own_body, plane, (own, own_body), others)
    assert real["informed_w1"] == real["informed_w1_real"] > 0
    flat = own.copy()
    flat[plane][own_body[plane]] = 0.9
    far = slice_distances(flat, own_body, plane, (own, own_body), others)
    assert far["informed_w1_real"] == real["informed_w1_real"]
    assert far["informed_w1"] > 10 * far["informed_w1_real"]
    assert math.isnan(slice_distances(own, own_body, plane, (own, own_body), [])["informed_w1"])


def test_plane_helpers():
    assert informed_plane({"informed": {"source": "generated", "position": 0.25, "target_index": 12}}) == 12
    assert informed_plane({"informed": {"source": "own_middle", "index": 24, "target_index": 24}}) is None
    assert informed_plane({"informed": None}) is None and informed_plane({}) is None
    assert relative_index(12, 48, 24) == 6 and relative_index(47, 48, 10) == 9
    mask = np.zeros((3, 4, 4), int)
    mask[1, :2, :2], mask[1, 2:, 2:] = 1, 2
    assert plane_dice(mask, mask, 1, 2) == 1.0
    moved = np.zeros_like(mask)
    moved[1, :2, :2] = 2
    assert plane_dice(moved, mask, 1, 2) == 0.0
    assert math.isnan(plane_dice(mask, mask, 0, 2))  # the plane holds no label


@pytest.fixture
def blob_outputs(tmp_path, monkeypatch):
    """A blob dataset (cases 0-1 train, 2-4 val) and three ``ig``-like folders of the val cases, each volume the
    real one but at its informed plane (the plane with the most label voxels): ``real_plane`` keeps it, ``flat``
    fills its body with tissue, ``shuffled`` permutes its body voxels (the same histogram, the labels lost)."""
    monkeypatch.setitem(BACKENDS, "threshold", "tests._segmenters:ThresholdSegmenter")
    data = blob_dataset(tmp_path / "dataset", n=5)
    (data / "splits.json").write_text(json.dumps({"train": ["case_000", "case_001"], "val": VAL, "test": []}))
    real = RealData(data)
    rng = np.random.default_rng(0)
    folders = {}
    for kind in ("real_plane", "flat", "shuffled"):
        folder = folders[kind] = tmp_path / "out" / kind
        for name in VAL:
            case = real.case(name)
            plane = int(np.argmax((case.label > 0).sum(axis=(1, 2))))
            volume = load_case(case.image_path).image.astype(np.float32)  # the real intensities, exactly
            inside = case.body[plane]
            if kind == "flat":
                volume[plane][inside] = 100.0
            elif kind == "shuffled":
                volume[plane][inside] = rng.permutation(volume[plane][inside])
            files = {"image": f"{name}_s0_image.nii.gz", "label": f"{name}_s0_label.nii.gz"}
            save_nifti(case.geometry.to_source(volume), case.geometry, folder / files["image"])
            save_nifti(case.geometry.to_source(case.label), case.geometry, folder / files["label"], dtype=np.int16)
            informed = {"source": "generated", "position": plane / volume.shape[0], "target_index": plane}
            Manifest(folder / "manifest.json").add(make_record(name, "ig", 0, 0, informed=informed, files=files))
    return data, folders


def test_evaluation_scores_generated_informed_slices_against_the_real_yardstick(blob_outputs, tmp_path):
    data, folders = blob_outputs
    report = tmp_path / "report"
    assert evaluation.main(["--real", str(data), "--cases", "split:val", "--out", str(report), "--metrics",
                            "segmenter", "informed", "--segmenter-backend", "threshold",
                            *(f"--synthetic={k}={v}" for k, v in folders.items())]) == 0
    by_row: dict[str, list[dict]] = {}
    with open(report / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            by_row.setdefault(row["row"], []).append(row)
    value = lambda r, c: float(r[c])  # noqa: E731
    for r in by_row["real_plane"]:  # a real slice scores the yardstick exactly
        assert value(r, "informed_w1") == value(r, "informed_w1_real") > 0
        assert value(r, "informed_dice") == value(r, "informed_dice_real") == 1.0
    for r in by_row["flat"]:  # tissue only: far from every real slice, and nothing to segment
        assert value(r, "informed_w1") > 5 * value(r, "informed_w1_real")
        assert value(r, "informed_dice") == 0.0 and value(r, "informed_dice_real") == 1.0
    for r in by_row["shuffled"]:  # the histogram is kept, the labels are not
        assert value(r, "informed_w1") == pytest.approx(value(r, "informed_w1_real"))
        assert value(r, "informed_dice") < 0.5
    assert all(r.get("informed_w1", "") == "" for r in by_row["reference: real volume"])
    summary = (report / "summary.md").read_text()
    section = summary.split("## Generated informed slices")[1].split("\n## ")[0]
    assert "| row | n | informed_w1 | informed_w1_real | informed_dice | informed_dice_real |" in section
    assert "| flat | 3 |" in section and "| real_plane | 3 |" in section and "| shuffled | 3 |" in section
    assert "not its anatomy" in section  # the shuffled slice keeps its histogram: the table says what it cannot see
    assert (report / "histogram_informed_slices.png").is_file()
    html = (report / "report.html").read_text()
    assert "Generated informed slices" in html and 'alt="histogram informed slices"' in html


def test_the_report_shows_each_generated_plane_above_the_real_slice_there(blob_outputs, tmp_path, monkeypatch):
    data, folders = blob_outputs
    drawn, titles = {}, []
    image_grid = evaluation.report.image_grid

    def spy(path, lines, title, **kw):
        drawn.update(lines)
        titles.append(title)
        return image_grid(path, lines, title, **kw)

    monkeypatch.setattr(evaluation.report, "image_grid", spy)
    report = tmp_path / "report"
    assert evaluation.main(["--real", str(data), "--cases", "split:val", "--out", str(report), "--metrics",
                            "informed", *(f"--synthetic={k}={v}" for k, v in folders.items())]) == 0
    assert (report / "informed_slices.png").is_file()
    assert 'alt="informed slices"' in (report / "report.html").read_text()
    rows = [name for name in drawn if name.endswith(": generated")]
    assert sorted(rows) == ["flat: generated", "real_plane: generated", "shuffled: generated"]
    real = drawn["real, same plane"]  # the last row's real line (every row's real line is the same here)
    assert len(real) == len(VAL) and all("plane" in title for title, _ in real)
    for (_, generated), (_, truth) in zip(drawn["real_plane: generated"], real):
        np.testing.assert_array_equal(generated, truth)  # the real plane kept: the same picture
    for (_, generated), (_, truth) in zip(drawn["flat: generated"], real):
        assert not np.array_equal(generated, truth)
    assert "the first" not in titles[0]

    monkeypatch.setattr(evaluation, "INFORMED_PANELS", 2)  # a larger run: the first samples of each row
    assert evaluation.main(["--real", str(data), "--cases", "split:val", "--out", str(tmp_path / "capped"),
                            "--metrics", "informed", *(f"--synthetic={k}={v}" for k, v in folders.items())]) == 0
    assert all(len(panels) == 2 for panels in drawn.values()) and "(the first 2 samples of each row)" in titles[1]


def test_image_grid_draws_lines_of_panels_and_refuses_nothing(tmp_path):
    from PIL import Image

    images = [("a", np.zeros((8, 6))), ("b", np.ones((8, 6)))]
    path = evaluation.report.image_grid(tmp_path / "grid.png", [("one", images), ("two", images[:1])], "t",
                                        panel_size=50)
    width, height = Image.open(path).size
    assert width == 2 * 50 and height > 2 * 50  # two columns, two lines of panels plus titles
    with pytest.raises(ValueError, match="at least one line"):
        evaluation.report.image_grid(tmp_path / "none.png", [("one", [])], "t")
