"""Every YAML in configs/latent-diffusion: layout, paper hyper-parameters, and a model that instantiates.

Paper-size UNets are built on the meta device (parameter counts, no memory); each LDM config is also
instantiated as a shrunk copy (same variant and layout, tiny widths and first stage) and run once.
"""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main as main_module  # noqa: E402
from gem3d.config import get_obj_from_str, is_placeholder, load_config_file, to_plain  # noqa: E402
from gem3d.data.module import Gem3dDataModule  # noqa: E402
from gem3d.data.preprocess import PreprocessConfig  # noqa: E402
from gem3d.denoiser import VARIANTS  # noqa: E402
from gem3d.training import Gem3dLDM  # noqa: E402
from gem3d.models.unet import UNetModel  # noqa: E402

CONFIG_DIR = ROOT / "configs" / "latent-diffusion"
KINDS = {"stage1": "slice_stage", "stage2": "volume_stage", "slice": "position",
         "base_stage1": "baseline_slice", "base_stage2": "baseline_volume"}
DATASETS = ("brain", "abdomen", "demo")
LDM_CONFIGS = [f"{d}_{k}" for d in DATASETS for k in KINDS]
ALL_CONFIGS = LDM_CONFIGS + ["demo_autoencoder"]


def load(name: str):
    return load_config_file(CONFIG_DIR / f"{name}.yaml")  # with its included dataset block


def test_the_config_set_is_complete():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(ALL_CONFIGS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_layout_targets_and_data(name):
    config = load(name)
    main_module.validate_config(config)
    get_obj_from_str(config.model.target)
    assert get_obj_from_str(config.data.target) is Gem3dDataModule
    data = to_plain(config.data.params)
    assert "dataset_dir" in data
    inspect.signature(Gem3dDataModule).bind(**data)  # no unknown data keys
    PreprocessConfig.from_dict(data["preprocess"])
    trainer_keys = set(config.lightning.trainer)
    assert trainer_keys <= set(inspect.signature(__import__("lightning").Trainer.__init__).parameters)
    assert config.lightning.trainer.max_steps > 0
    if name in LDM_CONFIGS:
        variant = config.model.params.variant
        assert variant == KINDS[name.split("_", 1)[1]]
        assert data["kind"] == VARIANTS[variant].data_kind
        if data["kind"] == "clip":  # paper: 16-slice clips; demo volume stages train on 8 (48-slice volumes)
            assert data["clip_len"] == 16 or (name.startswith("demo") and VARIANTS[variant].volumetric and data["clip_len"] == 8)


@pytest.mark.parametrize("dataset", ["brain", "abdomen"])
def test_paper_hyperparameters(dataset):
    for kind, variant in KINDS.items():
        config = load(f"{dataset}_{kind}")
        params = config.model.params
        unet = params.unet_config.params
        data = config.data.params
        assert unet.model_channels == 224 and unet.num_res_blocks == 2 and unet.num_head_channels == 32
        assert unet.use_checkpoint is True
        assert data.preprocess.size == 512
        assert data.preprocess.max_label == (3 if dataset == "brain" else 4)
        assert data.preprocess.intensity == ("minmax" if dataset == "brain" else "window")
        assert data.preprocess.body == ("nonzero" if dataset == "brain" else "threshold")
        fs = params.first_stage_config
        assert fs.target == "gem3d.models.autoencoder.FirstStage.from_ldm_checkpoint"
        assert "config_path" not in fs.params  # the architecture: gem3d's packaged kl-f8.yaml (the default)
        if variant == "position":
            assert list(unet.channel_mult) == [1, 2, 4, 4] and list(unet.attention_resolutions) == [4, 2, 1]
            assert unet.use_spatial_transformer and unet.context_dim == 128 and params.position_embed_dim == 128
            assert params.base_learning_rate == pytest.approx(5e-7) and data.batch_size == 4
        else:
            assert list(unet.channel_mult) == [1, 2, 3, 4] and list(unet.attention_resolutions) == [8, 4, 2]
            assert params.base_learning_rate == pytest.approx(5e-6) and data.batch_size == 1
        volumetric = VARIANTS[variant].volumetric
        assert config.lightning.trainer.max_steps == (50_000 if volumetric else 150_000)
        assert params.use_ema is (not volumetric)
        if volumetric:
            assert is_placeholder(params.ckpt_path)
        assert unet.in_channels == {"slice_stage": 12, "volume_stage": 12, "position": 4}.get(variant, 8)


@pytest.mark.parametrize("kind, millions", [("stage1", 274.1), ("stage2", 367.9)])
def test_paper_unet_sizes_on_meta_device(kind, millions):
    params = to_plain(load(f"brain_{kind}").model.params.unet_config.params)
    with torch.device("meta"):
        unet = UNetModel(**params)
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def tiny_first_stage(paper: bool) -> dict:
    return {"target": "gem3d.models.autoencoder.FirstStage.from_diffusers_config",
            "params": {"in_channels": 3 if paper else 1, "out_channels": 3 if paper else 1, "block_out_channels": [32, 32],
                       "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 16}}


def shrunk_model_params(name: str) -> dict:
    """The config's model params with tiny widths, a tiny first stage and no stage-1 checkpoint."""
    params = copy.deepcopy(to_plain(load(name).model.params))
    unet = params["unet_config"]["params"]
    unet["model_channels"] = 32
    unet["num_res_blocks"] = 1
    unet["use_checkpoint"] = False
    if unet.get("use_spatial_transformer"):
        unet["context_dim"] = 16
        params["position_embed_dim"] = 16
    params["first_stage_config"] = tiny_first_stage(paper=not name.startswith("demo"))
    params["ckpt_path"] = None
    return params


@pytest.mark.filterwarnings("ignore:variant=.*without ckpt_path")
@pytest.mark.parametrize("name", LDM_CONFIGS)
def test_shrunk_copy_instantiates_and_runs(name):
    model = Gem3dLDM(**shrunk_model_params(name))
    assert model.variant == load(name).model.params.variant
    levels = len(model.unet.channel_mult)
    side = 2 ** (levels - 1) * 2  # latent side divisible by the UNet's downsampling, image = 2x (f = 2)
    if model.spec.data_kind == "slice":
        batch = {"image": torch.rand(2, 1, side, side) * 2 - 1, "mask": torch.zeros(2, 1, side, side),
                 "pos": torch.tensor([0.25, 0.75])}
    else:
        batch = {"image": torch.rand(1, 3, 1, side, side) * 2 - 1, "mask": torch.zeros(1, 3, 1, side, side) - 1,
                 "informed": torch.rand(1, 1, side, side) * 2 - 1}
    loss = model.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    trained = model.trainable_parameters()
    assert trained and all(p.grad is not None for p in trained)
    if model.spec.volumetric:
        assert len(trained) == len(list(model.unet.volumetric_parameters()))


def test_demo_configs_use_the_demo_dataset_and_autoencoder():
    for name in LDM_CONFIGS:
        if not name.startswith("demo"):
            continue
        config = load(name)
        assert config.data.params.dataset_dir == "demo_out/dataset" and config.data.params.preprocess.size == 64
        assert config.model.params.first_stage_config.target == "gem3d.models.autoencoder.FirstStage.from_run"
        if VARIANTS[config.model.params.variant].volumetric:
            assert "demo_" in config.model.params.ckpt_path and not is_placeholder(config.model.params.ckpt_path)
    ae = load("demo_autoencoder")
    assert ae.model.target == "gem3d.training.autoencoder.AutoencoderModule"
    assert len(ae.model.params.first_stage_config.params.block_out_channels) == 3  # f = 4


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_paper_configs_train_in_bf16_autocast_and_demo_configs_in_fp32(name):
    precision = load(name).lightning.trainer.get("precision")
    assert precision == (None if name.startswith("demo") else "bf16-mixed")  # the demo trains on the CPU
