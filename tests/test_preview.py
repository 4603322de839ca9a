import numpy as np
import pytest
from PIL import Image

from gem3d.export.preview import LABEL_COLOURS, TITLE_HEIGHT, preview_size, save_preview

PANEL = 64


def phantom(shape=(12, 24, 20)):
    d, h, w = np.mgrid[: shape[0], : shape[1], : shape[2]]
    image = (1.0 + np.sin(h / 3.0) + np.cos(w / 4.0) + d / shape[0]).astype(np.float32)
    label = np.zeros(shape, np.int16)
    lesion = ((d - 6) / 3.0) ** 2 + ((h - 8) / 4.0) ** 2 + ((w - 12) / 4.0) ** 2 <= 1
    label[lesion] = 1
    label[lesion & (((h - 8) / 2.0) ** 2 + ((w - 12) / 2.0) ** 2 <= 1)] = 2
    return image, label


def panel(png: np.ndarray, row: int, column: int) -> np.ndarray:
    top = TITLE_HEIGHT + row * (TITLE_HEIGHT + PANEL) + TITLE_HEIGHT
    return png[top : top + PANEL, column * PANEL : (column + 1) * PANEL]


def read(path) -> np.ndarray:
    """The preview as ``(height, width, 3)`` RGB; it must be opaque."""
    with Image.open(path) as handle:
        assert handle.format == "PNG"
        png = np.asarray(handle.convert("RGBA"))
    assert np.all(png[..., 3] == 255)
    return png[..., :3]


def content_box(cell: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(cell.sum(axis=-1) > 0)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_preview_size_and_content(tmp_path):
    image, label = phantom()
    noisy = image + np.random.default_rng(0).normal(0, 0.2, image.shape).astype(np.float32)
    path = save_preview(tmp_path / "p.png", [("real", image), ("synthetic", noisy)], mask=label, panel_size=PANEL, max_label=2)
    assert path == tmp_path / "p.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    png = read(path)
    assert (png.shape[1], png.shape[0]) == (3 * PANEL, TITLE_HEIGHT + 3 * (TITLE_HEIGHT + PANEL)) == preview_size(2, True, PANEL)
    for row in range(2):
        for column in range(3):
            cell = panel(png, row, column)
            assert cell.std() > 10, (row, column)
            assert np.any(np.all(cell == LABEL_COLOURS[0], axis=-1)), (row, column)  # contour of label 1
    for column in range(3):
        mask_cell = panel(png, 2, column)
        for colour in LABEL_COLOURS[:2]:
            assert np.any(np.all(mask_cell == colour, axis=-1)), column
    # the title strips hold text (white pixels)
    assert np.any(png[:TITLE_HEIGHT] > 128)


def test_preview_aspect_follows_spacing(tmp_path):
    image, _ = phantom((12, 24, 24))
    path = save_preview(tmp_path / "a.png", [("v", image + 1.0)], spacing=(4.0, 1.0, 1.0), panel_size=PANEL, contours=False)
    png = read(path)
    assert png.shape[:2] == preview_size(1, False, PANEL)[::-1]
    axial_h, axial_w = content_box(panel(png, 0, 0))
    coronal_h, coronal_w = content_box(panel(png, 0, 1))
    assert abs(axial_h - axial_w) <= 1  # 24 mm x 24 mm
    assert coronal_h == PANEL and abs(coronal_w - PANEL // 2) <= 1  # 48 mm tall, 24 mm wide


def test_preview_validates_inputs(tmp_path):
    image, label = phantom()
    with pytest.raises(ValueError, match=r"mask shape \(12, 24, 19\)"):
        save_preview(tmp_path / "x.png", [("v", image)], mask=label[..., :19])
    with pytest.raises(ValueError, match="above max_label=1"):
        save_preview(tmp_path / "x.png", [("v", image)], mask=label, max_label=1)
    with pytest.raises(ValueError, match="expected"):
        save_preview(tmp_path / "x.png", [("a", image), ("b", image[:, :10])])
    with pytest.raises(ValueError, match=r"\.png"):
        save_preview(tmp_path / "x.jpg", [("v", image)])
    assert list(tmp_path.iterdir()) == []


def test_contours_only_on_the_named_rows(tmp_path):
    """contours=[title] outlines the mask on that row only (the engine uses it for edited masks)."""
    image, label = phantom()
    volumes = [("real", image), ("synthetic", image)]

    def render(name, contours):
        path = save_preview(tmp_path / name, volumes, mask=label, panel_size=PANEL, contours=contours)
        return read(path)

    none, both, only = render("n.png", False), render("b.png", True), render("o.png", ["synthetic"])
    for column in range(3):
        assert np.array_equal(panel(only, 0, column), panel(none, 0, column))  # the real row: no outline
        assert np.array_equal(panel(only, 1, column), panel(both, 1, column))  # the synthetic row: outlined
    assert not np.array_equal(panel(both, 1, 0), panel(none, 1, 0))


def test_informed_slice_row_and_ticks(tmp_path):
    image, label = phantom()
    informed = image[4, ::2, ::2] * -1.0  # another size and contrast than the volume
    path = save_preview(tmp_path / "i.png", [("real", image), ("synthetic", image)], mask=label, panel_size=PANEL,
                        max_label=2, informed=informed, informed_title="informed: case_x slice 4", informed_index=4)
    png = read(path)
    assert (png.shape[1], png.shape[0]) == preview_size(2, True, PANEL, with_informed=True)
    cell = panel(png, 2, 0)  # the informed row comes after the volumes, before the mask
    assert cell.std() > 10 and content_box(cell) == content_box(panel(png, 0, 0))  # same physical extent as axial
    assert not panel(png, 2, 1).any() and not panel(png, 2, 2).any()
    tick = np.array([255, 200, 0])
    for column in (1, 2):
        for row in range(2):
            rows, columns = np.nonzero(np.all(panel(png, row, column) == tick, axis=-1))
            assert columns.min() < PANEL // 2 < columns.max(), (row, column)  # at both sides
            height = content_box(panel(png, 0, column))[0]
            top = (PANEL - height) // 2
            centre = rows.mean() + 0.5  # of the tick line, in pixels from the panel's top
            assert abs(centre - (top + (12 - 1 - 4 + 0.5) * height / 12)) <= 1  # slice 4 of 12, superior up
    assert not np.all(panel(png, 0, 0) == tick, axis=-1).any()  # no ticks on axial panels
    with pytest.raises(ValueError, match="informed_index"):
        save_preview(tmp_path / "j.png", [("v", image)], informed=informed, informed_index=12)
    with pytest.raises(ValueError, match="one slice"):
        save_preview(tmp_path / "k.png", [("v", image)], informed=image)


def test_a_small_structure_inside_a_larger_one_keeps_its_outline(tmp_path):
    image, label = phantom()
    label[label == 1] = 3  # the larger structure gets the higher label value: outlines drawn by value would hide 2's
    path = save_preview(tmp_path / "p.png", [("real", image)], mask=label, panel_size=PANEL, max_label=3)
    png = read(path)
    for column in range(3):
        cell = panel(png, 0, column)
        for colour in (LABEL_COLOURS[1], LABEL_COLOURS[2]):
            assert np.any(np.all(cell == colour, axis=-1)), (column, colour)
