"""A non-editable install works away from the checkout: the wheel carries the configs the package needs.

The wheel is built offline with the environment's setuptools (``--no-build-isolation``), installed into a folder
with ``pip install --target`` and imported from another directory, with this checkout off ``sys.path``.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from _tiny_models import build_model_dir
from conftest import child_env
from gem3d.convert import convert_model_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ["gem3d/configs/first_stage/kl-f8.yaml", "gem3d/configs/inference/brain.yaml",
            "gem3d/configs/inference/abdomen.yaml", "gem3d/configs/inference/demo.yaml"]

CHECK = """
import sys
from pathlib import Path
import gem3d
from gem3d.configs import packaged
from gem3d.models import ldm_vae
from gem3d.inference.cli import load_inference_config
from gem3d.model_dirs import load_model_dir
from gem3d.models.autoencoder import KL_F8_CONFIG

target, model_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
assert Path(gem3d.__file__).resolve().is_relative_to(target), gem3d.__file__
assert KL_F8_CONFIG.resolve().is_relative_to(target) and KL_F8_CONFIG == packaged("first_stage", "kl-f8.yaml")
params = ldm_vae.find_autoencoder_params(KL_F8_CONFIG)
assert ldm_vae.diffusers_config_from_ddconfig(params["ddconfig"], params["embed_dim"])["block_out_channels"] == [128, 256, 512, 512]
assert load_inference_config("brain")["fallback_preprocess"]["max_label"] == 3
loaded = load_model_dir(model_dir)
print("OK", loaded.kind, type(loaded.model).__name__)
"""


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built as a wheel from a copy of the sources, installed into a target folder."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "gem3d", source / "gem3d", ignore=shutil.ignore_patterns("__pycache__"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  str(source), "-w", str(root / "wheels")], cwd=root)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (root / "wheels").glob("gem3d-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert set(PACKAGED) <= names, sorted(n for n in names if "configs" in n)
    assert not any(n.startswith(("configs/", "tests/", "scripts/")) for n in names)
    target = root / "target"
    done = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                 str(wheel)], cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return target


def test_installed_wheel_loads_its_configs_and_a_model_folder(installed, tmp_path):
    model_dir = convert_model_dir(build_model_dir(tmp_path / "run", "baseline_volume"), tmp_path / "converted")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _run([sys.executable, "-c", CHECK, str(installed), str(model_dir)], cwd=elsewhere,
                  PYTHONPATH=str(installed))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "OK converted Denoiser"


def test_the_checkout_does_not_duplicate_the_packaged_configs():
    assert not (ROOT / "configs" / "first_stage").exists() and not (ROOT / "configs" / "inference").exists()
    for name in PACKAGED:
        assert (ROOT / name).is_file(), name
