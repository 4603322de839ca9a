"""Original GEM-3D model folders through gem3d's public loading path reproduce the original's test vectors.

Every model folder under ``GEM3D_ORIGINAL_FIXTURES`` (default ``../shared/fixtures/original-gem3d``) is found at
collection time; shapes and options come from that folder's own config, so the tests hold for any configuration
of the original classes. Rows of the volumetric models' vectors are clip-major clips of 16 slices (the original's
fixed clip length).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from einops import rearrange
from safetensors.torch import load_file

from conftest import ORIGINAL_CLIP_LEN, fixture_root
from gem3d.convert import convert_model_dir
from gem3d.model_dirs import load_model_dir
from gem3d.inference.volume import SamplerOptions, decode_volume, sample_slice_latents, sample_volume_latents
from gem3d.models.conditioning import position_embedding
from gem3d.sampling.samplers import make_schedule, sample

ATOL = 1e-4
NO_FOLDER = "<no model folder found>"


# ---------------------------------------------------------------------------------------------- what a folder is
@dataclass(frozen=True)
class FolderSpec:
    """What the original config and checkpoint of a folder say, read here independently of gem3d's loader."""

    path: Path
    conditioning_key: str
    volumetric: bool
    in_channels: int
    latent_channels: int
    scale_factor: float
    context_dim: int | None
    has_ema: bool
    latent_hw: tuple[int, int]
    vector_keys: frozenset

    @property
    def clip_len(self) -> int:
        return ORIGINAL_CLIP_LEN if self.volumetric else 1

    @property
    def uses_informed(self) -> bool:
        return self.conditioning_key == "concat" and self.in_channels == 3 * self.latent_channels


def discover(root: Path) -> list[str]:
    """Every folder holding ``checkpoints/last.ckpt`` and ``configs/*-project.yaml``."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if (p / "checkpoints" / "last.ckpt").is_file() and list((p / "configs").glob("*-project.yaml"))
    )


@functools.lru_cache(maxsize=None)
def checkpoint_state(name: str) -> dict:
    folder = fixture_root() / name
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@functools.lru_cache(maxsize=None)
def vectors(name: str) -> dict:
    path = fixture_root() / name / "vectors.pt"
    assert path.is_file(), f"{path.parent} has no vectors.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=None)
def folder_spec(name: str) -> FolderSpec:
    folder = fixture_root() / name
    if name == NO_FOLDER or not folder.is_dir():
        raise FileNotFoundError(f"no original model folders under {fixture_root()} (set GEM3D_ORIGINAL_FIXTURES)")
    (config_path,) = sorted((folder / "configs").glob("*-project.yaml"))[-1:]
    params = yaml.safe_load(config_path.read_text())["model"]["params"]
    unet = params["unet_config"]
    state = checkpoint_state(name)
    cond_cfg = params.get("cond_stage_config")
    context_dim = None
    if params.get("conditioning_key") == "crossattn":
        context_dim = int(cond_cfg["params"]["dim"]) if isinstance(cond_cfg, dict) else int(unet["params"]["context_dim"])
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
    size = int(ddconfig["resolution"]) // factor
    return FolderSpec(
        path=folder,
        conditioning_key=str(params.get("conditioning_key")),
        volumetric="pseudo3D" in unet["target"] or any("_tem." in k for k in state),
        in_channels=int(unet["params"]["in_channels"]),
        latent_channels=int(params.get("channels", 4)),
        scale_factor=float(params.get("scale_factor", 1.0)),
        context_dim=context_dim,
        has_ema=any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in state),
        latent_hw=(size, size),
        vector_keys=frozenset(vectors(name)),
    )


def _collect() -> dict[str, dict]:
    """Collection-time facts (conditioning key, vector names) used to choose which tests apply to which folder."""
    info = {}
    for name in discover(fixture_root()):
        config_path = sorted((fixture_root() / name / "configs").glob("*-project.yaml"))[-1]
        params = yaml.safe_load(config_path.read_text())["model"]["params"]
        keys = set(torch.load(fixture_root() / name / "vectors.pt", weights_only=True)) if (
            fixture_root() / name / "vectors.pt").is_file() else set()
        info[name] = {"conditioning": params.get("conditioning_key"), "vectors": keys}
    return info


FOLDERS = _collect()
ALL = sorted(FOLDERS) or [NO_FOLDER]
# no folders at all: one placeholder id, so that these tests skip (or fail) with the fixture's reason
CONCAT = [n for n, i in FOLDERS.items() if i["conditioning"] == "concat"] if FOLDERS else [NO_FOLDER]
WITH_AUTOENCODER_VECTORS = [n for n, i in FOLDERS.items()
                            if {"image", "latent_mean_scaled", "decoded"} <= i["vectors"]] if FOLDERS else [NO_FOLDER]


@functools.lru_cache(maxsize=None)
def loaded(name: str, ema: bool | None = None):
    return load_model_dir(fixture_root() / name, ema=ema)


def clips(rows: torch.Tensor, spec: FolderSpec) -> torch.Tensor:
    """Fixture rows ``(B*F, ...)`` (clip-major) -> clips ``(B, F, ...)``."""
    assert rows.shape[0] % spec.clip_len == 0, f"{rows.shape[0]} rows are not whole clips of {spec.clip_len}"
    return rearrange(rows, "(b f) ... -> b f ...", f=spec.clip_len)


def fixture_condition(model, spec: FolderSpec, v: dict) -> dict:
    """The vectors' ``cond`` in the form ``Gem3dLDM.eps`` takes."""
    if spec.conditioning_key == "crossattn":
        return {"concat": None, "context": v["cond"]}
    return {"concat": clips(v["cond"], spec), "context": None}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------- tests
pytestmark = pytest.mark.usefixtures("original_fixtures")  # absent fixtures: one skip reason (error in CI)


def test_fixture_root_holds_model_folders(original_fixtures):
    assert discover(original_fixtures), f"no model folders (checkpoints/last.ckpt + configs/*-project.yaml) in {original_fixtures}"


@pytest.mark.parametrize("name", ALL)
def test_loads_as_the_configured_model(name):
    spec = folder_spec(name)
    lm = loaded(name)
    model = lm.model
    assert lm.kind == "original" and lm.ema is False
    assert model.spec.conditioning == spec.conditioning_key
    assert model.spec.volumetric == spec.volumetric
    assert model.spec.use_informed == spec.uses_informed
    assert model.unet.input_blocks[0][0].in_channels == spec.in_channels
    assert model.first_stage.latent_channels == spec.latent_channels
    assert model.first_stage.scale_factor == pytest.approx(spec.scale_factor)
    # the checkpoint's schedule buffer is the one the model samples with
    stored = checkpoint_state(name).get("alphas_cumprod")
    if stored is not None:
        assert max_diff(model.alphas_cumprod, stored) < 1e-6


@pytest.mark.parametrize("name", ALL)
def test_unet_eps_is_reproduced(name):
    spec, v, model = folder_spec(name), vectors(name), loaded(name).model
    x, t = clips(v["x"], spec), clips(v["t"], spec)
    with torch.no_grad():
        if spec.conditioning_key == "crossattn":
            # the vectors' cond is the position embedding of pos, used as the context
            assert max_diff(position_embedding(v["pos"], spec.context_dim), v["cond"]) < 1e-5
            assert max_diff(model.condition(pos=v["pos"])["context"], v["cond"]) < 1e-5
        else:
            # the concat condition is mask latent then informed latent, scaled like the noisy latent (the
            # original's get_first_stage_encoding); gem3d's condition() takes such latents and does not rescale them
            c = spec.latent_channels
            parts = clips(v["cond"], spec)
            informed = parts[:, :, c:] if spec.uses_informed else None
            assert max_diff(model.condition(parts[:, :, :c], informed)["concat"], clips(v["cond"], spec)) < 1e-5
        eps = model.eps(x, t[:, 0] if spec.volumetric else t, fixture_condition(model, spec, v))
        assert eps.shape == clips(v["eps"], spec).shape
        assert max_diff(eps, clips(v["eps"], spec)) < ATOL
        # the bare UNet on the concatenated input agrees too
        if spec.conditioning_key == "concat":
            flat = model.unet(torch.cat([v["x"], v["cond"]], dim=1), v["t"],
                              **({"num_frames": spec.clip_len} if spec.volumetric else {}))
            assert max_diff(flat, v["eps"]) < ATOL


@pytest.mark.parametrize("name", ALL)
def test_first_stage_weights_are_the_checkpoints(name):
    first_stage = loaded(name).model.first_stage
    state = checkpoint_state(name)
    expected = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    assert expected, f"{name}: the checkpoint holds no first_stage_model.* weights"
    ours = first_stage.to_ldm_state_dict()
    assert set(ours) <= set(expected), sorted(set(ours) - set(expected))[:5]
    for key, value in ours.items():
        assert torch.equal(value, expected[key].reshape(value.shape)), key


@pytest.mark.parametrize("name", WITH_AUTOENCODER_VECTORS)
def test_autoencoder_vectors_are_reproduced(name):
    v, first_stage = vectors(name), loaded(name).model.first_stage
    with torch.no_grad():
        assert max_diff(first_stage.encode(v["image"]), v["latent_mean_scaled"]) < ATOL
        assert max_diff(first_stage.decode(v["latent_mean_scaled"]), v["decoded"]) < ATOL
    if "scale_factor" in v:
        assert first_stage.scale_factor == pytest.approx(float(v["scale_factor"]))


@pytest.mark.parametrize("name", CONCAT)
def test_deterministic_ddim_is_reproduced(name):
    spec, v, model = folder_spec(name), vectors(name), loaded(name).model
    assert {"ddim_xT", "ddim_steps", "ddim_out"} <= spec.vector_keys, f"{name}: concat folder without DDIM vectors"
    steps = int(v["ddim_steps"])
    eps_fn, called = model.model_fn(fixture_condition(model, spec, v)), []

    def recording_eps_fn(x, t):
        called.append(int(t[0]))
        assert bool((t == t[0]).all())
        return eps_fn(x, t)

    with torch.no_grad():
        schedule = make_schedule("ddim", model.alphas_cumprod, steps, eta=0.0, spacing="original")
        out = sample(recording_eps_fn, clips(v["ddim_xT"], spec), schedule)
    if "ddim_timesteps" in v:  # the original's uniform spacing, called from the last to the first
        assert called == sorted(v["ddim_timesteps"].tolist(), reverse=True)
    assert max_diff(out, clips(v["ddim_out"], spec)) < ATOL


@pytest.mark.parametrize("name", ALL)
def test_ema_and_raw_weights_are_told_apart(name):
    spec = folder_spec(name)
    raw = loaded(name).model
    if not spec.has_ema:
        with pytest.raises((KeyError, ValueError), match="EMA"):
            load_model_dir(spec.path, ema=True)
        return
    lm = loaded(name, True)
    assert lm.ema is True and lm.kind == "original"
    state = checkpoint_state(name)
    differing = 0
    for key, value in lm.model.unet.state_dict().items():
        shadow = state["model_ema." + ("diffusion_model." + key).replace(".", "")]
        assert torch.equal(value, shadow), key
        differing += int(not torch.equal(value, raw.unet.state_dict()[key]))
    assert differing > 0, "the EMA weights should differ from the raw ones in the fixtures"
    v = vectors(name)
    with torch.no_grad():
        eps = lm.model.eps(clips(v["x"], spec), clips(v["t"], spec)[:, 0], fixture_condition(lm.model, spec, v))
    assert max_diff(eps, clips(v["eps"], spec)) > 1e-3  # the vectors were made with the raw weights


def _block_original_format(monkeypatch):
    """Make every use of the original-format code (gem3d.model_dirs.original) fail."""
    import gem3d.model_dirs.load as load
    import gem3d.model_dirs.original as original

    def refuse(*args, **kwargs):
        raise AssertionError("a converted model dir must load without gem3d.model_dirs.original")

    for attr in ("read_original_model_dir", "is_original_model_dir", "safe_load_checkpoint", "find_original_config"):
        monkeypatch.setattr(original, attr, refuse)
    for attr in ("is_original_model_dir", "load_original_denoiser"):
        monkeypatch.setattr(load, attr, refuse)


@pytest.mark.parametrize("name", ALL)
def test_converted_model_gives_identical_samples(name, tmp_path, monkeypatch):
    spec = folder_spec(name)
    original = loaded(name)
    dst = convert_model_dir(spec.path, tmp_path / "converted")
    assert sorted(p.name for p in dst.iterdir()) == ["configs", "weights.safetensors"]
    assert set(load_file(str(dst / "weights.safetensors"))) == set(original.model.state_dict())

    _block_original_format(monkeypatch)
    converted = load_model_dir(dst)
    assert converted.kind == "converted" and converted.ema is False
    assert converted.model.variant == original.model.variant
    theirs = converted.model.state_dict()
    for key, value in original.model.state_dict().items():
        assert torch.equal(value, theirs[key]), key

    c, (h, w) = spec.latent_channels, spec.latent_hw
    options = SamplerOptions(steps=2, eta=1.0)
    samples = []
    for lm in (original, converted):
        generator = torch.Generator().manual_seed(1234)
        if spec.conditioning_key == "crossattn":
            latents = sample_slice_latents(lm.model, torch.tensor([0.1, 0.6]), (h, w), options, generator)
        else:
            num_slices = ORIGINAL_CLIP_LEN + 3  # two overlapping windows of the paper's 16 slices
            cond = torch.Generator().manual_seed(7)
            mask = torch.randn(num_slices, c, h, w, generator=cond)
            informed = torch.randn(c, h, w, generator=cond) if spec.uses_informed else None
            latents = sample_volume_latents(lm.model, mask, informed, num_slices // 2 if informed is not None else None,
                                            options, generator)
        samples.append((latents, decode_volume(lm.model, latents[:2])))
    (lat_a, img_a), (lat_b, img_b) = samples
    assert torch.isfinite(lat_a).all()
    assert torch.equal(lat_a, lat_b)
    assert max_diff(img_a, img_b) <= 1e-6
