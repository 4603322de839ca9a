"""bench/mask_true.py's own helpers: the generated blocks it writes into a page, the checks of ``--demo-out`` and
the segmenter cache, and what it copies from a demo's folder (the experiments themselves are measured, not
tested: each runs for minutes to an hour)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import mask_true  # noqa: E402


def test_write_block_replaces_its_block_and_appends_one_where_the_page_has_none(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n<!-- a -->\nold\n<!-- /a -->\n\nafter\n")
    mask_true.write_block(page, "new table", "<!-- a -->", "<!-- /a -->")
    assert page.read_text() == "# Title\n\n<!-- a -->\nnew table\n<!-- /a -->\n\nafter\n"
    mask_true.write_block(page, "second", "<!-- b -->", "<!-- /b -->")
    assert page.read_text().endswith("after\n\n<!-- b -->\nsecond\n<!-- /b -->\n")
    mask_true.write_block(page, r"a \1 backslash", "<!-- a -->", "<!-- /a -->")  # text taken literally
    assert "<!-- a -->\na \\1 backslash\n<!-- /a -->" in page.read_text()


def test_demo_models_says_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="--only steps needs --demo-out DIR"):
        mask_true.demo_models(argparse.Namespace(demo_out=None), "steps")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "dataset.json").write_text("{}")
    with pytest.raises(SystemExit) as err:
        mask_true.demo_models(argparse.Namespace(demo_out=tmp_path), "steps")
    message = str(err.value)
    assert "demo_autoencoder" in message and "demo_base" in message and "run `make demo` first" in message
    assert "dataset.json" not in message  # present, so not named
    for name in ("demo_autoencoder", "demo_base"):
        (tmp_path / "models" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "models" / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert mask_true.demo_models(argparse.Namespace(demo_out=tmp_path), "steps") == (tmp_path.resolve(),
                                                                                     tmp_path.resolve() / "models")


def test_trained_segmenter_wants_exactly_one(tmp_path):
    with pytest.raises(SystemExit, match="found 0"):
        mask_true.trained_segmenter(tmp_path)
    for key in ("a", "b"):
        (tmp_path / key).mkdir()
        (tmp_path / key / "segmenter.json").write_text("{}")
    with pytest.raises(SystemExit, match="found 2"):
        mask_true.trained_segmenter(tmp_path)
    (tmp_path / "b" / "segmenter.json").unlink()
    assert mask_true.trained_segmenter(tmp_path) == tmp_path / "a"


def test_the_segmenter_cache_is_copied_with_its_times_and_the_dataset_only_where_asked(tmp_path):
    demo = tmp_path / "demo"
    (demo / "dataset").mkdir(parents=True)
    (demo / "dataset" / "dataset.json").write_text("{}")
    weights = demo / "report" / "segmenter_cache" / "key" / "segmenter.json"
    weights.parent.mkdir(parents=True)
    weights.write_text("{}")
    os.utime(weights, (1_000_000, 1_000_000))  # the cache is keyed by the files' sizes and times
    cache = mask_true.segmenter_cache_copy(demo, tmp_path / "steps")
    assert (cache / "key" / "segmenter.json").stat().st_mtime == 1_000_000
    assert not (tmp_path / "steps" / "dataset").exists()  # --only steps samples the tuning cases only
    dataset, cache = mask_true.demo_copies(demo, tmp_path / "encoding")
    assert (dataset / "dataset.json").is_file() and (cache / "key" / "segmenter.json").is_file()


def test_table_marks_what_was_not_measured():
    text = mask_true.table({"gem3d": {"dice_mean": 0.8, "dice_ratio": 0.9}},
                           {"ae": 1, "stage1": 2, "stage2": 3, "slice": 4, "segmenter": 5})
    assert "autoencoder 1, stage 1 2, stage 2 3, slice model 4; segmenter 5 iterations" in text
    assert "| gem3d | 0.80 | 0.90 | — |" in text
