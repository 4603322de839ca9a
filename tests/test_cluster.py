"""Training on a cluster: SLURM requeue with gem3d's signal checkpoint, a run name that resumes when it exists, the
learning rate over nodes x devices, the newest step checkpoints kept, caches filled ahead by their own command, and
the start-up errors of a machine without a GPU."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main as main_module  # noqa: E402
from gem3d.config import load_config_file  # noqa: E402
from gem3d.training import encode  # noqa: E402
from gem3d.training.preemption import SignalCheckpoint, slurm_job_id  # noqa: E402
from test_main import autoencoder_run, dataset, load_ckpt, only_run, stage_args  # noqa: E402,F401

FAKE_SLURM = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "gem3d-train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "node1"}


@pytest.fixture()
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """SLURM's environment variables and an ``scontrol`` on PATH that records its arguments; returns the record."""
    record = tmp_path / "scontrol.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in FAKE_SLURM.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "GEM3D_RUN_LOGDIR"):
        monkeypatch.delenv(key, raising=False)
    return record


def test_slurm_requeue_after_the_signal_checkpoint_and_the_requeued_job_resumes(tmp_path, dataset, autoencoder_run,
                                                                                  fake_slurm, capsys):
    logdir = tmp_path / "logs"
    # the config's floor of steps (min_steps, kept past should_stop by Lightning) must not delay the requeue's stop
    assert OmegaConf.load(Path(main_module.__file__).parent / "configs" / "latent-diffusion" /
                          "demo_base_stage1.yaml").lightning.trainer.min_steps > 6
    args = stage_args("demo_base_stage1.yaml", dataset, autoencoder_run, logdir, "lightning.trainer.max_steps=6",
                      "model.params.log_images_every_n_steps=0", "data.params.samples_per_epoch=100",
                      "lightning.callbacks.sender.target=test_main.SignalSender",
                      "lightning.callbacks.sender.params.usr1_at=1", "lightning.callbacks.sender.params.term_at=-1",
                      "-n", "requeued", "--resume-if-exists", "--allow-any-target")
    trainer = main_module.run(args)
    signal_checkpoint = next(cb for cb in trainer.callbacks if isinstance(cb, SignalCheckpoint))
    assert signal_checkpoint.requeue and signal_checkpoint.requeue_signal == signal.SIGUSR1  # SLURM seen
    out = capsys.readouterr().out
    saved = [line for line in out.splitlines() if line.startswith("[SIGUSR1] saved")]
    assert len(saved) == 1 and "requeued SLURM job 4242" in out, out
    step = trainer.global_step
    assert step in (1, 2) and saved[0].endswith(f"at global step {step}")  # stopped right after the save
    assert fake_slurm.read_text() == "requeue 4242\n"
    run_dir = logdir / "requeued"
    assert only_run(logdir) == run_dir and load_ckpt(run_dir)["global_step"] == step

    # the requeued job runs the same command: it finds its run and goes on to max_steps
    args[args.index("lightning.callbacks.sender.params.usr1_at=1")] = "lightning.callbacks.sender.params.usr1_at=-1"
    trainer = main_module.run(args)
    assert f"--resume-if-exists: resuming {run_dir}" in capsys.readouterr().out
    assert trainer.global_step == 6 and only_run(logdir) == run_dir
    assert load_ckpt(run_dir)["global_step"] == 6 and fake_slurm.read_text() == "requeue 4242\n"


def test_slurm_job_id_of_array_tasks_and_bad_ids():
    assert slurm_job_id({"SLURM_JOB_ID": "77"}) == "77"
    assert slurm_job_id({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}) == "70_3"
    with pytest.raises(ValueError, match=r"SLURM job id '7; rm' .* is not a job id like '1234' or '1234_5'"):
        slurm_job_id({"SLURM_JOB_ID": "7; rm"})


def test_resume_if_exists_starts_then_resumes_and_keeps_the_newest_step_checkpoints(tmp_path, dataset,
                                                                                   autoencoder_run, capsys):
    args = stage_args("demo_base_stage1.yaml", dataset, autoencoder_run, tmp_path,
                      "model.params.log_images_every_n_steps=0",
                      "data.params.samples_per_epoch=100", "lightning.modelcheckpoint.params.every_n_train_steps=1",
                      "lightning.modelcheckpoint.params.save_top_k=2", "-n", "stable", "--resume-if-exists")
    first = main_module.run([*args, "lightning.trainer.max_steps=3"])
    assert first.global_step == 3 and "resuming" not in capsys.readouterr().out
    run_dir = tmp_path / "stable"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt", "step-000002.ckpt", "step-000003.ckpt"]  # save_top_k=2: the newest two by step
    second = main_module.run([*args, "lightning.trainer.max_steps=5"])
    assert second.global_step == 5 and only_run(tmp_path) == run_dir
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt", "step-000004.ckpt", "step-000005.ckpt"]
    assert len(list((run_dir / "configs").glob("*-project.yaml"))) >= 1


@pytest.mark.parametrize("argv, message", [
    (["--resume-if-exists"], "--resume-if-exists needs -n NAME: the run folder LOGDIR/NAME"),
    (["--resume-if-exists", "-n", "a/b"], "-n 'a/b': a run name is one folder name, without '/'"),
    (["-n", "x", "-r", "/tmp"], "for a run that resumes when it exists use -n NAME --resume-if-exists"),
])
def test_resume_if_exists_flag_errors(tmp_path, capsys, argv, message):
    base = ["--base", str(ROOT / "configs" / "latent-diffusion" / "demo_stage1.yaml"), "-t", "-l", str(tmp_path)]
    assert main_module.main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_learning_rate_scales_with_nodes_times_devices(tmp_path, dataset, autoencoder_run, capsys, monkeypatch):
    monkeypatch.delenv("GEM3D_RUN_LOGDIR", raising=False)
    args = stage_args("demo_stage1.yaml", dataset, autoencoder_run, tmp_path, "lightning.trainer.accelerator=cpu",
                      "lightning.trainer.devices=2", "lightning.trainer.num_nodes=3", "lightning.trainer.strategy=ddp",
                      "lightning.trainer.accumulate_grad_batches=2", "data.params.batch_size=2",
                      "model.params.base_learning_rate=1e-6")
    opt, overrides = main_module.get_parser().parse_known_args(main_module._normalise_train_flag(args))
    try:
        trainer, model, *_ = main_module._start(opt, overrides)
    finally:
        os.environ.pop("GEM3D_RUN_LOGDIR", None)
    assert trainer.num_nodes == 3 and trainer.num_devices == 2
    assert model.learning_rate == pytest.approx(2 * 6 * 2 * 1e-6)  # accumulate x (3 nodes x 2 devices) x batch
    out = capsys.readouterr().out
    assert "world size 6 = 3 node(s) x 2 device(s)" in out and "6 (num_gpus)" in out


def test_encode_ahead_in_parts_then_training_encodes_nothing(tmp_path, dataset, autoencoder_run, capsys):
    overrides = [f"data.params.dataset_dir={dataset}", "data.params.preprocess.size=32",
                 f"model.params.first_stage_config.params.ckpt_path={autoencoder_run}",
                 f"data.params.cache_dir={tmp_path / 'cache'}", f"data.params.splits_path={tmp_path / 'splits.json'}"]
    base = ["--base", str(ROOT / "configs" / "latent-diffusion" / "demo_stage1.yaml")]
    assert encode.main([*base, "--part", "1/2", *overrides]) == 0
    first = capsys.readouterr().out
    assert "3 cases, about 30 slices: volumes" in first and "latents" in first  # tiny: 3 cases x 10 slices
    assert encode.main([*base, "--part", "2/2", *overrides]) == 0
    second = capsys.readouterr().out
    # part 1: cases 000 and 002, part 2: case 001; a train case is encoded with its contrast variants
    variants = len(OmegaConf.select(load_config_file(base[1]), "data.params.contrast_variants") or [])
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert len(splits["train"]) == 2 and len(splits["val"]) == 1
    expected = [sum(1 + variants if f"tiny_{i:03d}" in splits["train"] else 1 for i in share)
                for share in ((0, 2), (1,))]
    counts = [int(text.split(" and encoded ")[1].split()[0]) for text in (first, second)]
    assert counts == expected and sum(counts) == 2 * (1 + variants) + 1, (first, second)
    latent_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("latents-*/*.npy")}
    assert latent_files
    trainer = main_module.run(stage_args("demo_stage1.yaml", dataset, autoencoder_run, tmp_path / "logs",
                                         "lightning.trainer.max_steps=1", "model.params.log_images_every_n_steps=0",
                                         *overrides[3:]))
    assert trainer.global_step == 1 and trainer.datamodule.latents.encoded_count == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("latents-*/*.npy")} == latent_files
    assert encode.main([*base, "--part", "3/2", *overrides]) == 2
    assert "error: --part '3/2': expected I/N with 1 <= I <= N" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpus_flag_without_a_gpu_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--base", str(ROOT / "configs" / "latent-diffusion" / "demo_stage1.yaml"), "-t", "--gpus", "0,",
            "-l", str(tmp_path / "logs")]
    assert main_module.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("error: --gpus='0,': this machine has no CUDA GPU (torch.cuda.is_available() is "
                                 "False); leave --gpus out to train on the CPU\n")
    assert not (tmp_path / "logs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_accelerator_without_a_gpu_is_one_error_line(tmp_path, dataset, autoencoder_run, capsys):
    args = stage_args("demo_stage1.yaml", dataset, autoencoder_run, tmp_path, "lightning.trainer.accelerator=gpu")
    assert main_module.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lightning.trainer {'accelerator': 'gpu'") and err.count("\n") == 1, err


def test_every_config_problem_at_once(tmp_path, dataset, capsys):
    argv = ["--base", str(ROOT / "configs" / "latent-diffusion" / "demo_stage2.yaml"), "-t", "-l", str(tmp_path / "l"),
            f"data.params.dataset_dir={dataset}", "model.params.kl_wieght=1", "data.params.batch_sise=2",
            "model.params.first_stage_config.params.ckpt_path=/no/autoencoder/last.ckpt",
            "model.params.ckpt_path=/no/stage1.ckpt"]
    assert main_module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 config problems: (1) unknown key 'kl_wieght' in model.params")
    assert err.count("\n") == 1
    for part in ("(2) unknown key 'batch_sise' in data.params", "did you mean 'batch_size'",
                 "(3) model.params.ckpt_path='/no/stage1.ckpt': no such file",
                 "(4) model.params.first_stage_config.params.ckpt_path='/no/autoencoder/last.ckpt': no such file"):
        assert part in err, err
    assert not (tmp_path / "l").exists()


def test_inference_split_cases_read_the_splits_that_training_wrote(tmp_path_factory, tmp_path, monkeypatch):
    from gem3d.data.datasets import dataset_cache_dir
    from gem3d.inference.engine import Enhancer, InferenceConfig
    from tests import _tiny_models

    tiny = _tiny_models.tiny_setup(tmp_path_factory)
    monkeypatch.setenv("GEM3D_CACHE", str(tmp_path / "cache"))
    assert not (tiny["data"] / "splits.json").exists()  # training wrote them outside the dataset
    config = InferenceConfig(setting="test", data=tiny["data"], out=tmp_path / "out", model=tiny["volume_stage"],
                             cases="split:val", progress=False)
    with pytest.raises(FileNotFoundError, match=r"--cases split:val: .*splits\.json does not exist"):
        Enhancer(config).select_cases()
    splits = dataset_cache_dir(tiny["data"]) / "splits.json"
    splits.parent.mkdir(parents=True)
    splits.write_text(json.dumps({"train": tiny["names"][:-1], "val": tiny["names"][-1:], "test": []}))
    assert Enhancer(config).select_cases() == tiny["names"][-1:]
