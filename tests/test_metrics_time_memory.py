"""Time and memory per setting: the engine's manifest records (seconds, peak memory, preprocessing) and the
evaluation's table of them; an ``ig`` run of tiny models evaluated end to end (its informed planes included)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gem3d.data.preprocess import PreprocessConfig
from gem3d.inference import engine
from gem3d.inference.engine import Enhancer, InferenceConfig, PeakMemory
from gem3d.inference.volume import SamplerOptions
from gem3d.metrics import evaluation, report
from tests import _tiny_models


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return _tiny_models.tiny_setup(tmp_path_factory)


def _run(tiny, out, batch_windows: int = 1) -> list[dict]:
    cfg = InferenceConfig(setting="ig", data=tiny["data"], out=out, model=tiny["volume_stage"],
                          slice_model=tiny["position"], cases=",".join(tiny["names"][:2]), progress=False,
                          sampler=SamplerOptions(steps=2, batch_windows=batch_windows))
    path = Enhancer(cfg).run()
    return json.loads(path.read_text())["records"]


def test_records_hold_the_peak_memory_and_the_preprocessing_and_the_evaluation_tables_them(tiny, tmp_path):
    records = _run(tiny, tmp_path / "out")
    preprocess = dataclasses.asdict(PreprocessConfig.from_dict(_tiny_models.PREPROCESS))
    for record in records:
        memory = record["memory"]
        assert memory["device"] == "cpu" and memory["peak_rss_scope"] == "volume"  # Linux resets the peak
        assert 50 < memory["peak_rss_mb"] < 64_000 and "cuda_peak_allocated_mb" not in memory
        assert record["preprocess"] == json.loads(json.dumps(preprocess)) and record["seconds"] > 0
    report_dir = tmp_path / "report"
    assert evaluation.main(["--real", str(tiny["data"]), "--synthetic", f"ig={tmp_path / 'out' / 'ig'}", "--out",
                            str(report_dir), "--metrics", "consistency", "informed"]) == 0
    summary = (report_dir / "summary.md").read_text()
    timing = summary.split("## Time and memory per setting")[1].split("\n## ")[0]
    seconds = [r["seconds"] for r in records]
    rss = max(r["memory"]["peak_rss_mb"] for r in records)
    assert (f"| ig | 2 | cpu | {np.mean(seconds):.4g} ({min(seconds):.4g}–{max(seconds):.4g}) | {rss:,.0f} | "
            f"volume | — |") in timing
    informed = summary.split("## Generated informed slices")[1].split("\n## ")[0]
    assert "| ig | 2 |" in informed  # the engine's target_index is the plane the evaluation measures
    html = (report_dir / "report.html").read_text()
    assert "Time and memory per setting" in html and "Generated informed slices" in html


def test_volumes_in_lockstep_share_the_run_peak(tiny, tmp_path):
    records = _run(tiny, tmp_path / "out", batch_windows=2)
    assert [r["memory"]["peak_rss_scope"] for r in records] == ["run", "run"]


def test_peak_memory_without_a_resettable_peak_is_the_process_peak(monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "PEAK_RSS_FILE", tmp_path / "missing" / "clear_refs")
    memory = PeakMemory(torch.device("cpu"), reset_per_volume=True)
    memory.start()
    record = memory.record()
    assert record["peak_rss_scope"] == "process"
    assert record["peak_rss_mb"] == pytest.approx(engine.peak_rss_bytes("process") / 2**20, abs=0.2)


def test_time_memory_section_from_records():
    cpu = {"device": "cpu", "peak_rss_mb": 1500.0, "peak_rss_scope": "volume"}
    gpu = {"device": "cuda:0", "peak_rss_mb": 3000.0, "peak_rss_scope": "volume", "cuda_peak_allocated_mb": 9000.4,
           "cuda_peak_scope": "volume"}
    section = report.time_memory_section({
        "ig": [{"seconds": 10.0, "memory": cpu}, {"seconds": 30.0, "memory": {**cpu, "peak_rss_mb": 2500.0}}],
        "base": [{"seconds": 4.0, "memory": gpu}],
        "old": [{"seconds": 2.0}],  # a manifest written before memory was recorded
        "none": [{"seconds": None}],
    })
    assert [row[0] for row in section.rows] == ["base", "ig", "old"]  # report order; no seconds: no row
    assert section.rows[1] == ("ig", "2", "cpu", "20 (10–30)", "2,500", "volume", "—")
    assert section.rows[0] == ("base", "1", "cuda:0", "4 (4–4)", "3,000", "volume", "9,000")
    assert section.rows[2] == ("old", "1", "—", "2 (2–2)", "—", "—", "—")
    text = "\n".join(section.markdown())
    assert "## Time and memory per setting" in text and "| ig | 2 | cpu | 20 (10–30) | 2,500 | volume | — |" in text
    assert report.time_memory_section({"old": [{"seconds": None}]}) is None


def test_cuda_peak_is_reset_per_volume_or_per_run(monkeypatch):
    """The CUDA path without a GPU: torch.cuda's peak counters replaced by a fake that counts the resets."""
    calls = {"reset": 0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.update(reset=calls["reset"] + 1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20 * (calls["reset"] + 1))
    per_volume = PeakMemory(torch.device("cuda:0"), reset_per_volume=True)
    for expected in (1, 2):
        per_volume.start()
        record = per_volume.record()
        assert calls["reset"] == expected
        assert record["device"] == "cuda:0" and record["cuda_peak_scope"] == "volume"
        assert record["cuda_peak_allocated_mb"] == 3.0 * (expected + 1)
    calls["reset"] = 0
    per_run = PeakMemory(torch.device("cuda:0"), reset_per_volume=False)
    per_run.start()
    per_run.start()
    assert calls["reset"] == 1 and per_run.record()["cuda_peak_scope"] == "run"
