"""Original GEM-3D folders from images to output: ``<fixture folder>/e2e.pt`` through gem3d's own inference path.

Every folder under ``GEM3D_ORIGINAL_FIXTURES`` (default ``../shared/fixtures/original-gem3d``) holding an ``e2e.pt``
is tested, as an original folder and converted. The vectors hold one window: mask slices and an informed slice as
images, the condition the original built from them (``scale_factor`` x posterior *mode*; the original itself draws a
posterior sample there, gem3d's inference uses the mean, see docs/original-models.md), a start latent ``e2e_xT``,
and the original's deterministic DDIM output before and after decoding. Shapes, slice and channel counts, steps and
eta come from the file.

The path under test is the engine's: ``encode_slices`` (mask and informed slice) -> ``sample_volume_latents``
(propagation over one window, ``Denoiser.condition``, the DDIM sampler) -> ``FirstStage.decode``; only the sampler's
start noise is replaced by ``e2e_xT``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from einops import rearrange
from omegaconf import OmegaConf

import gem3d.inference.volume as volume
from conftest import FIXTURES_ENV, REQUIRE_ENV, child_env, fixture_root, skip_missing_fixtures
from gem3d.convert import convert_model_dir
from gem3d.data.preprocess import grey_to_label, label_to_grey
from gem3d.inference.volume import SamplerOptions, decode_volume, encode_slices
from gem3d.model_dirs.load import CONVERTED_CONFIG, load_model_dir

ATOL = 1e-4  # the README's expected agreement: ~1e-5 for conditions and images, ~1e-4 for e2e_out (values ~35)
E2E_KEYS = {"mask_image", "informed_image", "cond_from_images", "e2e_xT", "e2e_steps", "e2e_eta", "e2e_out",
            "e2e_decoded", "scale_factor"}


def e2e_folders(root: Path) -> list[Path]:
    """Model folders under ``root`` with an ``e2e.pt``."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "e2e.pt").is_file() and (p / "checkpoints" / "last.ckpt").is_file())


FOLDERS = e2e_folders(fixture_root())
# no folder: one placeholder; every test needs the fixture folder (absent: the shared skip, an error in CI), and a
# fixture folder without e2e.pt files skips naming it, through the same helper (an error in CI too)
NO_FIXTURES = pytest.param(None, id="<no e2e folder>")
PARAMS = [pytest.param(p, id=p.name) for p in FOLDERS] or [NO_FIXTURES]
pytestmark = pytest.mark.usefixtures("original_fixtures")


@pytest.fixture(autouse=True)
def _e2e_folder_present(request, original_fixtures):
    """The placeholder parameter (no folder with an e2e.pt) skips, or fails with GEM3D_REQUIRE_FIXTURES=1."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "folder" in callspec.params and callspec.params["folder"] is None:
        skip_missing_fixtures(f"no original GEM-3D folder with an e2e.pt under {original_fixtures} "
                              "(set GEM3D_ORIGINAL_FIXTURES)")
SOURCES = ("original", "converted")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def original_ddim_timesteps(steps: int, num_train_timesteps: int) -> list[int]:
    """The original's ``make_ddim_timesteps(..., "uniform")``: ``range(0, T, T // S) + 1``, descending as called."""
    return sorted((np.arange(0, num_train_timesteps, num_train_timesteps // steps) + 1).tolist(), reverse=True)


@pytest.fixture(scope="module")
def e2e_cases(tmp_path_factory):
    """``{(folder name, source): (LoadedModel, vectors)}``, loaded once (raw weights: the vectors' own)."""
    cache: dict = {}

    def get(folder: Path, source: str):
        key = (folder.name, source)
        if key not in cache:
            vectors = torch.load(folder / "e2e.pt", map_location="cpu", weights_only=True)
            assert E2E_KEYS <= set(vectors), f"{folder / 'e2e.pt'} lacks {sorted(E2E_KEYS - set(vectors))}"
            path = folder
            if source == "converted":
                path = convert_model_dir(folder, tmp_path_factory.mktemp(f"{folder.name}-converted"))
            loaded = load_model_dir(path)
            assert loaded.kind == source and loaded.ema is False
            cache[key] = (loaded, vectors)
        return cache[key]

    return get


def engine_condition(model, v: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mask latents ``(F, C, h, w)`` and the informed latent ``(C, h, w)`` (None for mask-only models), encoded
    the way ``Enhancer.generate`` encodes them."""
    mask_latent = encode_slices(model, rearrange(v["mask_image"], "f 1 h w -> f h w"))
    informed = None
    if model.spec.use_informed:
        informed = encode_slices(model, rearrange(v["informed_image"], "1 1 h w -> 1 h w"))[0]
    return mask_latent, informed


# ---------------------------------------------------------------------------------------------- images -> condition
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("folder", PARAMS)
def test_condition_from_images(folder, source, e2e_cases):
    loaded, v = e2e_cases(folder, source)
    model = loaded.model
    expected = v["cond_from_images"]
    num_slices, channels = expected.shape[:2]
    latent_channels = model.first_stage.latent_channels
    assert channels == latent_channels * (2 if model.spec.use_informed else 1)
    assert float(model.first_stage.scale_factor) == pytest.approx(float(v["scale_factor"]))
    with torch.no_grad():
        mask_latent, informed = engine_condition(model, v)
        cond = model.condition(mask_latent[None], None if informed is None else informed[None])
    got = rearrange(cond["concat"], "1 f c h w -> f c h w")
    assert got.shape == expected.shape
    assert max_diff(got, expected) < ATOL
    # the check tells the scales apart: the unscaled mode (the bug this file guards against) is far off
    assert max_diff(got / float(v["scale_factor"]), expected) > 100 * ATOL


@pytest.mark.parametrize("folder", PARAMS)
def test_mask_images_are_gem3d_grey_masks(folder):
    """``mask_image`` holds the original's label levels ``2 k / max_label - 1``; gem3d's ``label_to_grey`` maps the
    labels back onto exactly those values (max_label: the coarsest grid the levels lie on)."""
    v = torch.load(folder / "e2e.pt", map_location="cpu", weights_only=True)
    grey = v["mask_image"].numpy()
    levels = np.unique(grey)
    max_label = next((m for m in range(1, 64) if np.allclose(grey_to_label(levels, m), (levels + 1) * m / 2, atol=1e-5)),
                     None)
    assert max_label is not None, f"mask levels {levels.tolist()} are not 2k/m - 1 for any m < 64"
    labels = grey_to_label(grey, max_label)
    assert labels.min() >= 0, "the e2e masks have no outside-body region"
    assert np.abs(label_to_grey(labels, max_label) - grey).max() < 1e-6


# ---------------------------------------------------------------------------------------------- condition -> output
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("folder", PARAMS)
def test_ddim_output_and_decoding(folder, source, e2e_cases, monkeypatch):
    loaded, v = e2e_cases(folder, source)
    model = loaded.model
    x_T, expected = v["e2e_xT"], v["e2e_out"]
    num_slices, c, h, w = x_T.shape
    steps, eta = int(v["e2e_steps"]), float(v["e2e_eta"])

    drawn = []

    def start_noise(shape, generator, device):  # the sampler's x_T: the vectors' own, for the one window
        assert tuple(shape) == (1, num_slices, c, h, w), shape
        drawn.append(shape)
        return x_T[None].to(device)

    monkeypatch.setattr(SamplerOptions, "noise", lambda self, shape, generator, device: start_noise(shape, generator, device))
    model_fn, called = model.model_fn, []

    def recording_model_fn(cond):
        eps_fn = model_fn(cond)

        def eps(x, t):
            called.append(int(t.reshape(-1)[0]))
            return eps_fn(x, t)

        return eps

    monkeypatch.setattr(model, "model_fn", recording_model_fn)
    options = SamplerOptions(sampler="ddim", steps=steps, eta=eta, window=num_slices, overlap=1)
    with torch.no_grad():
        mask_latent, informed = engine_condition(model, v)
        latents = volume.sample_volume_latents(model, mask_latent, informed, 0 if informed is not None else None,
                                               options, torch.Generator().manual_seed(0))
        decoded = model.first_stage.decode(latents)
        grey = decode_volume(model, latents)
    assert len(drawn) == 1, "one window covers the vectors' slices"
    assert called == original_ddim_timesteps(steps, model.num_train_timesteps)
    assert latents.shape == expected.shape
    assert max_diff(latents, expected) < ATOL
    assert max_diff(decoded, v["e2e_decoded"]) < ATOL
    # decode_volume: gem3d's grey output, the channel mean clamped to [-1, 1]
    assert max_diff(grey, v["e2e_decoded"].mean(dim=1).clamp(-1, 1)) < ATOL


# ---------------------------------------------------------------------------------------------- old converted dirs
@pytest.mark.parametrize("folder", PARAMS)
def test_converted_dir_with_the_old_condition_factor_is_refused(folder, tmp_path):
    """Dirs converted before the fix carry ``condition_latent_factor: 1 / scale_factor``: refused with a way out;
    an explicit 1.0 loads and samples like a fresh conversion."""
    dst = convert_model_dir(folder, tmp_path / "converted")
    config_path = dst / CONVERTED_CONFIG
    config = yaml.safe_load(config_path.read_text())
    assert config["model"]["params"].get("condition_latent_factor", 1.0) == 1.0
    scale = float(config["model"]["params"]["first_stage_config"]["params"]["scale_factor"])

    config["model"]["params"]["condition_latent_factor"] = 1.0 / scale
    config_path.write_text(yaml.safe_dump(config))
    message = re.escape(f"condition_latent_factor={1.0 / scale!r}") + r".*allowed .*: 1\.0.*Convert the original folder again"
    with pytest.raises(ValueError, match=message):
        load_model_dir(dst)

    config["model"]["params"]["condition_latent_factor"] = 1.0
    OmegaConf.save(OmegaConf.create(config), config_path)
    model = load_model_dir(dst).model
    v = torch.load(folder / "e2e.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        mask_latent, informed = engine_condition(model, v)
        cond = model.condition(mask_latent[None], None if informed is None else informed[None])
    assert max_diff(rearrange(cond["concat"], "1 f c h w -> f c h w"), v["cond_from_images"]) < ATOL


# ---------------------------------------------------------------------------------------------- posterior draw
@pytest.mark.parametrize("folder", PARAMS)
def test_condition_posterior_sample_draws_like_the_original(folder, e2e_cases):
    """``SamplerOptions.condition_posterior="sample"`` (the engine's switch) draws the conditioning latents from the
    encoder posterior, as the original's ``get_first_stage_encoding`` does: ``scale * (mean + std * noise)``."""
    loaded, v = e2e_cases(folder, "original")
    first_stage = loaded.model.first_stage
    scale = float(first_stage.scale_factor)
    images = rearrange(v["mask_image"], "f 1 h w -> f h w")
    with pytest.raises(ValueError, match=r"condition_posterior='mode' is not one of \['mean', 'sample'\]"):
        SamplerOptions(condition_posterior="mode")
    with torch.no_grad():
        mean = encode_slices(loaded.model, images)
        draws = [encode_slices(loaded.model, images, sample=True, generator=torch.Generator().manual_seed(seed))
                 for seed in (3, 3, 4)]
        std = first_stage.posterior(rearrange(images, "f h w -> f 1 h w")).std
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    noise = (draws[0] - mean) / scale / std
    assert abs(float(noise.mean())) < 0.2 and 0.8 < float(noise.std()) < 1.2, "the draw is not mean + std * N(0, 1)"
    if loaded.model.spec.use_informed:
        informed = rearrange(v["informed_image"], "1 1 h w -> 1 h w")
        drawn = encode_slices(loaded.model, informed, sample=True, generator=torch.Generator().manual_seed(3))
        assert max_diff(drawn, encode_slices(loaded.model, informed)) > ATOL


@pytest.mark.parametrize("require, outcome", [("0", "1 skipped"), ("1", "1 error")])
def test_a_fixture_folder_without_e2e_vectors_skips_or_fails_as_required(tmp_path, require, outcome):
    """An existing fixture folder that holds no e2e.pt: the shared skip, which GEM3D_REQUIRE_FIXTURES=1 turns into a
    failure, an error in its fixture (run in a child pytest that sees an empty fixture folder)."""
    empty = tmp_path / "fixtures"
    empty.mkdir()
    env = child_env(**{FIXTURES_ENV: str(empty), REQUIRE_ENV: require})
    test_id = f"{Path(__file__).name}::test_mask_images_are_gem3d_grey_masks"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rsE", test_id],
                          cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in proc.stdout, proc.stdout[-2000:]
    assert f"no original GEM-3D folder with an e2e.pt under {empty}" in proc.stdout, proc.stdout[-2000:]
