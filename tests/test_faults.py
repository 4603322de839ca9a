"""Faults (docs/reliability.md, "Faults"): a training run killed with SIGKILL resumes exactly (step, optimiser, EMA,
data order, noise), checkpoint writes are atomic, a NaN loss stops training and keeps the last good checkpoint, and
a killed inference run finishes only the missing samples without ever showing a partial NIfTI.

Training runs use a tiny random first stage (no autoencoder run needed): 3 cases of 24x24x10, 32x32 slices, 4-slice
clips, 16x16 latents.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gem3d.export.manifest import Manifest
from gem3d.training.faults import AtomicCheckpointIO, check_finite_loss
from gem3d.training.ldm import Gem3dLDM
from tests import _tiny_models
from tests.test_main import main_module, only_run, write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
for name in ("GEM3D_RUN_LOGDIR", "PYTHONWARNINGS"):  # warnings stay on: Lightning's "not resumable" is one
    ENV.pop(name, None)


def write_tiny_config(folder: Path, dataset: Path, max_steps: int, every_n_train_steps: int) -> Path:
    """demo_stage1.yaml shrunk: a random f=2 first stage, a 2-level UNet, 4 steps per epoch, validation after each."""
    config = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / "demo_stage1.yaml")
    model = config.model.params
    model.first_stage_config = {"target": "gem3d.models.autoencoder.FirstStage.from_diffusers_config",
                                "params": {"block_out_channels": [32, 32], "layers_per_block": 1, "latent_channels": 4,
                                           "sample_size": 32, "in_channels": 1, "out_channels": 1}}
    model.unet_config.params.update({"channel_mult": [1, 2], "attention_resolutions": [], "model_channels": 32})
    model.update({"ema_decay": 0.9, "log_images_every_n_steps": 0})
    config.data.params.update({"dataset_dir": str(dataset), "clip_len": 4, "samples_per_epoch": STEPS_PER_EPOCH,
                               "val_fraction": 0.34, "preprocess": {**config.data.params.preprocess, "size": 32}})
    config.lightning.trainer.update({"max_steps": max_steps, "limit_val_batches": 1, "log_every_n_steps": 1,
                                     "enable_progress_bar": False})
    config.lightning.modelcheckpoint.params.every_n_train_steps = every_n_train_steps
    path = folder / "tiny_stage1.yaml"
    OmegaConf.save(config, path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("faults_data") / "Dataset998_Tiny")


def start_main(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def train_losses(run_dir: Path, newest_only: bool = False) -> dict[int, float]:
    """``{step: train/loss}`` from the run's TensorBoard events (only the newest process's file if asked)."""
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
    source = files[-1] if newest_only else run_dir / "tensorboard"
    events = EventAccumulator(str(source)).Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- training


def test_sigkilled_training_resumes_mid_epoch_exactly(tmp_path, dataset):
    """Run A trains 11 steps. Run B, the same, is killed with SIGKILL once its step-5 checkpoint exists (mid-epoch:
    4 steps per epoch), then resumed with -r: its losses after the resume point, its final weights, EMA and AdamW
    state equal A's bit for bit."""
    total, every = 11, 5
    config = write_tiny_config(tmp_path, dataset, max_steps=total, every_n_train_steps=every)
    logs_a, logs_b = tmp_path / "uninterrupted", tmp_path / "killed"
    run_a = start_main("--base", config, "-t", "-l", logs_a)
    run_b = start_main("--base", config, "-t", "-l", logs_b)
    deadline = time.monotonic() + 240
    while not list(logs_b.glob("*/checkpoints/last.ckpt")):  # written right after step-000005.ckpt
        assert run_b.poll() is None, run_b.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "run B wrote no checkpoint in time"
        time.sleep(0.02)
    run_b.send_signal(signal.SIGKILL)
    killed_output = run_b.communicate()[0]
    assert run_b.returncode == -signal.SIGKILL, killed_output[-2000:]
    run_dir_b = only_run(logs_b)
    killed_at = load(run_dir_b / "checkpoints" / "last.ckpt")
    resumed_from = killed_at["global_step"]
    assert resumed_from in (every, 2 * every) and resumed_from % STEPS_PER_EPOCH != 0  # a mid-epoch checkpoint
    epoch, batches = divmod(resumed_from, STEPS_PER_EPOCH)
    assert killed_at["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": epoch, "batches": batches}]

    resumed = start_main("-r", run_dir_b, "-t")
    finish(run_a)
    resumed_output = finish(resumed)
    assert "not resumable" not in resumed_output and "before the epoch ended" not in resumed_output

    run_dir_a = only_run(logs_a)
    losses_a, losses_b = train_losses(run_dir_a), train_losses(run_dir_b, newest_only=True)
    assert sorted(losses_b) == [s for s in sorted(losses_a) if s >= resumed_from]  # logged at the step before it
    assert len(losses_b) == total - resumed_from
    for step, value in losses_b.items():
        assert value == losses_a[step], (step, value, losses_a[step])  # the same numbers, not just the same steps

    final_a, final_b = load(run_dir_a / "checkpoints" / "last.ckpt"), load(run_dir_b / "checkpoints" / "last.ckpt")
    assert final_a["global_step"] == final_b["global_step"] == total
    assert int(final_b["state_dict"]["ema.num_updates"]) == total
    assert final_a["state_dict"].keys() == final_b["state_dict"].keys()
    for name, value in final_a["state_dict"].items():  # raw weights, EMA shadow, first stage
        assert torch.equal(value, final_b["state_dict"][name]), name
    adam_a, adam_b = final_a["optimizer_states"][0]["state"], final_b["optimizer_states"][0]["state"]
    assert adam_a.keys() == adam_b.keys()
    for index in adam_a:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(adam_a[index][key], adam_b[index][key]), (index, key)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, dataset, monkeypatch):
    config = write_tiny_config(tmp_path, dataset, max_steps=8, every_n_train_steps=2)
    real_loss = Gem3dLDM.loss

    def loss_nan_at_step_3(self, batch, generator=None):
        loss = real_loss(self, batch, generator)
        return loss * math.nan if self.training and self.global_step == 3 else loss

    monkeypatch.setattr(Gem3dLDM, "loss", loss_nan_at_step_3)
    with pytest.raises(FloatingPointError, match=r"train/loss is nan at global step 3 \(batch 3 of epoch 0\)"):
        main_module.run(["--base", str(config), "-t", "-l", str(tmp_path / "logs")])
    checkpoints = only_run(tmp_path / "logs") / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-000002.ckpt"]
    last = load(checkpoints / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_finite_loss_names_the_value_and_step(value):
    module = _tiny_models.build_model("baseline_volume")
    check_finite_loss(module, torch.tensor(0.5), batch_idx=0)  # finite: nothing happens
    with pytest.raises(FloatingPointError, match=rf"train/loss is {value} at global step 0 \(batch 7 of epoch 0\)"):
        check_finite_loss(module, torch.tensor(value), batch_idx=7)


def test_resume_without_last_ckpt_takes_the_newest_step_checkpoint(tmp_path, capsys):
    """Killed after writing step-000005.ckpt but before the first last.ckpt: -r goes on from step 5."""
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (5, 10):
        (checkpoints / f"step-{step:06d}.ckpt").write_bytes(b"x")
        time.sleep(0.01)
    assert main_module.resolve_resume(str(tmp_path / "run")) == (tmp_path / "run", checkpoints / "step-000010.ckpt")
    assert "has no last.ckpt: resuming from the newest step checkpoint step-000010.ckpt" in capsys.readouterr().out
    (checkpoints / "last.ckpt").write_bytes(b"x")
    assert main_module.resolve_resume(str(tmp_path / "run"))[1] == checkpoints / "last.ckpt"
    for path in checkpoints.iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="the run folder has no checkpoints/last.ckpt"):
        main_module.resolve_resume(str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------- checkpoint writes


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies half-way (here: torch.save raises after writing part of the file) leaves last.ckpt as it was."""
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_then_fail(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert torch.equal(load(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left either


def test_sigkilled_save_keeps_the_previous_checkpoint(tmp_path):
    """A process killed with SIGKILL in the middle of writing a checkpoint: last.ckpt is still the previous one."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()
    writing = tmp_path / "writing"
    child = textwrap.dedent(f"""
        import pathlib, time, torch
        from gem3d.training.faults import AtomicCheckpointIO

        def slow_save(obj, target, *args, **kwargs):
            pathlib.Path(target).write_bytes(b"PK\\x03\\x04 half a checkpoint")
            pathlib.Path({str(writing)!r}).touch()
            time.sleep(60)

        torch.save = slow_save
        AtomicCheckpointIO().save_checkpoint({{"state_dict": {{"w": torch.zeros(3)}}}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not writing.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the child never started writing"
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=30)
    assert path.read_bytes() == before and torch.equal(load(path)["state_dict"]["w"], torch.ones(3))
    hidden, visible = [], []
    for p in path.parent.iterdir():
        (hidden if p.name.startswith(".") else visible).append(p.name)
    assert visible == ["last.ckpt"]
    assert len(hidden) == 1 and hidden[0].startswith(".last.ckpt.")  # the killed write's temporary file
    assert main_module.remove_killed_writes(path.parent) == [path.parent / hidden[0]]  # main.py -r deletes it
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_checkpoint_with_non_finite_weights_is_not_written(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 4}, path)
    with pytest.raises(FloatingPointError, match=r"not writing .*last\.ckpt: the weights hold NaN or Inf values "
                                                 r"\(1 tensors, e\.g\. \['b'\]\) at global step 5"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(2), "b": torch.tensor([1.0, math.nan])}, "global_step": 5},
                           path)
    assert load(path)["global_step"] == 4


# ---------------------------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_models.tiny_setup(tmp_path_factory)


def visible_outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))


def test_killed_inference_reruns_only_missing_samples_and_never_shows_a_partial_nifti(tiny, tmp_path):
    args = [sys.executable, str(ROOT / "scripts" / "inference_demo_test.py"), "--data", str(tiny["data"]),
            "--model", str(tiny["volume_stage"]), "--out", str(tmp_path), "--steps", "2", "--no-progress",
            "--no-previews", "--cases", "3"]
    setting_dir = tmp_path / "test"
    manifest_path = setting_dir / "manifest.json"
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checked = set()
    deadline = time.monotonic() + 240
    while not (manifest_path.exists() and json.loads(manifest_path.read_text())["records"]):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no sample was finished in time"
        for path in visible_outputs(tmp_path):  # every visible NIfTI, at any moment, is complete
            if path.name.endswith(".nii.gz") and path not in checked:
                assert nib.load(str(path)).get_fdata().size > 0
                checked.add(path)
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    first = Manifest(manifest_path).records
    assert len(first) == 1 and first[0]["case"] == tiny["names"][0]
    for path in visible_outputs(tmp_path):
        if path.name.endswith(".nii.gz"):
            assert nib.load(str(path)).get_fdata().size > 0, path
    done_files = {name: (setting_dir / name) for name in first[0]["files"].values()}
    stamps = {name: p.stat().st_mtime_ns for name, p in done_files.items()}

    rerun = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    records = Manifest(manifest_path).records
    assert [r["case"] for r in records] == tiny["names"][:3]
    assert records[0] == first[0]  # the finished sample was neither redone nor re-recorded
    assert {name: p.stat().st_mtime_ns for name, p in done_files.items()} == stamps
    expected = {setting_dir / f for r in records for f in r["files"].values()} | {manifest_path}
    assert set(visible_outputs(tmp_path)) == expected
    for path in expected - {manifest_path}:
        assert nib.load(str(path)).get_fdata().size > 0


class Indices(torch.utils.data.Dataset):
    """Item i is i (the EpochSampler's indices run past len for later epochs)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> int:
        return index


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resumable_loader_goes_on_at_the_next_batch(num_workers):
    from gem3d.data.datasets import EpochSampler
    from gem3d.data.module import ResumableDataLoader

    def loader(position=None):
        return ResumableDataLoader(Indices(), batch_size=3, sampler=EpochSampler(10, seed=4), num_workers=num_workers,
                                   persistent_workers=num_workers > 0, position=position)

    uninterrupted = loader()
    uninterrupted.sampler.set_epoch(1)
    order = [b.tolist() for b in uninterrupted]
    assert sorted(sum(order, [])) == list(range(10, 20)) and len(uninterrupted) == 4
    saved = loader(position=lambda: (1, 2)).state_dict()
    assert saved == {"epoch": 1, "batches": 2}
    resumed = loader()
    resumed.load_state_dict(saved)
    assert len(resumed) == 4  # the epoch's length, as Lightning counts it
    assert [b.tolist() for b in resumed] == order[2:]
    assert [b.tolist() for b in resumed] == order  # the skip applies to one iterator only
