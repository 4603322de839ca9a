"""The equivalence tests hold on another fixture set: several clips per batch, an unreachable attention rate.

The variant (tests/_fixture_variants.py) is derived from the original fixtures with exact expected outputs; the
equivalence tests run on it in a child pytest with the fixtures required.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from _fixture_variants import model_folders, write_variant
from conftest import FIXTURES_ENV, ORIGINAL_CLIP_LEN, REQUIRE_ENV, child_env
from gem3d.model_dirs.original import read_original_model_dir
from gem3d.models.unet import UNetModel

ROOT = Path(__file__).resolve().parents[1]
# every test that reads rows, clips or attention rates from the fixture folder
EQUIVALENCE_TESTS = [
    "tests/test_original_equivalence.py",
    "tests/test_original_e2e.py",
    "tests/test_unet.py::test_every_fixture_model_reproduces_original_eps",
    "tests/test_unet.py::test_volumetric_layers_matter_in_stage2_fixture",
    "tests/test_sampling.py::test_ddim_reproduces_original_fixture",
    "tests/test_convert_original.py::test_every_folder_is_read_from_its_own_config",
    "tests/test_convert_original.py::test_expected_settings_of_the_four_fixtures",
    "tests/test_convert_original.py::test_unreachable_attention_rates_are_dropped",
    "tests/test_convert_original.py::test_ema_weights_are_mapped_back_and_differ",
    "tests/test_autoencoder.py::test_original_fixture_equivalence",
]


def test_variant_has_several_clips_and_is_discriminative(original_fixtures, tmp_path):
    variant = write_variant(original_fixtures, tmp_path / "variant")
    assert [p.name for p in model_folders(variant)] == [p.name for p in model_folders(original_fixtures)]
    folder = variant / "stage2"
    original = read_original_model_dir(folder)
    vectors = torch.load(folder / "vectors.pt", weights_only=True)
    rows = vectors["x"].shape[0]
    assert rows == 2 * torch.load(original_fixtures / "stage2" / "vectors.pt", weights_only=True)["x"].shape[0]
    unet = UNetModel(**original.unet_params).eval()
    unet.load_state_dict(original.unet_state_dict, strict=True)  # the unreachable attention rate was dropped
    inputs = torch.cat([vectors["x"], vectors["cond"]], dim=1)
    with torch.no_grad():
        as_clips = unet(inputs, vectors["t"], num_frames=ORIGINAL_CLIP_LEN)
        as_one_batch = unet(inputs, vectors["t"], num_frames=rows)  # the "a batch is one clip" assumption
    assert (as_clips - vectors["eps"]).abs().max() < 1e-4
    assert (as_one_batch - vectors["eps"]).abs().max() > 1e-3


def test_equivalence_tests_pass_on_the_variant(original_fixtures, tmp_path):
    variant = write_variant(original_fixtures, tmp_path / "variant")
    env = child_env(**{FIXTURES_ENV: str(variant), REQUIRE_ENV: "1"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *EQUIVALENCE_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary and "error" not in summary, summary
