"""`make demo`'s script end to end, shrunk: 4 cases, a few training steps per model, 2 DDIM steps.

It checks the README contract's wiring (dataset -> 6 trainings -> 6 settings -> enhanced nnU-Net dataset -> table),
and that a rerun resumes instead of starting again. Quality is `make demo`'s business, not this test's.
"""
import json
import subprocess
import sys
from pathlib import Path

from conftest import child_env
from gem3d.export.nnunet import validate_nnunet_dataset

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("test", "ic", "icma", "ig", "igma", "base")


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = child_env()
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(out), "--cases", "4",
           "--max-steps", "2", "--sampling-steps", "2", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo_out"
    first = _demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for name in ("demo_autoencoder", "demo_stage1", "demo_slice", "demo_base_stage1", "demo", "demo_base"):
        assert (out / "models" / name / "checkpoints" / "last.ckpt").is_file(), name
    for setting in SETTINGS:
        records = json.loads((out / "synthetic" / setting / "manifest.json").read_text())["records"]
        assert len(records) >= 1 and all(r["setting"] == setting for r in records), setting
        assert list((out / "synthetic" / setting / "previews").glob("*.png")), setting
        assert f"\n{setting:<8}" in first.stdout  # a row of the final table
    enhanced = out / "enhanced" / "Dataset901_GEM3DDemoEnhanced"
    assert validate_nnunet_dataset(enhanced) == []
    n_real = json.loads((out / "dataset" / "dataset.json").read_text())["numTraining"]
    assert json.loads((enhanced / "dataset.json").read_text())["numTraining"] > n_real

    report = out / "report"
    html = (report / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # opens offline
    summary = (report / "summary.md").read_text()
    for row in ("reference: copy informed slice", "reference: autoencoder", "stage1-alone", "base", "gem3d"):
        assert row in summary and row in first.stdout, row

    second = _demo(out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "training steps" in first.stdout and "demo_stage1 2" in first.stdout
    assert second.stdout.count("already trained") == 6
    assert "main.py" not in second.stdout  # nothing retrained
