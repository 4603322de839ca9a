"""gem3d.model_dirs.original: reading original GEM-3D model folders, EMA mapping, safe checkpoint loading."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from gem3d.checkpoint import UnsafeCheckpointError, safe_load_checkpoint
from gem3d.denoiser import VARIANTS
from gem3d.model_dirs.original import ema_key, is_original_model_dir, original_variant, read_original_model_dir
from gem3d.models.unet import UNetModel

from tests._payload import UNPICKLE_CALLS, ArbitraryPayload, record_unpickle  # noqa: E402


def model_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and is_original_model_dir(p))
    assert dirs, f"no original model folders under {root}"
    return dirs


def load_config(folder: Path) -> dict:
    (config_path,) = (folder / "configs").glob("*-project.yaml")
    return yaml.safe_load(config_path.read_text())


def copy_with_config(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of a model folder (checkpoint linked) whose config went through ``edit(config_dict)``."""
    target = tmp_path / folder.name
    (target / "checkpoints").mkdir(parents=True)
    (target / "configs").mkdir()
    (target / "checkpoints" / "last.ckpt").symlink_to(folder / "checkpoints" / "last.ckpt")
    config = load_config(folder)
    edit(config)
    (target / "configs" / f"{folder.name}-project.yaml").write_text(yaml.safe_dump(config))
    return target


# ----------------------------------------------------------------------------------------------------------------
# folders


def test_every_folder_is_read_from_its_own_config(original_fixtures):
    for folder in model_dirs(original_fixtures):
        config = load_config(folder)["model"]
        params = config["params"]
        unet_cfg = params["unet_config"]
        original = read_original_model_dir(folder)
        kwargs = original.denoiser_kwargs
        spec = VARIANTS[kwargs["variant"]]
        first_stage = kwargs["first_stage_config"]["params"]
        vectors = torch.load(folder / "vectors.pt", weights_only=True)
        name = folder.name

        for key in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "num_head_channels",
                    "use_spatial_transformer", "transformer_depth"):
            assert original.unet_params[key] == unet_cfg["params"][key], (name, key)
        assert original.unet_params["channel_mult"] == list(unet_cfg["params"]["channel_mult"]), name
        assert spec.volumetric == original.unet_params["volumetric"] == ("pseudo3D" in unet_cfg["target"]), name
        assert spec.volumetric == any("_tem" in k for k in original.unet_state_dict), name
        assert spec.conditioning == params["conditioning_key"]
        assert spec.volumetric == bool(params.get("fix_t", False)), name
        assert (kwargs["beta_start"], kwargs["beta_end"], kwargs["num_train_timesteps"]) == (
            params["linear_start"], params["linear_end"], params["timesteps"]), name
        assert first_stage["scale_factor"] == params["scale_factor"], name
        assert original.has_ema == bool(params["use_ema"]), name

        if spec.conditioning == "concat":
            assert vectors["cond"].shape[1] == vectors["x"].shape[1] * (1 + spec.use_informed), name
            assert spec.use_informed == (unet_cfg["params"]["in_channels"] == 12), name
            assert kwargs["position_embed_dim"] is None
        else:
            assert not spec.use_informed and unet_cfg["params"]["in_channels"] == vectors["x"].shape[1]
            assert kwargs["position_embed_dim"] == params["cond_stage_config"]["params"]["dim"] == vectors["cond"].shape[1]
            assert original.unet_params["context_dim"] == unet_cfg["params"]["context_dim"]

        first = params["first_stage_config"]["params"]
        assert first_stage["ddconfig"] == first["ddconfig"] and first_stage["embed_dim"] == first["embed_dim"]
        assert original.first_stage_state_dict and all(
            k.split(".")[0] in {"encoder", "decoder", "quant_conv", "post_quant_conv"} for k in original.first_stage_state_dict
        ), name
        if "scale_factor" in vectors:
            assert first_stage["scale_factor"] == pytest.approx(float(vectors["scale_factor"]))

        # The schedule buffers agree with the config's linear-in-sqrt schedule.
        betas = np.linspace(kwargs["beta_start"]**0.5, kwargs["beta_end"]**0.5, kwargs["num_train_timesteps"],
                            dtype=np.float64) ** 2
        np.testing.assert_allclose(original.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)


def test_expected_settings_of_the_four_fixtures(original_fixtures):
    """The recipe's four folders (README of the fixtures) map onto the four gem3d variants."""
    variants = {n: read_original_model_dir(original_fixtures / n).denoiser_kwargs["variant"]
                for n in ("stage1", "stage2", "base_stage2", "slice")}
    assert variants == {"stage1": "slice_stage", "stage2": "volume_stage", "base_stage2": "baseline_volume",
                        "slice": "position"}
    slice_ = read_original_model_dir(original_fixtures / "slice")
    slice_dim = load_config(original_fixtures / "slice")["model"]["params"]["cond_stage_config"]["params"]["dim"]
    assert (slice_.denoiser_kwargs["position_embed_dim"], slice_.unet_params["use_spatial_transformer"]) == (slice_dim, True)


def test_ema_weights_are_mapped_back_and_differ(original_fixtures):
    for folder in model_dirs(original_fixtures):
        raw = read_original_model_dir(folder)
        if not raw.has_ema:
            with pytest.raises(KeyError, match="EMA"):
                read_original_model_dir(folder, ema=True)
            continue
        ema = read_original_model_dir(folder, ema=True)
        state = safe_load_checkpoint(folder / "checkpoints" / "last.ckpt")["state_dict"]
        assert set(ema.unet_state_dict) == set(raw.unet_state_dict)
        for key, value in ema.unet_state_dict.items():
            assert torch.equal(value, state[ema_key(key)]), key
        assert any(not torch.equal(ema.unet_state_dict[k], raw.unet_state_dict[k]) for k in raw.unet_state_dict)

        vectors = torch.load(folder / "vectors.pt", weights_only=True)
        raw_unet, ema_unet = UNetModel(**raw.unet_params).eval(), UNetModel(**ema.unet_params).eval()
        raw_unet.load_state_dict(raw.unet_state_dict, strict=True)
        ema_unet.load_state_dict(ema.unet_state_dict, strict=True)
        if raw.denoiser_kwargs["variant"] == "position":
            args = (vectors["x"], vectors["t"]), {"context": vectors["cond"]}
        else:
            args = (torch.cat([vectors["x"], vectors["cond"]], 1), vectors["t"]), {}
        with torch.no_grad():
            out_raw, out_ema = raw_unet(*args[0], **args[1]), ema_unet(*args[0], **args[1])
        assert torch.allclose(out_raw, vectors["eps"], atol=1e-4)
        assert (out_ema - out_raw).abs().max() > 1e-3, folder.name


def test_ema_key_matches_original_names(original_fixtures):
    state = safe_load_checkpoint(original_fixtures / "stage1" / "checkpoints" / "last.ckpt")["state_dict"]
    assert ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    ema_names = {k for k in state if k.startswith("model_ema.")} - {"model_ema.decay", "model_ema.num_updates"}
    raw_names = [k[len("model.diffusion_model."):] for k in state if k.startswith("model.diffusion_model.")]
    assert {ema_key(k) for k in raw_names} == ema_names


def test_not_a_model_folder(tmp_path, original_fixtures):
    assert not is_original_model_dir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").symlink_to(original_fixtures / "stage1" / "checkpoints" / "last.ckpt")
    assert not is_original_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="project.yaml"):
        read_original_model_dir(tmp_path)


def test_gem3d_run_is_not_an_original_folder(tmp_path, original_fixtures):
    """gem3d's own runs have a unet_config too; their gem3d model target tells them apart."""
    import shutil

    import yaml

    shutil.copytree(original_fixtures / "stage1", tmp_path / "run")
    config_path = next((tmp_path / "run" / "configs").glob("*-project.yaml"))
    assert is_original_model_dir(tmp_path / "run")
    config = yaml.safe_load(config_path.read_text())
    config["model"]["target"] = "gem3d.training.ldm.Gem3dLDM"
    config_path.write_text(yaml.safe_dump(config))
    assert not is_original_model_dir(tmp_path / "run")


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda c: c["model"]["params"]["unet_config"]["params"].update(use_scale_shift_norm=True),
         NotImplementedError, "use_scale_shift_norm"),
        (lambda c: c["model"]["params"]["unet_config"]["params"].update(mystery_option=3), ValueError, "mystery_option"),
        (lambda c: c["model"]["params"].update(channels=3), ValueError, "concat condition"),
        (lambda c: c["model"]["params"].pop("unet_config"), KeyError, "unet_config"),
        (lambda c: c["model"]["params"].update(beta_schedule="cosine"), NotImplementedError, "beta_schedule='cosine'"),
        (lambda c: c["model"]["params"].update(conditioning_key="hybrid"), NotImplementedError,
         r"conditioning_key='hybrid' is not supported; allowed: \['concat', 'crossattn'\]"),
    ],
)
def test_config_problems_are_named(tmp_path, original_fixtures, edit, error, message):
    folder = copy_with_config(original_fixtures / "stage1", tmp_path, edit)
    with pytest.raises(error, match=message):
        read_original_model_dir(folder)


def test_unreachable_attention_rates_are_dropped(tmp_path, original_fixtures):
    """Attention sits at downsampling rates 1, 2, ..., 2**(len(channel_mult) - 1); others never act in the original."""
    unet_params = load_config(original_fixtures / "stage1")["model"]["params"]["unet_config"]["params"]
    reachable = [2**level for level in range(len(unet_params["channel_mult"]))]
    asked = [2 * reachable[-1], *reachable[::-1], 4 * reachable[-1]]  # two unreachable rates around the reachable ones
    folder = copy_with_config(
        original_fixtures / "stage1", tmp_path,
        lambda c: c["model"]["params"]["unet_config"]["params"].update(attention_resolutions=asked),
    )
    original = read_original_model_dir(folder)
    assert original.unet_params["attention_resolutions"] == reachable[::-1]
    kept = copy_with_config(
        original_fixtures / "stage1", tmp_path / "kept",
        lambda c: c["model"]["params"]["unet_config"]["params"].update(
            attention_resolutions=[*unet_params["attention_resolutions"], 2 * reachable[-1]]),
    )
    kept_model = read_original_model_dir(kept)  # only an unreachable rate added: still loads strictly
    UNetModel(**kept_model.unet_params).load_state_dict(kept_model.unet_state_dict, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# safe loading


def test_refuses_arbitrary_pickled_objects_unless_trusted(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": ArbitraryPayload()}, path)
    UNPICKLE_CALLS.clear()
    offending = f"{record_unpickle.__module__}.record_unpickle"
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load_checkpoint(path)
    message = str(info.value)
    assert offending in message and "trust=True" in message and "--trust-checkpoint" in message
    assert info.value.unsafe_globals == [offending]
    assert UNPICKLE_CALLS == []  # nothing was executed

    with pytest.warns(UserWarning, match="trust=True"):
        loaded = safe_load_checkpoint(path, trust=True)
    assert loaded["payload"] == "ran" and UNPICKLE_CALLS == ["ran"]
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_loads_lightning_checkpoint_objects_without_trust(tmp_path):
    """What Lightning / latent-diffusion checkpoints hold besides tensors: hyper-parameters (AttributeDict with
    omegaconf configs), callback states (PL 1.x keys them by class), numpy scalars, paths, defaultdicts."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
    from pytorch_lightning.utilities.parsing import AttributeDict

    config = OmegaConf.create({"model": {"target": "ldm.x", "params": {"lr": 1e-4, "mult": [1, 2], "ref": "${model.target}"}}})
    checkpoint = {
        "state_dict": collections.OrderedDict(w=torch.arange(3.0)),
        "epoch": 2,
        "global_step": 10,
        "pytorch-lightning_version": "1.4.2",
        "hyper_parameters": AttributeDict(config=config, lr=1e-4),
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "/x.ckpt"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "foreach": None}]}],
        "extra": {"score": np.float64(0.25), "array": np.arange(3), "dir": Path("/tmp/logs"),
                  "counts": collections.defaultdict(int, a=2)},
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(checkpoint, path)
    loaded = safe_load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    assert loaded["hyper_parameters"]["config"].model.params.ref == "ldm.x"
    assert loaded["hyper_parameters"]["lr"] == 1e-4
    (callback_key,) = loaded["callbacks"]
    assert callback_key.__name__ == "ModelCheckpoint" and callback_key is not ModelCheckpoint  # inert stand-in
    assert loaded["callbacks"][callback_key]["best_model_path"] == "/x.ckpt"
    assert loaded["extra"]["score"] == 0.25 and loaded["extra"]["array"].tolist() == [0, 1, 2]
    assert loaded["extra"]["dir"] == Path("/tmp/logs") and loaded["extra"]["counts"] == {"a": 2}


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        safe_load_checkpoint(tmp_path / "nothing.ckpt")


@pytest.mark.parametrize("key", ["hybrid", "adm", None])
def test_conditioning_keys_without_a_gem3d_variant_are_refused_naming_the_allowed_ones(key):
    """'hybrid' (concat + cross-attention) was once read as concat, silently dropping its cross-attention."""
    unet_params = {"in_channels": 12, "volumetric": False}
    message = rf"folder: conditioning_key={key!r} is not supported; allowed: \['concat', 'crossattn'\]"
    with pytest.raises(NotImplementedError, match=message):
        original_variant({"conditioning_key": key, "channels": 4}, unet_params, Path("folder"))
    assert original_variant({"conditioning_key": "concat", "channels": 4}, unet_params, Path("folder")) == "slice_stage"
    assert original_variant({"conditioning_key": "crossattn"}, unet_params, Path("folder")) == "position"
