"""The demo (:mod:`gem3d.demo`, run by `make demo` through scripts/demo.py): its training order, overrides and
inference configs, and the script end to end, shrunk: 4 cases, a few training steps per model, 2 DDIM steps.

The end-to-end test checks the README contract's wiring (dataset -> 6 trainings -> 6 settings -> enhanced nnU-Net
dataset -> table), and that a rerun resumes instead of starting again. Quality is `make demo`'s business, not this
test's.
"""
import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import child_env
from gem3d import demo
from gem3d.export.nnunet import validate_nnunet_dataset
from gem3d.inference.cli import load_inference_config
from gem3d.inference.engine import InferenceConfig
from gem3d.inference.volume import SamplerOptions
from gem3d.metrics.evaluation import add_segmenter_arguments
from gem3d.segmentation import DEFAULT_ITERATIONS, SegmenterSettings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("test", "ic", "icma", "ig", "igma", "base")


def test_scaled_time():
    assert demo.scaled_time("00:00:10:00", 1.5) == "00:00:15:00"
    assert demo.scaled_time("00:23:30:00", 2) == "01:23:00:00"
    assert demo.scaled_time("00:00:00:01", 0.1) == "00:00:00:01"  # at least one second


def test_every_model_waits_for_the_checkpoints_it_starts_from(tmp_path):
    out, dataset = tmp_path / "out", tmp_path / "dataset"
    names = list(demo.TRAINING)
    for position, (name, model) in enumerate(demo.TRAINING.items()):
        assert set(model.waits_for()) <= set(names[:position]), name  # the table's order is a training order
        if model.config is None:
            continue
        assert (ROOT / "configs" / "latent-diffusion" / f"{model.config}.yaml").is_file(), name
        overrides = demo.training_overrides(name, out, dataset, 1.0, None)
        starts_from = {Path(o.split("=", 1)[1]).parents[1].name for o in overrides if o.endswith("last.ckpt")}
        assert starts_from == set(model.waits_for()) - set(model.after), name
    assert demo.TRAINING["demo"].waits_for() == ("demo_autoencoder", "demo_stage1")
    assert demo.TRAINING["segmenter"].waits_for() == ("demo", "demo_base")  # an order, not a checkpoint


def test_every_demo_training_has_minutes_and_a_floor_of_steps():
    """Each demo model trains for its config's minutes, but never fewer than its floor (``min_steps``, which Lightning
    keeps past ``max_time``): the steps with which the demo met its targets; GEM-3D and the baseline share both."""
    trainers = {name: OmegaConf.load(ROOT / "configs" / "latent-diffusion" / f"{model.config}.yaml").lightning.trainer
                for name, model in demo.TRAINING.items() if model.config is not None}
    for name, trainer in trainers.items():
        assert trainer.max_time and 0 < trainer.min_steps < trainer.max_steps, name
    for gem3d, base in (("demo_stage1", "demo_base_stage1"), ("demo", "demo_base")):
        assert trainers[gem3d].min_steps == trainers[base].min_steps
        assert trainers[gem3d].max_time == trainers[base].max_time


def test_training_overrides(tmp_path):
    out, dataset = tmp_path / "out", tmp_path / "dataset"
    config = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / "demo_stage2.yaml")
    max_time = OmegaConf.select(config, "lightning.trainer.max_time")
    assert demo.training_overrides("demo", out, dataset, 2.0, 3) == [
        f"data.params.dataset_dir={dataset}",
        f"model.params.first_stage_config.params.ckpt_path={out}/models/demo_autoencoder/checkpoints/last.ckpt",
        f"model.params.ckpt_path={out}/models/demo_stage1/checkpoints/last.ckpt",
        f"lightning.trainer.max_time={demo.scaled_time(max_time, 2.0)}",
        "lightning.trainer.max_steps=3",
    ]
    assert demo.training_overrides("demo_autoencoder", out, dataset, 1.0, None) == [
        f"data.params.dataset_dir={dataset}"]


@pytest.mark.parametrize("first_stage2", ["demo", "demo_base"])
def test_trainings_and_inferences_share_the_cores_in_order(tmp_path, monkeypatch, first_stage2):
    """Two at a time, each step after what it waits for; the segmenter starts once both stage-2 models are trained
    and never shares the machine with a model whose minutes count; the inferences run beside it as soon as their
    models exist (one thread each while two run)."""
    events, lock = [], threading.Lock()
    minutes_count = {"demo_autoencoder", "demo_stage1", "demo_base_stage1", "demo", "demo_base"}
    last_inference_done = threading.Event()  # the segmenter runs until then (or 10 s): no race with a loaded machine

    def fake(kind, threads_at):
        def step(name, *args):
            threads = args[threads_at]
            with lock:
                events.append(("start", name, threads))
            if name == "segmenter":
                last_inference_done.wait(timeout=10)
            else:
                time.sleep({first_stage2: 0.05, "demo_slice": 0.3}.get(
                    name, 0.2 if name in ("demo", "demo_base") else 0.02))
            with lock:
                events.append(("end", name, threads))
            if name == "counterfactual-t2":
                last_inference_done.set()
            return tmp_path / kind / name
        return step

    monkeypatch.setattr(demo, "train_one", fake("models", 4))  # (out, dataset, time_scale, max_steps, threads, split)
    monkeypatch.setattr(demo, "infer_one", fake("synthetic", 5))  # (out, dataset, split, seed, sampling_steps, threads)
    done = demo.run_steps(tmp_path, tmp_path / "dataset", 1.0, None, jobs=2)
    assert set(done) == set(demo.TRAINING) | set(demo.INFERENCE)
    assert not set(demo.TRAINING) & set(demo.INFERENCE)
    assert done["icma"] == tmp_path / "synthetic" / "icma" and done["demo"] == tmp_path / "models" / "demo"
    assert events[0] == ("start", "demo_autoencoder", None)  # alone: every thread
    waits = {**{n: m.waits_for() for n, m in demo.TRAINING.items()},
             **{n: i.waits_for() for n, i in demo.INFERENCE.items()}}
    running: set[str] = set()
    ended: set[str] = set()
    span = {}  # name -> (index of its start event, index of its end event)
    for index, (kind, name, threads) in enumerate(events):
        span[name] = (span.get(name, (index,))[0], index)
        if kind == "end":
            running.discard(name)
            ended.add(name)
            continue
        assert set(waits[name]) <= ended, name
        assert len(running) < 2, name
        if running:
            assert threads == 1, name  # two at once: one thread each
        running.add(name)
    seg_start, seg_end = span["segmenter"]
    beside_segmenter = {n for n, (a, b) in span.items() if n != "segmenter" and a < seg_end and seg_start < b}
    assert not beside_segmenter & minutes_count and {"demo_slice", "igma", "counterfactual-t2"} <= beside_segmenter
    assert demo.INFERENCE["ig"].waits_for() == ("demo", "demo_slice")
    assert demo.INFERENCE["base"].waits_for() == ("demo_base",)
    assert demo.INFERENCE["stage1-alone"].waits_for() == ("demo_stage1",)


def test_an_inference_runs_its_settings_script_with_the_flags_of_its_config(tmp_path, monkeypatch):
    """infer_one starts scripts/inference_demo_<setting>.py with the flags inference_config parses (one config for
    the child and the parent), the donor of a counterfactual by contrast, and skips a counterfactual without one."""
    dataset, out = tmp_path / "dataset", tmp_path / "out"
    calls = []
    monkeypatch.setattr(demo, "run", lambda cmd, log, threads=None: calls.append((cmd, log, threads)))
    monkeypatch.setattr(demo, "donors_by_contrast", lambda d: {"t1": "case_001"})
    folder = demo.infer_one("counterfactual-t1", out, dataset, "val", 4, 2, 1)
    (cmd, log, threads), = calls
    assert cmd[1] == "scripts/inference_demo_ic.py" and threads == 1
    assert log == out / "train_logs" / "inference_counterfactual-t1.log"
    models = out / "models"
    assert cmd[2:] == demo.inference_argv(dataset, out / "evaluation" / "counterfactual-t1", models / "demo",
                                          models / "demo_slice", "val", 4, 2, "case_001:0.5")
    cfg = demo.inference_config("ic", dataset, out / "evaluation" / "counterfactual-t1", models / "demo",
                                models / "demo_slice", "val", 4, 2, "case_001:0.5")
    assert folder == cfg.setting_dir and cfg.informed_from == "case_001:0.5" and cfg.sampler.steps == 2
    assert demo.infer_one("counterfactual-t2", out, dataset, "val", 4, 2, 1) is None and len(calls) == 1
    demo.infer_one("base", out, dataset, "test", 0, None, None)
    assert calls[-1][0][1] == "scripts/inference_demo_base.py"
    assert calls[-1][0][calls[-1][0].index("--model") + 1] == str(models / "demo_base")


@pytest.mark.parametrize("steps, informed_from", [(None, None), (2, "case_003:0.5")])
def test_inference_runs_are_built_by_the_inference_cli(tmp_path, steps, informed_from):
    """The demo's inference configs are those it built by hand before (gem3d/configs/inference/demo.yaml, the flags)."""
    defaults = load_inference_config("demo")
    sampler = {**defaults["sampler"], **({"steps": steps} if steps else {})}
    paths = {name: tmp_path / name for name in ("dataset", "out", "model", "slice_model")}
    cfg = demo.inference_config("ic", paths["dataset"], paths["out"], paths["model"], paths["slice_model"], "val", 3,
                                steps, informed_from)
    assert cfg == InferenceConfig(
        setting="ic", data=paths["dataset"], out=paths["out"], split="Tr", cases="split:val", model=paths["model"],
        slice_model=paths["slice_model"], samples_per_case=int(defaults.get("samples_per_case", 1)),
        sampler=SamplerOptions(**sampler), seed=3, device="cpu", mask_edit=dict(defaults.get("mask_edit") or {}),
        progress=False, informed_from=informed_from, background=defaults.get("background", "generated"))
    assert cfg.sampler.steps == (steps or defaults["sampler"]["steps"]) and cfg.previews and cfg.ema is None
    assert cfg.background == "real"  # the demo's skull-stripped cases keep their zeros outside the head


def test_the_segmenter_iterations_have_one_default(tmp_path):
    parser = argparse.ArgumentParser()
    add_segmenter_arguments(parser, "cache")
    assert parser.parse_args([]).segmenter_iterations == SegmenterSettings().iterations == DEFAULT_ITERATIONS
    assert DEFAULT_ITERATIONS == 450  # the demo's reported figures were measured with 450, on patches
    full = demo.evaluation_args(tmp_path, tmp_path / "dataset", "test", None)
    assert full[full.index("--segmenter-iterations") + 1] == str(DEFAULT_ITERATIONS)
    assert demo.evaluation_args(tmp_path, tmp_path / "dataset", "val", 1) == [
        "--real", str(tmp_path / "dataset"), "--cases", "split:val", "--out", str(tmp_path / "report"),
        "--segmenter-iterations", "2", "--segmenter-options", '{"patch": [32, 48, 48]}']
    # the options parse back to what the segmenter gets, and fit the demo's 48 x 64 x 64 volumes
    parsed = parser.parse_args(full[full.index("--segmenter-iterations"):])
    assert parsed.segmenter_options == demo.SEGMENTER_OPTIONS == {"patch": [32, 48, 48]}
    assert all(p < s and p % 16 == 0 for p, s in zip(demo.SEGMENTER_OPTIONS["patch"], (48, 64, 64)))  # patches


def test_make_downstream_trains_its_segmenters_as_the_demo_trains_the_label_fidelity_one():
    """`make downstream`'s segmenter flags (the Makefile's DOWNSTREAM_SEGMENTER) parse to the demo's iterations and
    backend options, as `make` passes them (one shell word per quoted option)."""
    import shlex

    from gem3d.downstream import build_parser

    line = next(line for line in (ROOT / "Makefile").read_text().splitlines()
                if line.startswith("DOWNSTREAM_SEGMENTER :="))
    args = build_parser().parse_args(["--real", "r", "--synthetic", "s", "--out", "o",
                                      *shlex.split(line.partition(":=")[2])])
    assert args.iterations == DEFAULT_ITERATIONS
    assert dict(args.option) == demo.SEGMENTER_OPTIONS
    assert len(args.seeds) == 4 and "$(DOWNSTREAM_SEGMENTER) $(DOWNSTREAM_ARGS)" in (ROOT / "Makefile").read_text()


def test_help_failures_and_a_missing_checkout(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        demo.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "The CPU demo, end to end" in text
    for flag in ("--out", "--cases", "--split", "--seed", "--time-scale", "--max-steps", "--sampling-steps", "--jobs"):
        assert flag in text, flag

    def failing(args):
        raise RuntimeError("command failed (3); last lines of train.log:\nboom")

    monkeypatch.setattr(demo, "run_demo", failing)
    assert demo.main(["--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "[demo] failed: command failed (3); last lines of train.log:\nboom\n"
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path} is none")):
        demo.main([])


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
