"""Config ``target:`` allowlist: foreign code named by a config (training config, model folder, original folder)
is refused before it is imported, naming the target and ``--allow-any-target``; checkpoints stay weights-only."""
from __future__ import annotations

import sys

import pytest
import torch
import yaml

from _tiny_models import build_dataset, build_model_dir
from gem3d.config import (
    ALLOW_ANY_TARGET_ENV,
    TargetNotAllowedError,
    allow_any_target,
    get_obj_from_str,
    instantiate_from_config,
)
from gem3d.convert import convert_model_dir
from gem3d.inference import cli
from gem3d.model_dirs import load_model_dir

PROBE = "gem3d_test_probe"  # a module written by the test: importing it or calling it leaves a marker file
PROBE_SOURCE = """
from pathlib import Path
Path({imported!r}).touch()

def make_unet(**params):
    Path({called!r}).touch()
    from gem3d.models.unet import UNetModel
    return UNetModel(**params)
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """``gem3d_test_probe.make_unet`` importable, with the marker files it would write."""
    markers = {"imported": tmp_path / "imported", "called": tmp_path / "called"}
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / f"{PROBE}.py").write_text(PROBE_SOURCE.format(**{k: str(v) for k, v in markers.items()}))
    monkeypatch.syspath_prepend(str(tmp_path / "probe"))
    monkeypatch.delitem(sys.modules, PROBE, raising=False)
    monkeypatch.delenv(ALLOW_ANY_TARGET_ENV, raising=False)
    return markers


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    return convert_model_dir(build_model_dir(root / "run", "volume_stage"), root / "converted")


def with_unet_target(converted, folder, target: str):
    """A copy of the converted folder whose configs/model.yaml names ``target`` for the UNet."""
    (folder / "configs").mkdir(parents=True)
    (folder / "weights.safetensors").symlink_to(converted / "weights.safetensors")
    config = yaml.safe_load((converted / "configs" / "model.yaml").read_text())
    config["model"]["params"]["unet_config"]["target"] = target
    (folder / "configs" / "model.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.parametrize("target, why", [
    ("os.system", "'os' is not an allowed package"),
    ("subprocess.run", "'subprocess' is not an allowed package"),
    ("builtins.eval", "'builtins' is not an allowed package"),
    ("gem3d.config.os.system", "through the module 'os'"),
    ("gem3d.config.importlib.import_module", "through the module 'importlib'"),
    ("gem3d.config.Path", "resolves to pathlib.Path"),
    ("torch.hub.load", "torch.hub loads or runs code"),
    ("torch.load", "torch.load loads or runs code"),
    ("diffusers.AutoencoderKL.from_pretrained", "from_pretrained loads or runs code"),
    ("torch.nn.Module.__init__", "private names"),
])
def test_foreign_targets_are_refused_naming_the_flag(target, why, monkeypatch):
    monkeypatch.delenv(ALLOW_ANY_TARGET_ENV, raising=False)
    with pytest.raises(TargetNotAllowedError) as info:
        instantiate_from_config({"target": target, "params": {}})
    message = str(info.value)
    assert repr(target) in message and why in message and "--allow-any-target" in message


def test_allowed_targets_still_load():
    for target in ("gem3d.models.unet.UNetModel", "gem3d.models.autoencoder.FirstStage.from_ldm_checkpoint",
                   "torch.nn.Identity", "torch.optim.Adam", "diffusers.AutoencoderKL",
                   "lightning.pytorch.callbacks.ModelCheckpoint", "gem3d.models.autoencoder.FirstStage.from_run"):
        assert callable(get_obj_from_str(target)), target
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)


def test_nested_targets_and_trust_are_checked_before_anything_runs(probe):
    with pytest.raises(TargetNotAllowedError, match=PROBE):
        instantiate_from_config({"target": "gem3d.ema.EMA", "params": {"inner": {"target": f"{PROBE}.make_unet"}}})
    with pytest.raises(TargetNotAllowedError, match=r"params\.trust=True.*--trust-checkpoint"):
        instantiate_from_config({"target": "gem3d.models.autoencoder.FirstStage.from_ldm_checkpoint",
                                 "params": {"ckpt_path": "x.ckpt", "trust": True}})
    assert not probe["imported"].exists() and PROBE not in sys.modules


def test_model_folder_naming_foreign_code_fails_before_importing_it(converted, probe, tmp_path):
    folder = with_unet_target(converted, tmp_path / "evil", f"{PROBE}.make_unet")
    with pytest.raises(TargetNotAllowedError, match=rf"'{PROBE}\.make_unet'.*--allow-any-target"):
        load_model_dir(folder)
    assert not probe["imported"].exists() and not probe["called"].exists() and PROBE not in sys.modules
    # the flag lets it through: the foreign factory is imported and called, and the model loads
    with allow_any_target():
        model = load_model_dir(folder).model
    assert probe["imported"].exists() and probe["called"].exists()
    assert torch.equal(model.unet.state_dict()["out.2.weight"], load_model_dir(converted).model.unet.state_dict()["out.2.weight"])


def test_inference_cli_refuses_a_shell_target_in_one_line(converted, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "shell-ran"
    folder = with_unet_target(converted, tmp_path / "evil", "gem3d.models.unet.UNetModel")
    config_path = folder / "configs" / "model.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"]["params"]["first_stage_config"] = {"target": "subprocess.run",
                                                       "params": {"args": ["touch", str(marker)]}}
    config_path.write_text(yaml.safe_dump(config))
    monkeypatch.delenv(ALLOW_ANY_TARGET_ENV, raising=False)
    data, _ = build_dataset(tmp_path / "data", cases=2, slices=8)
    code = cli.main("demo", "test", ["--data", str(data), "--model", str(folder), "--out", str(tmp_path / "out"),
                                     "--no-progress", "--cases", "all"])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists() and not (tmp_path / "out" / "test" / "manifest.json").exists()
    assert err.count("\n") == 1 and err.startswith("error: config target 'subprocess.run'") and "--allow-any-target" in err
    assert "Traceback" not in err
    # the allowlist is what stops it: with the flag the command runs (then the "first stage" is no model)
    try:
        code = cli.main("demo", "test", ["--data", str(data), "--model", str(folder), "--out", str(tmp_path / "out"),
                                         "--no-progress", "--cases", "all", "--allow-any-target"])
    except Exception:  # noqa: BLE001  (whatever the broken model raises)
        code = None
    assert marker.exists() and code != 0


def test_original_folder_with_a_foreign_target_is_refused(original_fixtures, tmp_path):
    from gem3d.model_dirs.original import read_original_model_dir

    src = original_fixtures / "stage1"
    (tmp_path / "src" / "checkpoints").mkdir(parents=True)
    (tmp_path / "src" / "configs").mkdir()
    (tmp_path / "src" / "checkpoints" / "last.ckpt").symlink_to(src / "checkpoints" / "last.ckpt")
    (config_path,) = (src / "configs").glob("*-project.yaml")
    config = yaml.safe_load(config_path.read_text())
    config["model"]["params"]["first_stage_config"]["params"]["lossconfig"]["target"] = "os.system"
    (tmp_path / "src" / "configs" / config_path.name).write_text(yaml.safe_dump(config))
    with pytest.raises(TargetNotAllowedError, match=r"'os\.system' in .*project\.yaml.*--allow-any-target"):
        read_original_model_dir(tmp_path / "src")
    with allow_any_target():  # gem3d never imports the original's targets: the flag only lets the folder be read
        assert read_original_model_dir(tmp_path / "src").first_stage_state_dict
