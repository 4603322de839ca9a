"""The downstream experiment: conditions and regimes, the paired statistics with known answers, the outputs, and
resume (finished runs skipped, an interrupted training continued), with a small deterministic test segmenter."""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pytest

from gem3d import downstream
from gem3d.downstream import (DownstreamConfig, RunFailed, bootstrap_ci, paired_differences, parse_condition,
                              plan_runs, real_copies, repeated, run_experiment, summarise)
from gem3d.files import atomic_write_json
from gem3d.segmentation import BACKENDS, Segmenter, SegmenterSettings, TrainingCase

SHAPE = (12, 10, 8)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
LABELS = {"background": 0, "edema": 1, "core": 2}
INTENSITY = np.array([0.0, 1.0, 2.0])  # real intensity of background, edema, core
TRAIN, VAL, TEST = ["c0", "c1", "c2", "c3"], ["c4"], ["c5", "c6", "c7"]


class FakeSegmenter(Segmenter):
    """Learns each label's mean intensity (every training case in every iteration), labels a voxel by the nearest.
    A state file after every iteration makes it resumable; ``stop_after`` (class-wide) interrupts it."""

    stop_after: int | None = None
    steps: list[tuple[str, int]] = []  # (work folder, iteration) of every iteration run, by any instance

    def is_trained(self) -> bool:
        return (self.work_dir / "trained.json").is_file()

    def train(self, cases: Sequence[TrainingCase], progress: bool = True) -> None:
        if self.is_trained():
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.work_dir / "state.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {"step": 0, "sums": [0.0] * 3,
                                                                                  "counts": [0] * 3}
        for step in range(state["step"], self.settings.iterations):
            if FakeSegmenter.stop_after is not None and len(FakeSegmenter.steps) >= FakeSegmenter.stop_after:
                raise KeyboardInterrupt("simulated interruption")
            for case in cases:
                image = np.asarray(nib.load(case.image).dataobj, dtype=np.float64)
                label = np.asarray(nib.load(case.label).dataobj).astype(int)
                for value in range(3):
                    state["sums"][value] += float(image[label == value].sum())
                    state["counts"][value] += int((label == value).sum())
            state["step"] = step + 1
            FakeSegmenter.steps.append((str(self.work_dir), step))
            atomic_write_json(state_path, state)
        means = [s / c if c else math.inf for s, c in zip(state["sums"], state["counts"])]
        atomic_write_json(self.work_dir / "trained.json", {"means": means})

    def predict(self, images: Sequence[Path], out_dir, progress: bool = True) -> list[Path]:
        means = np.array(json.loads((self.work_dir / "trained.json").read_text())["means"])
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs = []
        for image_path in images:
            image = nib.load(image_path)
            labels = np.abs(np.asarray(image.dataobj)[..., None] - means).argmin(-1).astype(np.uint8)
            path = out_dir / Path(image_path).name.replace("_0000", "")
            nib.save(nib.Nifti1Image(labels, image.affine), path)
            outputs.append(path)
        return outputs


class RecordingSegmenter(FakeSegmenter):
    """A :class:`FakeSegmenter` that appends what it does to a record file shared by every process (``event pid
    work_dir [out_dir]`` lines); made by :class:`RecordingFactory`."""

    factory: "RecordingFactory"

    def _note(self, event: str, *more: object) -> None:
        with open(self.factory.record, "a") as handle:
            handle.write(" ".join([event, str(os.getpid()), str(self.work_dir), *map(str, more)]) + "\n")

    def train(self, cases: Sequence[TrainingCase], progress: bool = True) -> None:
        state_path = self.work_dir / "state.json"
        self._note("train-start", json.loads(state_path.read_text())["step"] if state_path.is_file() else 0)
        interrupted = self.factory.fail_in is not None and self.factory.fail_in in str(self.work_dir)
        if interrupted:  # after fail_after iterations
            FakeSegmenter.stop_after = len(FakeSegmenter.steps) + self.factory.fail_after
        waiter, awaited = self.factory.side_by_side or ("", "")
        if waiter and waiter in str(self.work_dir):  # wait until the other run has started: both run at once
            deadline = time.monotonic() + 120
            while not any(line.startswith("train-start") and awaited in line
                          for line in Path(self.factory.record).read_text().splitlines()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.work_dir}: no run of {awaited!r} started beside it")
                time.sleep(0.05)
        try:
            super().train(cases, progress)
        finally:
            if interrupted:
                FakeSegmenter.stop_after = None
        self._note("trained")

    def predict(self, images: Sequence[Path], out_dir, progress: bool = True) -> list[Path]:
        self._note("predict", out_dir)
        return super().predict(images, out_dir, progress)


@dataclass(frozen=True)
class RecordingFactory:
    """A segmenter factory that pickles (``jobs`` > 1 sends it to worker processes): :class:`RecordingSegmenter`
    objects writing to ``record``; ``fail_in``: training in work folders containing it is interrupted
    (``KeyboardInterrupt``) after ``fail_after`` iterations; ``side_by_side`` = (waiter, awaited): a run whose folder
    contains ``waiter`` trains only once one containing ``awaited`` has started."""

    record: Path
    fail_in: str | None = None
    fail_after: int = 0
    side_by_side: tuple[str, str] | None = None

    def __call__(self, settings: SegmenterSettings, work_dir) -> RecordingSegmenter:
        segmenter = RecordingSegmenter(settings, work_dir)
        segmenter.factory = self
        return segmenter


def read_record(path: Path) -> list[list[str]]:
    return [line.split(" ") for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture()
def fake_backend(monkeypatch):
    monkeypatch.setitem(BACKENDS, "fake", f"{__name__}:FakeSegmenter")
    monkeypatch.setattr(FakeSegmenter, "steps", [])
    monkeypatch.setattr(FakeSegmenter, "stop_after", None)
    return SegmenterSettings(backend="fake", iterations=4)


def label_map(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    x, y = rng.integers(2, 6, 2)
    label[x:x + 5, y:y + 4, 2:6] = 1
    label[x + 1:x + 3, y + 1:y + 3, 3:5] = 2
    return label


def save_case(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), image_path)
    nib.save(nib.Nifti1Image(label, AFFINE), label_path)


@pytest.fixture()
def data(tmp_path):
    """A real dataset (4 train, 1 val, 3 test cases; label k has intensity k) and synthetic folders: ``icma`` true
    to the real intensities, ``base`` with edema and core swapped, both made from c0 and c1 only, plus ``ic`` made
    from c3 only."""
    real = tmp_path / "Dataset001_Toy"
    rng = np.random.default_rng(0)
    for i, name in enumerate([*TRAIN, *VAL, *TEST]):
        label = label_map(i)
        image = INTENSITY[label] + rng.normal(0, 0.05, SHAPE)
        save_case(image, label, real / "imagesTr" / f"{name}_0000.nii.gz", real / "labelsTr" / f"{name}.nii.gz")
    atomic_write_json(real / "dataset.json", {"channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": 8,
                                              "file_ending": ".nii.gz"})
    atomic_write_json(real / "splits.json", {"train": TRAIN, "val": VAL, "test": TEST})
    synthetic = tmp_path / "synthetic"
    for setting, intensity, cases in (("icma", INTENSITY, ("c0", "c1")), ("base", INTENSITY[[0, 2, 1]], ("c0", "c1")),
                                      ("ic", INTENSITY, ("c3",))):
        for case in cases:
            for k in range(2):
                label = label_map(100 + 10 * k + int(case[1]))
                image = intensity[label] + rng.normal(0, 0.05, SHAPE)
                folder = synthetic / setting
                save_case(image, label, folder / f"{case}_s{k}_image.nii.gz", folder / f"{case}_s{k}_label.nii.gz")
    return real, synthetic


def config(data, tmp_path, settings, **kw) -> DownstreamConfig:
    real, synthetic = data
    defaults = dict(conditions=("real", "real+icma", "real+base", "icma-only"), real_counts=("2",), seeds=(0, 1),
                    segmenter=settings, resamples=2000, progress=False)
    return DownstreamConfig(real=real, synthetic=synthetic, **{"out": tmp_path / "out", **defaults, **kw})


# -- conditions, regimes -------------------------------------------------------------------------------------------
def test_parse_condition():
    assert parse_condition("real") == (True, None)
    assert parse_condition("real+icma") == (True, "icma")
    assert parse_condition("icma-only") == (False, "icma")
    assert parse_condition("real+filtered") == (True, "filtered")
    with pytest.raises(ValueError, match=r"condition 'synthetic' is not one of: real, real\+<setting>"):
        parse_condition("synthetic")


def test_plan_uses_the_first_k_training_cases_and_their_synthetic_cases(data, tmp_path, fake_backend):
    runs, test_cases, _ = plan_runs(config(data, tmp_path, fake_backend, real_counts=("2", "all")))
    assert test_cases == TEST
    assert [(r.regime, r.condition, r.seed) for r in runs[:3]] == [("2", "real", 0), ("2", "real", 1),
                                                                   ("2", "real+icma", 0)]
    by_key = {(r.regime, r.condition, r.seed): r for r in runs}
    assert [c.name for c in by_key["2", "real", 0].real_cases] == ["c0", "c1"]
    assert [c.name for c in by_key["all", "real", 0].real_cases] == TRAIN
    assert [c.name for c in by_key["2", "real+icma", 1].synthetic_cases] == ["c0_icma_s0", "c0_icma_s1",
                                                                            "c1_icma_s0", "c1_icma_s1"]
    assert by_key["2", "icma-only", 0].real_cases == ()
    assert len(runs) == 2 * 4 * 2


def test_plan_fails_before_training(data, tmp_path, fake_backend):
    with pytest.raises(ValueError, match=r"condition real\+ic, 2 real cases \['c0', 'c1'\]: no synthetic case was "
                                         r"made from their masks \(the synthetic cases come from \['c3'\]\)"):
        plan_runs(config(data, tmp_path, fake_backend, conditions=("real", "real+ic")))
    with pytest.raises(ValueError, match=r"real count '9' must be 'all' or an int in \[1, 4\]"):
        plan_runs(config(data, tmp_path, fake_backend, real_counts=("9",)))
    with pytest.raises(FileNotFoundError, match=r"condition real\+igma: no synthetic folder .*igma \(have \['base', "
                                                r"'ic', 'icma'\]\)"):
        plan_runs(config(data, tmp_path, fake_backend, conditions=("real+igma",)))
    with pytest.raises(ValueError, match=r"condition real\+filtered needs min_dice in \[0, 1\], got None"):
        plan_runs(config(data, tmp_path, fake_backend, conditions=("real+filtered",)))
    real, _ = data
    atomic_write_json(real / "splits.json", {"train": TRAIN, "val": VAL, "test": []})
    with pytest.raises(ValueError, match="has no test cases"):
        plan_runs(config(data, tmp_path, fake_backend))


# -- statistics with known answers ---------------------------------------------------------------------------------
def test_bootstrap_ci_known_answers():
    assert bootstrap_ci([0.1] * 12) == pytest.approx((0.1, 0.1))
    low, high = bootstrap_ci([-0.2, 0.2] * 10)
    assert low < 0 < high and low == pytest.approx(-high, abs=0.03)
    low, high = bootstrap_ci(np.linspace(0.1, 0.3, 30))
    assert 0.1 < low < 0.2 < high < 0.3
    assert all(math.isnan(v) for v in bootstrap_ci([0.5]))


def result(condition, seed, dice, regime="2"):
    """A run result with ``dice`` = {case: (edema, core)}."""
    return {"regime": regime, "condition": condition, "seed": seed, "real_cases": ["c0", "c1"],
            "synthetic_cases": [] if condition == "real" else ["s"] * 4, "seconds": 60.0,
            "dice": {case: {"1": a, "2": b} for case, (a, b) in dice.items()}}


def test_paired_differences_pair_by_case_and_seed():
    results = [result("real", 0, {"a": (0.5, 0.7), "b": (0.4, 0.4)}),
               result("real", 1, {"a": (0.6, 0.6), "b": (0.2, float("nan"))}),
               result("real+icma", 0, {"b": (0.5, 0.5), "a": (0.7, 0.9)}),
               result("real+icma", 1, {"a": (0.7, 0.7), "b": (0.3, float("nan"))}),
               result("real+icma", 2, {"a": (1.0, 1.0)})]  # no real run with seed 2: unpaired, left out
    assert paired_differences(results, "2", "real+icma") == pytest.approx([0.2, 0.1, 0.1, 0.1])


def test_summarise_mean_std_over_seeds_and_constant_difference():
    results = [result("real", s, {"a": (0.4 + 0.1 * s, 0.6), "b": (0.6 + 0.1 * s, 0.8)}) for s in range(3)]
    results += [result("real+icma", s, {"a": (0.5 + 0.1 * s, 0.7), "b": (0.7 + 0.1 * s, 0.9)}) for s in range(3)]
    rows = summarise(results, {1: "edema", 2: "core"}, resamples=1000)
    real, icma = rows
    assert real["condition"] == "real" and real["pairs"] == 0 and math.isnan(real["difference"])
    assert real["dice"]["edema"] == pytest.approx((0.6, 0.1))  # per-seed means 0.5, 0.6, 0.7
    assert real["dice"]["core"] == pytest.approx((0.7, 0.0))
    assert real["dice"]["mean"] == pytest.approx((0.65, 0.05))
    assert icma["difference"] == pytest.approx(0.1) and icma["ci"] == pytest.approx((0.1, 0.1))
    assert icma["pairs"] == 6 and icma["better_pairs"] == 6 and icma["synthetic_cases"] == 4


# -- the whole experiment ------------------------------------------------------------------------------------------
def test_experiment_outputs_and_known_effects(data, tmp_path, fake_backend):
    """True-intensity synthetic cases change nothing; label-swapped ones (``base`` here) hurt, with an interval
    below zero; the filter drops them."""
    cfg = config(data, tmp_path, fake_backend, conditions=("real", "real+icma", "real+base", "icma-only",
                                                           "real+filtered"),
                 min_dice=0.8, filter_settings=("icma", "base"))
    run_experiment(cfg, log=lambda _: None)
    out = cfg.out
    for name in ("results.csv", "summary.md", "summary.json", "downstream.png", "downstream.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = {r["condition"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert list(rows) == ["real", "real+icma", "real+base", "icma-only", "real+filtered"]
    assert rows["real"]["dice"]["mean"][0] > 0.95
    assert abs(rows["real+icma"]["difference"]) < 0.02 and rows["icma-only"]["dice"]["mean"][0] > 0.95
    assert rows["real+base"]["difference"] < -0.2 and rows["real+base"]["ci"][1] < 0
    filtered = json.loads((out / "runs/n2/real+filtered/seed0/result.json").read_text())
    assert filtered["synthetic_cases"] == ["c0_icma_s0", "c0_icma_s1", "c1_icma_s0", "c1_icma_s1"]
    assert filtered["filter_scores"]["c0_base_s0"] < 0.8 <= filtered["filter_scores"]["c0_icma_s0"]
    table = (out / "summary.md").read_text()
    assert "| 2 | real+base | 2 + 4 |" in table and "Δ vs real [95 % CI]" in table
    html_text = (out / "downstream.html").read_text()
    assert "<table>" in html_text and "<td>real+base</td>" in html_text and "downstream.png" in html_text
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "regime,condition,seed,case,label,dice"
    assert len(csv_lines) == 1 + 5 * 2 * 3 * 3  # conditions x seeds x test cases x (2 labels + mean)


def test_real_copies_known_answers():
    assert real_copies(2, 8, None) == 1 and real_copies(2, 0, 0.5) == 1 and real_copies(0, 8, 0.5) == 1
    assert real_copies(2, 8, 0.5) == 4  # 8 real entries beside 8 synthetic
    assert real_copies(2, 8, 0.2) == 1 and real_copies(2, 8, 0.75) == 12 and real_copies(3, 8, 0.5) == 3
    cases = [TrainingCase("a", Path("a.nii.gz"), Path("a_l.nii.gz")), TrainingCase("b", Path("b.nii.gz"), Path("x"))]
    assert [c.name for c in repeated(cases, 3)] == ["a", "b", "a_copy1", "b_copy1", "a_copy2", "b_copy2"]
    assert repeated(cases, 3)[4].image == Path("a.nii.gz") and repeated(cases, 1) == cases


def test_a_real_share_repeats_the_real_cases_and_dilutes_harmful_synthetic_ones(data, tmp_path, fake_backend):
    """Label-swapped synthetic cases (base) hurt less when the real cases make up 90 % of the training set; the share
    and the copies are recorded, and a rerun with another share is refused."""
    plain = config(data, tmp_path / "plain", fake_backend, conditions=("real", "real+base"), seeds=(0,))
    shared = config(data, tmp_path / "shared", fake_backend, conditions=("real", "real+base"), seeds=(0,),
                    real_share=0.9)
    differences = {}
    for cfg in (plain, shared):
        run_experiment(cfg, log=lambda _: None)
        rows = {r["condition"]: r for r in json.loads((cfg.out / "summary.json").read_text())["rows"]}
        differences[cfg.real_share] = rows["real+base"]["difference"]
    assert differences[None] < -0.2 and differences[None] < differences[0.9] <= 0
    result = json.loads((shared.out / "runs/n2/real+base/seed0/result.json").read_text())
    assert (result["real_share"], result["real_copies"]) == (0.9, 18)  # 2 real x 18 beside 4 synthetic
    assert json.loads((shared.out / "runs/n2/real/seed0/result.json").read_text())["real_copies"] == 1
    assert "Real share 0.9: in real + synthetic runs each real case enters the training set 18 times." in (
        shared.out / "summary.md").read_text()
    again = config(data, tmp_path / "shared", fake_backend, conditions=("real", "real+base"), seeds=(0,),
                   real_share=0.5)
    with pytest.raises(ValueError, match=r"trained with real share 0.9; asked for 0.5: use another --out"):
        run_experiment(again, log=lambda _: None)
    with pytest.raises(ValueError, match=r"real_share must be in \(0, 1\) or None \(every case once\), got 1.0"):
        config(data, tmp_path, fake_backend, real_share=1.0)


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(data, tmp_path, fake_backend):
    cfg = config(data, tmp_path, fake_backend, conditions=("real", "real+icma"), seeds=(0,))
    FakeSegmenter.stop_after = 6  # run 1 (real) takes 4 iterations, run 2 stops after 2 of its 4
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, log=lambda _: None)
    real_dir = str(cfg.out / "runs/n2/real/seed0/segmenter")
    icma_dir = str(cfg.out / "runs/n2/real+icma/seed0/segmenter")
    assert (cfg.out / "runs/n2/real/seed0/result.json").is_file()
    assert not (cfg.out / "runs/n2/real+icma/seed0/result.json").exists()
    assert FakeSegmenter.steps == [(real_dir, i) for i in range(4)] + [(icma_dir, 0), (icma_dir, 1)]

    FakeSegmenter.stop_after = None
    FakeSegmenter.steps.clear()
    messages = []
    run_experiment(cfg, log=messages.append)
    assert FakeSegmenter.steps == [(icma_dir, 2), (icma_dir, 3)]  # the finished run is skipped, the other resumes
    assert any("real, seed 0: done before, skipped" in m for m in messages)
    assert (cfg.out / "runs/n2/real+icma/seed0/result.json").is_file()

    FakeSegmenter.steps.clear()
    run_experiment(cfg, log=lambda _: None)
    assert FakeSegmenter.steps == []  # everything finished: nothing trains

    longer = SegmenterSettings(backend="fake", iterations=5)
    with pytest.raises(ValueError, match=r"seed0/result.json was trained with other segmenter settings .*asked for "
                                         r"fake, 5 iterations, options \{\}: use another --out"):
        run_experiment(config(data, tmp_path, longer, conditions=("real", "real+icma"), seeds=(0,)),
                       log=lambda _: None)


def test_cli_prints_the_table(data, tmp_path, fake_backend, capsys):
    real, synthetic = data
    code = downstream.main(["--real", str(real), "--synthetic", str(synthetic), "--out", str(tmp_path / "cli"),
                            "--backend", "fake", "--iterations", "2", "--conditions", "real", "real+icma",
                            "--seeds", "0", "1", "--real-counts", "2", "--resamples", "500", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| real cases | condition | training cases (real + synthetic) | Dice edema | Dice core |" in printed
    assert "| 2 | real+icma | 2 + 4 |" in printed
    code = downstream.main(["--real", str(real), "--synthetic", str(synthetic), "--out", str(tmp_path / "bad"),
                            "--backend", "fake", "--conditions", "real", "synthetic"])
    assert code == 2 and "error: condition 'synthetic' is not one of" in capsys.readouterr().err


# -- --jobs N: runs in worker processes ---------------------------------------------------------------------------
def dice_lines(messages: Sequence[str]) -> list[str]:
    """The finished-run log lines without their times: ``[downstream i/n] ...: mean Dice x.xxx``, sorted."""
    return sorted(m.partition(" in ")[0] for m in messages if ": mean Dice " in m)


def outputs(out: Path) -> tuple[list, str, str]:
    """What a summary says, without its times: the summary rows, the markdown table and ``results.csv``."""
    rows = json.loads((out / "summary.json").read_text())["rows"]
    for row in rows:
        row.pop("minutes")
    table = (out / "summary.md").read_text().partition("\n\n|")[2]
    return rows, table, (out / "results.csv").read_text()


def test_jobs_2_gives_the_results_of_jobs_1_runs_side_by_side_and_filtered_after_real(data, tmp_path, fake_backend):
    """The same result.json values and summary as jobs=1; two runs at once in worker processes; a real+filtered
    run waits for its real run while later runs go ahead; a rerun skips everything and rewrites the same summary."""
    kw = dict(conditions=("real", "real+filtered", "real+icma", "real+base"), min_dice=0.8,
              filter_settings=("icma", "base"))
    one = config(data, tmp_path, fake_backend, **kw)
    two = config(data, tmp_path, fake_backend, out=tmp_path / "two", jobs=2, **kw)
    record = tmp_path / "record.txt"
    # real seed 0 trains only once real+icma seed 0 has started beside it (it would time out one run at a time)
    factory = RecordingFactory(record, side_by_side=("/real/seed0/", "/real+icma/seed0/"))
    logs: dict[int, list[str]] = {1: [], 2: []}
    results_one = run_experiment(one, log=logs[1].append)
    results_two = run_experiment(two, factory=factory, log=logs[2].append)

    keys = ("regime", "condition", "seed", "real_cases", "synthetic_cases", "filter_scores", "dice")
    assert [{k: r[k] for k in keys} for r in results_two] == [{k: r[k] for k in keys} for r in results_one]
    folders = sorted(p.parent.relative_to(one.out) for p in (one.out / "runs").glob("*/*/seed*/result.json"))
    assert len(folders) == 8 and folders == sorted(p.parent.relative_to(two.out)
                                                   for p in (two.out / "runs").glob("*/*/seed*/result.json"))
    for folder in folders:
        read = [json.loads((out / folder / "result.json").read_text()) for out in (one.out, two.out)]
        assert [r["dice"] for r in read[1:]] == [read[0]["dice"]] and read[1]["filter_scores"] == \
            read[0]["filter_scores"], folder
    filtered = json.loads((two.out / "runs/n2/real+filtered/seed1/result.json").read_text())
    assert filtered["synthetic_cases"] == ["c0_icma_s0", "c0_icma_s1", "c1_icma_s0", "c1_icma_s1"]
    assert outputs(two.out) == outputs(one.out)
    assert dice_lines(logs[2]) == dice_lines(logs[1]) and len(dice_lines(logs[2])) == 8

    events = read_record(record)
    assert events and all(int(pid) != os.getpid() for _, pid, *_ in events)  # every run trained in a worker
    runs = two.out / "runs/n2"

    def first(event: str, condition: str, seed: int, more: str = "") -> int:
        folder = str(runs / condition / f"seed{seed}/segmenter")
        return next(i for i, (e, _, f, *rest) in enumerate(events) if (e, f) == (event, folder)
                    and more in " ".join(rest))

    assert first("train-start", "real+icma", 0) < first("trained", "real", 0)  # side by side
    for seed in (0, 1):  # the filtered run scores its candidates with the finished real segmenter, then trains
        assert first("trained", "real", seed) < first("predict", "real", seed, "filter_predictions") < \
            first("train-start", "real+filtered", seed)
    # real seed 1 finishes first; real+filtered seed 0 (3/8) must wait for real seed 0, so seed 1's (4/8) goes ahead
    assert [m.split(": ")[0] for m in logs[2] if "training on" in m][:4] == [
        "[downstream 1/8] 2 real, real, seed 0", "[downstream 2/8] 2 real, real, seed 1",
        "[downstream 4/8] 2 real, real+filtered, seed 1", "[downstream 5/8] 2 real, real+icma, seed 0"]

    expected = outputs(two.out)
    for name in ("summary.json", "summary.md", "results.csv", "downstream.html", "downstream.png"):
        (two.out / name).unlink()
    record.unlink()
    logs[2].clear()
    run_experiment(two, factory=factory, log=logs[2].append)
    assert not record.exists()  # nothing trained or predicted: no worker started
    assert logs[2] == [f"[downstream {i}/8] 2 real, {c}, seed {s}: done before, skipped"
                       for i, (c, s) in enumerate(((c, s) for c in kw["conditions"] for s in (0, 1)), 1)]
    assert outputs(two.out) == expected
    assert (two.out / "downstream.html").is_file() and (two.out / "downstream.png").is_file()


def test_jobs_2_failure_names_the_run_keeps_finished_runs_and_resumes(data, tmp_path, fake_backend):
    """real+icma is interrupted after 2 of its 4 iterations in its worker while real trains beside it: RunFailed
    names it, real keeps its result.json, and a rerun with jobs=2 resumes real+icma at iteration 2."""
    record = tmp_path / "record.txt"
    failing = RecordingFactory(record, fail_in="/real+icma/", fail_after=2, side_by_side=("/real/", "/real+icma/"))
    cfg = config(data, tmp_path, fake_backend, conditions=("real", "real+icma", "real+base"), seeds=(0,), jobs=2)
    messages = []
    with pytest.raises(RunFailed, match=r"^\[downstream 2/3\] 2 real, real\+icma, seed 0: failed in its worker "
                                        r"process: KeyboardInterrupt: simulated interruption; finished runs keep "
                                        r"their result.json, a rerun resumes the others$") as raised:
        run_experiment(cfg, factory=failing, log=messages.append)
    assert isinstance(raised.value.__cause__, KeyboardInterrupt)
    assert any(re.fullmatch(r"\[downstream 2/3\] 2 real, real\+icma, seed 0: failed \(KeyboardInterrupt: simulated "
                            r"interruption\); starting no more runs, [01] still in flight", m) for m in messages)
    assert (cfg.out / "runs/n2/real/seed0/result.json").is_file()  # in flight beside the failure: finished
    assert not (cfg.out / "runs/n2/real+icma/seed0/result.json").exists()
    assert json.loads((cfg.out / "runs/n2/real+icma/seed0/segmenter/state.json").read_text())["step"] == 2
    assert not (cfg.out / "summary.json").exists()

    record.unlink()
    messages.clear()
    run_experiment(cfg, factory=RecordingFactory(record), log=messages.append)
    started = {Path(e[2]).parent.parent.name: e[3] for e in read_record(record) if e[0] == "train-start"}
    assert started.pop("real+icma") == "2" and set(started) <= {"real+base"}  # resumed; real not trained again
    assert messages[0] == "[downstream 1/3] 2 real, real, seed 0: done before, skipped"
    assert all((cfg.out / "runs/n2" / c / "seed0/result.json").is_file() for c in ("real", "real+icma", "real+base"))


def test_jobs_needs_a_factory_that_pickles_and_an_int_of_at_least_1(data, tmp_path, fake_backend, capsys):
    cfg = config(data, tmp_path, fake_backend, conditions=("real",), seeds=(0,), jobs=2)
    with pytest.raises(ValueError, match=r"jobs=2 trains each run in a worker process, which needs a segmenter "
                                         r"factory that pickles \(a module-level function or class, or an instance "
                                         r"of one\); <function .*<lambda>.* does not: "):
        run_experiment(cfg, factory=lambda settings, work_dir: FakeSegmenter(settings, work_dir), log=print)
    assert not (cfg.out / "runs/n2/real/seed0/segmenter").exists()
    with pytest.raises(ValueError, match=r"jobs must be an int >= 1 \(runs trained at once\), got 0"):
        config(data, tmp_path, fake_backend, jobs=0)
    real, synthetic = data
    argv = ["--real", str(real), "--synthetic", str(synthetic), "--out", str(tmp_path / "cli"), "--backend", "fake"]
    assert downstream.config_from_args(downstream.build_parser().parse_args(argv)).jobs == 1
    assert downstream.config_from_args(downstream.build_parser().parse_args([*argv, "--jobs", "2"])).jobs == 2
    assert downstream.main([*argv, "--jobs", "0"]) == 2
    assert "error: jobs must be an int >= 1 (runs trained at once), got 0" in capsys.readouterr().err


def test_a_failed_worker_run_ends_main_with_an_error_line(data, tmp_path, fake_backend, monkeypatch, capsys):
    def failing(config, *args, **kwargs):
        raise RunFailed("[downstream 2/3] 2 real, real+icma, seed 0: failed in its worker process: boom")

    monkeypatch.setattr(downstream, "run_experiment", failing)
    real, synthetic = data
    argv = ["--real", str(real), "--synthetic", str(synthetic), "--out", str(tmp_path / "cli"), "--backend", "fake"]
    assert downstream.main([*argv, "--jobs", "2"]) == 2
    assert capsys.readouterr().err == ("error: [downstream 2/3] 2 real, real+icma, seed 0: failed in its worker "
                                       "process: boom\n")


# -- synthesis from the training masks -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests import _tiny_models

    return _tiny_models.tiny_setup(tmp_path_factory)


def test_synthesis_makes_the_needed_settings_from_the_training_masks_only(tiny, tmp_path, fake_backend):
    import shutil

    real = Path(shutil.copytree(tiny["data"], tmp_path / "real"))
    names = tiny["names"]
    atomic_write_json(real / "splits.json", {"train": names[:3], "val": [], "test": names[3:]})
    cfg = DownstreamConfig(real=real, synthetic=tmp_path / "synthetic", out=tmp_path / "out",
                           conditions=("real", "real+icma", "base-only"), real_counts=("1", "2"), seeds=(0,),
                           segmenter=fake_backend, resamples=200, progress=False)
    assert downstream.needed_settings(cfg) == ["icma", "base"]
    synthesis = downstream.Synthesis(models={"gem3d": tiny["volume_stage"], "base": tiny["baseline_volume"]},
                                     samples_per_case=2)
    downstream.synthesise(cfg, synthesis, log=lambda _: None)
    for setting in ("icma", "base"):
        made = sorted(p.name for p in (cfg.synthetic / setting).glob("*_label.nii.gz"))
        # the two first training cases (the largest regime), two samples each; never a test case
        assert made == [f"{n}_s{k}_label.nii.gz" for n in sorted(names[:3])[:2] for k in range(2)]
    stamps = {p: p.stat().st_mtime_ns for p in cfg.synthetic.rglob("*.nii.gz")}
    downstream.synthesise(cfg, synthesis, log=lambda _: None)  # a rerun skips the finished samples
    assert {p: p.stat().st_mtime_ns for p in cfg.synthetic.rglob("*.nii.gz")} == stamps
    runs, test_cases, _ = plan_runs(cfg)
    assert test_cases == names[3:]
    by_condition = {(r.regime, r.condition): r for r in runs}
    assert len(by_condition[("1", "real+icma")].synthetic_cases) == 2
    assert len(by_condition[("2", "base-only")].synthetic_cases) == 4
    assert by_condition[("2", "base-only")].real_cases == ()


def test_synthesis_needs_the_model_of_each_setting(tiny, tmp_path):
    synthesis = downstream.Synthesis(models={"gem3d": tiny["volume_stage"]})
    assert synthesis.model_for("icma") == Path(tiny["volume_stage"])
    with pytest.raises(ValueError, match=r"setting 'base' needs --model base=FOLDER \(given: \['gem3d'\]\)"):
        synthesis.model_for("base")
    args = downstream.build_parser().parse_args(
        ["--real", "r", "--synthetic", str(tmp_path), "--out", "o", "--conditions", "all", "--model", "gem3d=m"])
    assert downstream.config_from_args(args).conditions == ("real", "real+ic", "real+icma", "icma-only")
    with pytest.raises(SystemExit):
        downstream.build_parser().parse_args(["--real", "r", "--synthetic", "s", "--out", "o", "--model", "x=m"])
