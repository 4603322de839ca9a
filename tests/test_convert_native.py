"""gem3d.convert and scripts/convert_gem3d_checkpoint.py: converted model dirs, the command line, and
latent-diffusion kl-f8 style first-stage checkpoints (``first_stage_config.params.ckpt_path``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from gem3d.configs import packaged
from gem3d.convert import convert_model_dir
from gem3d.model_dirs import detect_layout, load_model_dir, read_preprocess
from gem3d.model_dirs.original import KL_F8_DEFAULT, resolve_first_stage_ckpt

ROOT = Path(__file__).resolve().parents[1]
from tests._payload import UNPICKLE_CALLS, ArbitraryPayload  # noqa: E402


@pytest.fixture(scope="module")
def cli():
    """The command line behind scripts/convert_gem3d_checkpoint.py."""
    from gem3d import convert

    return convert


def _config(folder: Path) -> tuple[Path, dict]:
    path = sorted((folder / "configs").glob("*-project.yaml"))[-1]
    return path, yaml.safe_load(path.read_text())


def _state(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _has_ema(folder: Path) -> bool:
    return any(k.startswith("model_ema.") and not k.endswith(("decay", "num_updates")) for k in _state(folder))


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "checkpoints" / "last.ckpt").is_file())


@pytest.fixture(scope="module")
def ema_folder(original_fixtures) -> Path:
    found = [p for p in _folders(original_fixtures) if _has_ema(p)]
    assert found, f"no fixture folder with EMA weights under {original_fixtures}"
    return found[0]


@pytest.fixture(scope="module")
def raw_only_folder(original_fixtures) -> Path:
    found = [p for p in _folders(original_fixtures) if not _has_ema(p)]
    assert found, f"no fixture folder without EMA weights under {original_fixtures}"
    return found[0]


@pytest.fixture(scope="module")
def autoencoder_folder(original_fixtures) -> Path:
    """A folder whose vectors test the first stage (image -> latent_mean_scaled)."""
    for folder in _folders(original_fixtures):
        if (folder / "vectors.pt").is_file() and "latent_mean_scaled" in torch.load(folder / "vectors.pt", weights_only=True):
            return folder
    raise AssertionError(f"no fixture folder with autoencoder vectors under {original_fixtures}")


def _copy_folder(folder: Path, dst: Path, *, state_edit=None, config_edit=None, extra: dict | None = None) -> Path:
    """A copy of an original model folder with its checkpoint / config edited."""
    (dst / "checkpoints").mkdir(parents=True)
    (dst / "configs").mkdir()
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    if state_edit is not None:
        ckpt["state_dict"] = state_edit(dict(ckpt["state_dict"]))
    ckpt.update(extra or {})
    torch.save(ckpt, dst / "checkpoints" / "last.ckpt")
    config_path, config = _config(folder)
    if config_edit is not None:
        config_edit(config)
    (dst / "configs" / config_path.name).write_text(yaml.safe_dump(config))
    return dst


# ---------------------------------------------------------------------------------------------- the command line
def test_cli_converts_and_the_result_loads_natively(cli, ema_folder, tmp_path, capsys):
    dst = tmp_path / "brain"
    assert cli.main([str(ema_folder), str(dst), "--preprocess-from", str(packaged("inference", "brain.yaml"))]) == 0
    assert "raw weights" in capsys.readouterr().out
    config = OmegaConf.to_container(OmegaConf.load(dst / "configs" / "model.yaml"))
    assert config["model"]["target"] == "gem3d.denoiser.Denoiser"
    assert config["source"]["kind"] == "original" and config["source"]["ema"] is False
    brain = OmegaConf.to_container(OmegaConf.load(packaged("inference", "brain.yaml")))
    assert config["data"]["params"]["preprocess"] == brain["fallback_preprocess"]
    # nothing in the config refers to a file: the weights file holds every tensor
    assert "ckpt_path" not in config["model"]["params"]["first_stage_config"]["params"]
    assert "ckpt_path" not in config["model"]["params"]
    raw_unet = {k[len("model.diffusion_model."):]: v for k, v in _state(ema_folder).items() if k.startswith("model.diffusion_model.")}
    weights = load_file(str(dst / "weights.safetensors"))
    for key, value in raw_unet.items():
        assert torch.equal(weights["unet." + key], value), key
    loaded = load_model_dir(dst)
    assert loaded.preprocess == brain["fallback_preprocess"] and loaded.ema is False and loaded.kind == "converted"
    assert detect_layout(dst) == "converted"


def test_cli_ema_stores_the_ema_weights(cli, ema_folder, tmp_path, capsys):
    dst = tmp_path / "ema"
    assert cli.main([str(ema_folder), str(dst), "--ema"]) == 0
    assert "EMA weights" in capsys.readouterr().out
    state = _state(ema_folder)
    weights = load_file(str(dst / "weights.safetensors"))
    unet = {k[len("unet."):]: v for k, v in weights.items() if k.startswith("unet.")}
    assert unet and all(torch.equal(v, state["model_ema." + ("diffusion_model." + k).replace(".", "")]) for k, v in unet.items())
    assert any(not torch.equal(v, state["model.diffusion_model." + k]) for k, v in unet.items())
    assert load_model_dir(dst).ema is True
    with pytest.raises(ValueError, match="converted with EMA weights"):
        load_model_dir(dst, ema=False)


def test_cli_ema_without_ema_weights_fails(cli, raw_only_folder, tmp_path, capsys):
    assert cli.main([str(raw_only_folder), str(tmp_path / "out"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no EMA weights" in err and "without --ema" in err
    assert not (tmp_path / "out" / "weights.safetensors").exists()


def _missing(folder: Path) -> Path:
    return folder / "missing"


def _empty(folder: Path) -> Path:
    return folder


def _config_only(folder: Path) -> Path:
    (folder / "configs").mkdir()
    (folder / "configs" / "x-project.yaml").write_text("model: {}\n")
    return folder


def _a_file(folder: Path) -> Path:
    (folder / "file.ckpt").write_bytes(b"x")
    return folder / "file.ckpt"


@pytest.mark.parametrize("make_source, message", [
    (_missing, "does not exist"),
    (_empty, "missing ['checkpoints/last.ckpt', 'configs/*-project.yaml']"),
    (_config_only, "missing ['checkpoints/last.ckpt']"),
    (_a_file, "is a file, not a model folder"),
])
def test_cli_bad_source_exits_2(cli, tmp_path, capsys, make_source, message):
    src = tmp_path / "src"
    src.mkdir()
    src = make_source(src)
    assert cli.main([str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and str(src) in err


def test_cli_invalid_original_config_exits_2(cli, raw_only_folder, tmp_path, capsys):
    src = _copy_folder(raw_only_folder, tmp_path / "src",
                       config_edit=lambda c: c["model"]["params"]["unet_config"]["params"].update(use_scale_shift_norm=True))
    assert cli.main([str(src), str(tmp_path / "dst")]) == 2
    assert "use_scale_shift_norm=True is not supported" in capsys.readouterr().err


def test_cli_refuses_non_allowlisted_objects_unless_trusted(cli, raw_only_folder, tmp_path, capsys):
    src = _copy_folder(raw_only_folder, tmp_path / "src", extra={"callbacks": {"payload": ArbitraryPayload()}})
    UNPICKLE_CALLS.clear()
    assert cli.main([str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "--trust-checkpoint" in err and "record_unpickle" in err
    assert UNPICKLE_CALLS == [] and not (tmp_path / "dst").exists()
    with pytest.warns(UserWarning, match="trust=True"):
        assert cli.main([str(src), str(tmp_path / "dst"), "--trust-checkpoint"]) == 0
    assert UNPICKLE_CALLS == ["ran"]
    assert load_model_dir(tmp_path / "dst").kind == "converted"


def test_cli_overwrite_and_destination_checks(cli, raw_only_folder, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert cli.main([str(raw_only_folder), str(dst)]) == 0
    before = (dst / "weights.safetensors").stat().st_mtime_ns
    assert cli.main([str(raw_only_folder), str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (dst / "weights.safetensors").stat().st_mtime_ns == before
    assert cli.main([str(raw_only_folder), str(dst), "--overwrite"]) == 0
    # a converted dir converts again to the same weights; the source itself is never a destination
    again = tmp_path / "again"
    assert cli.main([str(dst), str(again)]) == 0
    first, second = load_file(str(dst / "weights.safetensors")), load_file(str(again / "weights.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert cli.main([str(dst), str(dst), "--overwrite"]) == 2
    assert "is the source folder" in capsys.readouterr().err
    assert cli.main([str(raw_only_folder), str(raw_only_folder)]) == 2


def test_read_preprocess_accepts_both_layouts(tmp_path):
    inference = read_preprocess(packaged("inference", "brain.yaml"))
    training = read_preprocess(ROOT / "configs" / "latent-diffusion" / "brain_stage1.yaml")
    assert inference["max_label"] == 3 and training["max_label"] == 3
    (tmp_path / "none.yaml").write_text("model: {}\n")
    with pytest.raises(KeyError, match="no 'preprocess'"):
        read_preprocess(tmp_path / "none.yaml")


# ---------------------------------------------------------------------------------------------- kl-f8 checkpoints
def _ldm_autoencoder_ckpt(folder: Path, path: Path, extra: dict | None = None) -> dict:
    """A latent-diffusion ``kl-f8/model.ckpt``-style file from a folder's first-stage weights (plus the ``loss.*``
    tensors the released file carries)."""
    weights = {k[len("first_stage_model."):]: v for k, v in _state(folder).items() if k.startswith("first_stage_model.")}
    state = {**weights, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "global_step": 0, "epoch": 0, **(extra or {})}, path)
    return weights


def _without_first_stage(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("first_stage_model.", "cond_stage_model."))}


def _set_ckpt_path(value):
    def edit(config):
        config["model"]["params"]["first_stage_config"]["params"]["ckpt_path"] = value
    return edit


@pytest.mark.parametrize("where", ["relative_to_model_dir", "absolute"])
def test_first_stage_from_kl_f8_style_checkpoint_offline(autoencoder_folder, tmp_path, where):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    folder = tmp_path / "model"
    ckpt = folder / KL_F8_DEFAULT if where == "relative_to_model_dir" else tmp_path / "elsewhere" / "model.ckpt"
    weights = _ldm_autoencoder_ckpt(autoencoder_folder, ckpt)
    _copy_folder(autoencoder_folder, folder, state_edit=_without_first_stage,
                 config_edit=_set_ckpt_path(KL_F8_DEFAULT if where == "relative_to_model_dir" else str(ckpt)))
    first_stage = load_model_dir(folder).model.first_stage
    ours = first_stage.to_ldm_state_dict()
    assert ours.keys() <= weights.keys()
    assert all(torch.equal(v, weights[k].reshape(v.shape)) for k, v in ours.items())
    vectors = torch.load(autoencoder_folder / "vectors.pt", weights_only=True)
    with torch.no_grad():
        latent = first_stage.encode(vectors["image"])
    assert float((latent - vectors["latent_mean_scaled"]).abs().max()) < 1e-4


def test_missing_kl_f8_checkpoint_is_named(autoencoder_folder, tmp_path):
    folder = _copy_folder(autoencoder_folder, tmp_path / "model", state_edit=_without_first_stage,
                          config_edit=_set_ckpt_path(KL_F8_DEFAULT))
    with pytest.raises(FileNotFoundError, match=r"first_stage_config\.params\.ckpt_path=.*kl-f8/model\.ckpt.*not found"):
        load_model_dir(folder)
    with pytest.raises(FileNotFoundError, match="tried"):
        resolve_first_stage_ckpt(KL_F8_DEFAULT, tmp_path)


def test_kl_f8_checkpoint_with_arbitrary_object_needs_trust(autoencoder_folder, tmp_path):
    ckpt = tmp_path / "kl-f8" / "model.ckpt"
    _ldm_autoencoder_ckpt(autoencoder_folder, ckpt, extra={"callbacks": ArbitraryPayload()})
    folder = _copy_folder(autoencoder_folder, tmp_path / "model", state_edit=_without_first_stage,
                          config_edit=_set_ckpt_path(str(ckpt)))
    UNPICKLE_CALLS.clear()
    with pytest.raises(pickle.UnpicklingError, match="--trust-checkpoint") as info:
        load_model_dir(folder)
    assert "record_unpickle" in str(info.value) and UNPICKLE_CALLS == []
    with pytest.warns(UserWarning, match="trust=True"):
        model = load_model_dir(folder, trust=True).model
    assert UNPICKLE_CALLS == ["ran"]
    vectors = torch.load(autoencoder_folder / "vectors.pt", weights_only=True)
    with torch.no_grad():
        assert float((model.first_stage.encode(vectors["image"]) - vectors["latent_mean_scaled"]).abs().max()) < 1e-4


def test_checkpoint_without_any_first_stage_is_explained(autoencoder_folder, tmp_path):
    def drop_ckpt_path(config):
        config["model"]["params"]["first_stage_config"]["params"].pop("ckpt_path", None)

    folder = _copy_folder(autoencoder_folder, tmp_path / "model", state_edit=_without_first_stage, config_edit=drop_ckpt_path)
    with pytest.warns(UserWarning, match="no first-stage weights"), pytest.raises(FileNotFoundError, match="kl-f8 model.ckpt"):
        load_model_dir(folder)


def test_converted_config_rebuilds_the_original_first_stage(autoencoder_folder, tmp_path):
    dst = convert_model_dir(autoencoder_folder, tmp_path / "conv")
    params = OmegaConf.to_container(OmegaConf.load(dst / "configs" / "model.yaml"))["model"]["params"]
    scale = _config(autoencoder_folder)[1]["model"]["params"]["scale_factor"]
    assert params["first_stage_config"]["params"]["scale_factor"] == pytest.approx(scale)
    # the original conditions on scale_factor * posterior, as gem3d encodes: nothing to rescale
    assert params.get("condition_latent_factor", 1.0) == 1.0
    with pytest.raises(ValueError, match="converted with raw weights"):
        load_model_dir(dst, ema=True)
