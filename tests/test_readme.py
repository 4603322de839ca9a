"""The README's Python API example runs (on tiny models), and the README and LICENSE say what a user needs."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests import _tiny_models

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def api_example() -> str:
    """The first ```python block after the ``python-api-example`` marker."""
    after = README.split("<!-- python-api-example -->", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_python_api_example_synthesises_one_volume(tmp_path_factory, tmp_path, monkeypatch):
    tiny = _tiny_models.tiny_setup(tmp_path_factory)
    code = api_example()
    replacements = {'"data/nnUNet_raw/Dataset001_BrainTumour"': repr(str(tiny["data"])),
                    '"infer_model/brain"': repr(str(tiny["volume_stage"])), '"outputs/brain"': repr(str(tmp_path)),
                    "steps=50": "steps=2", 'device="cuda"': 'device="cpu"'}
    for old, new in replacements.items():
        assert code.count(old) == 1, old  # the example still holds what this test swaps for tiny inputs
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md python-api-example", "exec"), namespace)  # noqa: S102 - the README's own code
    manifest = Path(namespace["manifest_path"])
    assert manifest == tmp_path / "test" / "manifest.json"
    case = tiny["names"][0]
    image = tmp_path / "test" / f"{case}_s0_image.nii.gz"
    label = nib.load(str(tiny["data"] / "labelsTr" / f"{case}.nii.gz"))
    written = nib.load(str(image))
    assert written.shape == label.shape and np.allclose(written.affine, label.affine)
    assert np.isfinite(np.asarray(written.dataobj)).all()
    records = json.loads(manifest.read_text())
    assert case in json.dumps(records)


def test_readme_names_no_project_history():
    assert not re.search(r"\bissues? \d+", README, re.I), re.findall(r".{40}\bissues? \d+.{20}", README, re.I)


def test_license_is_the_mit_license_pyproject_names():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT" and pyproject["project"]["license-files"] == ["LICENSE"]
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n") and "the gem3d authors" in license_text


@pytest.mark.parametrize("key, fields", [
    ("zhu2024gem3d", ("Generative Enhancement for 3D Medical Images", "2403.12852", "Codella", "Lequan")),
    ("zhu2023makeavolume", ("Make-A-Volume", "MICCAI", "2307.10094")),
])
def test_bibtex_entries(key, fields):
    entry = README.split(f"{{{key},", 1)[1].split("\n}", 1)[0]
    for field in fields:
        assert field in entry, (key, field)
