"""main.py end to end on the CPU: demo autoencoder -> stage 1 -> resume -> stage 2, DDP, signals, start-up errors.

The demo configs run with overrides that shrink the data (3 synthetic cases, 32x32 slices, 4-slice clips).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main as main_module  # noqa: E402
from conftest import child_env  # noqa: E402
from gem3d.model_dirs import load_model_dir  # noqa: E402
from gem3d.models.autoencoder import FirstStage  # noqa: E402
from gem3d.models.unet import is_volumetric_parameter_name  # noqa: E402

CONFIGS = ROOT / "configs" / "latent-diffusion"
COMMON = [
    "data.params.preprocess.size=32",
    "lightning.trainer.enable_progress_bar=false",
    "lightning.trainer.limit_val_batches=1",
    "lightning.modelcheckpoint.params.every_n_train_steps=2",
]


def write_tiny_dataset(root: Path, cases: int = 3, shape=(24, 24, 10), seed: int = 0) -> Path:
    """An nnU-Net raw dataset of smooth random 'brains' with a labelled blob (labels 0..3)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    for i in range(cases):
        radius = np.sqrt(zz**2 + yy**2 + (xx * 1.3) ** 2)
        body = radius < 0.9
        image = (body * (100 + 50 * np.cos(3 * xx + i) + rng.normal(0, 5, shape))).astype(np.float32)
        label = np.zeros(shape, np.int16)
        label[(radius < 0.5) & body] = 1
        label[(radius < 0.35) & body] = 2 + (i % 2)
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"tiny_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return root


def only_run(logdir: Path) -> Path:
    runs = sorted(p for p in logdir.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def load_ckpt(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


class SignalSender(L.Callback):
    """Sends SIGUSR1 / SIGTERM to this process after given global steps (test helper)."""

    def __init__(self, usr1_at: int = 1, term_at: int = 3):
        self.usr1_at, self.term_at = usr1_at, term_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.usr1_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        if trainer.global_step == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "Dataset999_Tiny")


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory, dataset) -> Path:
    logdir = tmp_path_factory.mktemp("logs_ae")
    trainer = main_module.run([
        "--base", str(CONFIGS / "demo_autoencoder.yaml"), "-t", "-l", str(logdir),
        f"data.params.dataset_dir={dataset}", "data.params.batch_size=4", "data.params.samples_per_epoch=8",
        "lightning.trainer.max_steps=2", *COMMON,
    ])
    assert trainer.global_step == 2
    return only_run(logdir)


def stage_args(config: str, dataset: Path, ae_run: Path, logdir: Path, *extra: str) -> list[str]:
    return [
        "--base", str(CONFIGS / config), "-t", "-l", str(logdir),
        f"data.params.dataset_dir={dataset}", "data.params.clip_len=4", "data.params.batch_size=1",
        "data.params.samples_per_epoch=2", f"model.params.first_stage_config.params.ckpt_path={ae_run}",
        "model.params.sample_steps_for_logging=2", *COMMON, *extra,
    ]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, dataset, autoencoder_run) -> tuple[Path, L.Trainer]:
    logdir = tmp_path_factory.mktemp("logs_s1")
    trainer = main_module.run(stage_args("demo_stage1.yaml", dataset, autoencoder_run, logdir,
                                         "lightning.trainer.max_steps=3", "model.params.log_images_every_n_steps=2"))
    return only_run(logdir), trainer


# ---------------------------------------------------------------------------------------------- runs


def test_autoencoder_run_is_a_first_stage(autoencoder_run):
    first_stage = FirstStage.from_run(str(autoencoder_run))
    ckpt = load_ckpt(autoencoder_run)
    assert first_stage.scale_factor == pytest.approx(1.0 / float(ckpt["state_dict"]["latent_std"]))
    assert first_stage.downsample_factor == 4 and first_stage.frozen


def test_stage1_writes_run_folder_and_logs(stage1_run):
    run_dir, trainer = stage1_run
    assert trainer.global_step == 3
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"last.ckpt", "step-000002.ckpt"}
    stamp = run_dir.name.split("_")[0]
    assert (run_dir / "configs" / f"{stamp}-project.yaml").is_file()
    assert (run_dir / "configs" / f"{stamp}-lightning.yaml").is_file()
    assert run_dir.name.endswith("_demo_stage1")
    assert glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))
    ckpt = load_ckpt(run_dir)
    assert ckpt["global_step"] == 3 and int(ckpt["state_dict"]["ema.num_updates"]) == 3
    assert {"val/loss", "val/loss_ema", "train/loss"} <= set(trainer.callback_metrics)
    from omegaconf import OmegaConf

    lightning_cfg = OmegaConf.load(run_dir / "configs" / f"{stamp}-lightning.yaml")
    assert lightning_cfg.lightning.trainer.max_steps == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"images/real", "images/mask", "images/informed", "images/sample"} <= set(events.Tags()["images"])
    loaded = load_model_dir(run_dir)  # what inference does; EMA weights by default (sample_with_ema)
    model = loaded.model
    assert loaded.ema and model.variant == "slice_stage" and not model.training
    mask = model.encode_mask(torch.zeros(1, 4, 1, 32, 32) - 1)
    informed = model.first_stage.encode(torch.zeros(1, 1, 32, 32))
    cond = model.condition(mask, informed)
    eps = model.model_fn(cond)(torch.randn(1, 4, 4, 8, 8), torch.tensor([500]))
    assert eps.shape == (1, 4, 4, 8, 8) and torch.isfinite(eps).all()


def test_resume_continues_step_optimizer_and_ema(stage1_run):
    run_dir, _ = stage1_run
    before = load_ckpt(run_dir)
    trainer = main_module.run(["-r", str(run_dir), "-t", "lightning.trainer.max_steps=5"])
    assert trainer.global_step == 5
    ckpt = load_ckpt(run_dir)
    assert ckpt["global_step"] == 5
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 5  # EMA restored, then 2 more updates
    assert int(ckpt["optimizer_states"][0]["state"][0]["step"]) == 5  # AdamW restored
    assert int(before["optimizer_states"][0]["state"][0]["step"]) == 3
    assert len(list((run_dir / "configs").glob("*-project.yaml"))) == 2  # the resumed run adds its config
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        main_module.run(["-r", str(run_dir / "configs"), "-t"])


def test_stage2_from_stage1_trains_only_volumetric(tmp_path, dataset, autoencoder_run, stage1_run):
    run_dir, _ = stage1_run
    stage1 = load_ckpt(run_dir)["state_dict"]
    trainer = main_module.run(stage_args("demo_stage2.yaml", dataset, autoencoder_run, tmp_path,
                                         f"model.params.ckpt_path={run_dir}", "lightning.trainer.max_steps=2"))
    assert trainer.global_step == 2
    stage2 = load_ckpt(only_run(tmp_path))["state_dict"]
    model = trainer.lightning_module
    volumetric = {n for n, _ in model.unet.named_parameters() if is_volumetric_parameter_name(n)}
    assert volumetric and not any(k.startswith("ema.") for k in stage2)
    for name in (k[len("unet."):] for k in stage2 if k.startswith("unet.")):
        if name in volumetric:
            continue
        torch.testing.assert_close(stage2["unet." + name], stage1["unet." + name])
    identity = model.unet.__class__(**asdict(model.unet.config)).state_dict()
    changed = [n for n in volumetric if not torch.equal(stage2["unet." + n], identity[n])]
    assert len(changed) == len(volumetric)


def test_two_process_cpu_ddp(tmp_path, dataset, autoencoder_run):
    args = stage_args("demo_stage1.yaml", dataset, autoencoder_run, tmp_path, "lightning.trainer.max_steps=2",
                      "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
                      "model.params.log_images_every_n_steps=0")
    env = child_env()
    env.pop("GEM3D_RUN_LOGDIR", None)
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 (num_gpus)" in proc.stdout and "distributed_backend=gloo" in proc.stdout + proc.stderr
    run_dir = only_run(tmp_path)  # the child process used rank 0's folder
    assert load_ckpt(run_dir)["global_step"] == 2


def test_sigusr1_saves_and_sigterm_stops_cleanly(tmp_path, dataset, autoencoder_run, capsys):
    args = stage_args("demo_base_stage1.yaml", dataset, autoencoder_run, tmp_path, "lightning.trainer.max_steps=50",
                      "model.params.log_images_every_n_steps=0", "data.params.samples_per_epoch=100",
                      "lightning.callbacks.sender.target=test_main.SignalSender",
                      "lightning.callbacks.sender.params.usr1_at=1", "lightning.callbacks.sender.params.term_at=3",
                      "--allow-any-target")  # the test callback lives outside the allowed packages
    assert main_module.main(args) == 0
    out = capsys.readouterr().out
    usr1 = [line for line in out.splitlines() if line.startswith("[SIGUSR1] saved")]
    assert len(usr1) == 1 and usr1[0].endswith(("at global step 1", "at global step 2")), out  # at the next batch end
    assert "[SIGTERM] saved" in out and "at global step 3" in out
    ckpt = load_ckpt(only_run(tmp_path))
    assert ckpt["global_step"] == 3


def test_the_floor_of_steps_trains_past_the_minutes(tmp_path, dataset, autoencoder_run, capsys):
    """The demo configs' ``min_steps``: a machine too slow for the floor within ``max_time`` trains on to it."""
    args = stage_args("demo_base_stage1.yaml", dataset, autoencoder_run, tmp_path, "lightning.trainer.max_time={microseconds: 1}",
                      "lightning.trainer.min_steps=3", "lightning.trainer.max_steps=6",
                      "model.params.log_images_every_n_steps=0", "data.params.samples_per_epoch=2")
    # (epochs of 2 steps: with min_steps Lightning also waits for one whole epoch)
    trainer = main_module.run(args)
    assert trainer.global_step == 3 and load_ckpt(only_run(tmp_path))["global_step"] == 3


# ---------------------------------------------------------------------------------------------- start-up errors


@pytest.mark.parametrize("config, override, error, message", [
    ("demo_stage2.yaml", "model.params.ckpt_path=path-to-stage1-ckpt", ValueError,
     r"model\.params\.ckpt_path='path-to-stage1-ckpt' is a placeholder"),
    ("demo_stage2.yaml", "model.params.ckpt_path=/no/such/stage1.ckpt", FileNotFoundError,
     r"model\.params\.ckpt_path='/no/such/stage1.ckpt': no such file"),
    ("demo_stage1.yaml", "model.params.first_stage_config.params.ckpt_path=/nowhere/*ae", FileNotFoundError,
     r"model\.params\.first_stage_config\.params\.ckpt_path='/nowhere/\*ae': no file or folder matches"),
])
def test_bad_checkpoint_paths_fail_at_startup(tmp_path, dataset, autoencoder_run, config, override, error, message):
    args = stage_args(config, dataset, autoencoder_run, tmp_path, override)
    with pytest.raises(error, match=message):
        main_module.run(args)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("base, override, message", [
    ("/no/such/config.yaml", "a.b=1", "--base config '/no/such/config.yaml': no such file"),
    ("demo_stage1", "model.params.first_stage_config.params.ckpt_path=/nowhere/*ae",
     "model.params.first_stage_config.params.ckpt_path='/nowhere/*ae': no file or folder matches this pattern"),
    ("brain_stage2", "model.params.first_stage_config.params.ckpt_path=null",
     "model.params.ckpt_path='path-to-stage1-ckpt' is a placeholder"),
    ("demo_autoencoder", "data.target=os.system",
     "config target 'os.system' in the config is not allowed ('os' is not an allowed package)"),
    ("demo_autoencoder", "lightning.callbacks.x.target=gem3d.config.os.system",
     "config target 'gem3d.config.os.system' is not allowed (it resolves through the module 'os')"),
])
def test_startup_errors_are_one_line_with_exit_status_2(tmp_path, capsys, base, override, message):
    base = base if base.startswith("/") else str(CONFIGS / f"{base}.yaml")
    argv = ["--base", base, "-t", "-l", str(tmp_path / "logs"), "data.params.dataset_dir=/tmp", override]
    assert main_module.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    # the hint that lifts the target check comes with the target errors, and only with them
    assert ("--allow-any-target" in err) == ("target" in message), err
    assert not (tmp_path / "logs").exists()  # nothing written
    with pytest.raises((ValueError, KeyError, FileNotFoundError)):  # --debug: the exception and its traceback
        main_module.main([*argv, "--debug"])


def test_startup_error_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--base", "/no/such.yaml", "-t", "-l", str(tmp_path)],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: --base config '/no/such.yaml': no such file\n"


def test_paper_stage2_placeholder_names_key(tmp_path, dataset):
    with pytest.raises(ValueError, match=r"model\.params\.ckpt_path='path-to-stage1-ckpt'"):
        main_module.run(["--base", str(CONFIGS / "brain_stage2.yaml"), "-t", "-l", str(tmp_path),
                         f"data.params.dataset_dir={dataset}",
                         "model.params.first_stage_config.params.ckpt_path=null",
                         "model.params.first_stage_config.params.config_path=null"])


def test_missing_dataset_and_unknown_keys(tmp_path, autoencoder_run):
    with pytest.raises(FileNotFoundError, match=r"data\.params\.dataset_dir='/no/data': no such directory"):
        main_module.run(["--base", str(CONFIGS / "demo_stage1.yaml"), "-t", "-l", str(tmp_path), "data.params.dataset_dir=/no/data",
                         f"model.params.first_stage_config.params.ckpt_path={autoencoder_run}"])
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  max_steps: 3\n")
    # reported with the other problems of that config (the demo's missing dataset and autoencoder run)
    with pytest.raises(ValueError, match=r"\(1\) unknown top-level config key\(s\) \['trainer'\]; allowed: "
                                         r"\['model', 'data', 'lightning'\]; \(2\)"):
        main_module.run(["--base", str(CONFIGS / "demo_stage1.yaml"), str(extra), "-t"])
    with pytest.raises(ValueError, match=r"\(1\) unknown 'lightning' config key\(s\) \['logger'\]"):
        main_module.run(["--base", str(CONFIGS / "demo_stage1.yaml"), "-t", "lightning.logger.x=1"])
    with pytest.raises(ValueError, match=r"unrecognised arguments \['--bogus'\]"):
        main_module.run(["--base", str(CONFIGS / "demo_stage1.yaml"), "--bogus"])
    with pytest.raises(ValueError, match=r"data\.params\.kind='clip'"):
        main_module.run(["--base", str(CONFIGS / "demo_slice.yaml"), "-l", str(tmp_path), "data.params.kind=clip",
                         "data.params.dataset_dir=/tmp", f"model.params.first_stage_config.params.ckpt_path={autoencoder_run}"])


def test_instantiate_from_config_names_bad_target():
    from gem3d.config import instantiate_from_config

    with pytest.raises(ImportError, match=r"config target 'gem3d\.models\.unet\.NoSuchUNet'"):
        instantiate_from_config({"target": "gem3d.models.unet.NoSuchUNet"})
    with pytest.raises(ImportError, match=r"config target 'gem3d\.missing_module\.Thing'"):
        instantiate_from_config({"target": "gem3d.missing_module.Thing"})
    with pytest.raises(ValueError, match=r"unknown key 'bogus' in params of target 'gem3d\.ema\.EMA'; allowed"):
        instantiate_from_config({"target": "gem3d.ema.EMA", "params": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"did you mean 'decay'"):
        instantiate_from_config({"target": "gem3d.ema.EMA", "params": {"decai": 0.9}})
    with pytest.raises(KeyError, match=r"unknown keys \['param'\]"):
        instantiate_from_config({"target": "gem3d.ema.EMA", "param": {}})
    fs = instantiate_from_config({"target": "gem3d.models.autoencoder.FirstStage.from_diffusers_config",
                                  "params": {"block_out_channels": [32], "in_channels": 1, "out_channels": 1}})
    assert fs.downsample_factor == 1


def test_flags_gpus_and_trainer_passthrough():
    parser = main_module.get_parser()
    opt, rest = parser.parse_known_args(main_module._normalise_train_flag(["-t", "a.b=1", "--gpus", "0,1,"]))
    assert opt.train is True and rest == ["a.b=1"] and main_module.parse_gpus(opt.gpus) == [0, 1]
    opt, _ = parser.parse_known_args(main_module._normalise_train_flag(["-t", "false"]))
    assert opt.train is False
    from omegaconf import OmegaConf

    config = OmegaConf.create({"lightning": {"trainer": {"max_steps": 7, "precision": "bf16-mixed"}}})
    kwargs = main_module.build_trainer_kwargs(config, opt)
    assert kwargs == {"max_steps": 7, "precision": "bf16-mixed", "accelerator": "cpu", "devices": 1}
    opt.gpus = "0,1,"
    kwargs = main_module.build_trainer_kwargs(config, opt)
    assert kwargs["accelerator"] == "gpu" and kwargs["devices"] == [0, 1] and kwargs["strategy"] == "ddp"
    with pytest.raises(ValueError, match="--gpus='a,b'"):
        main_module.parse_gpus("a,b")
