"""The bad-input catalogue (docs/reliability.md): every case ends in ONE line naming the file, key or value, what
was expected and, where there is one, the nearest valid choice; the CLIs exit with status 2, print no traceback and
leave no partial output behind."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from gem3d.configs import packaged
from gem3d.data.check import main as check_main
from gem3d.files import atomic_write_text
from gem3d.inference import cli
from gem3d.inference.engine import output_lock
from tests._tiny_models import tiny_setup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main as main_module  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


# ---------------------------------------------------------------------------------------------- data helpers
def dataset_copy(tiny, tmp_path: Path, cases: int = 2) -> tuple[Path, list[str]]:
    """A copy of the tiny dataset with its first ``cases`` (straight, not oblique) cases."""
    names = [n for n in tiny["names"] if n != tiny["oblique"]][:cases]
    dst = tmp_path / "data"
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    meta = json.loads((tiny["data"] / "dataset.json").read_text())
    meta["numTraining"] = len(names)
    (dst / "dataset.json").write_text(json.dumps(meta))
    for n in names:
        shutil.copy(tiny["data"] / "imagesTr" / f"{n}_0000.nii.gz", dst / "imagesTr")
        shutil.copy(tiny["data"] / "labelsTr" / f"{n}.nii.gz", dst / "labelsTr")
    return dst, names


def image_file(data: Path, name: str) -> Path:
    return data / "imagesTr" / f"{name}_0000.nii.gz"


def label_file(data: Path, name: str) -> Path:
    return data / "labelsTr" / f"{name}.nii.gz"


def rewrite(path: Path, fn: Callable[[np.ndarray], np.ndarray], affine_fn=None) -> None:
    img = nib.load(str(path))
    arr = fn(np.asarray(img.dataobj).copy())
    affine = img.affine if affine_fn is None else affine_fn(img.affine.copy())
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def set_value(value):
    def fn(arr):
        arr = arr.astype(np.float32)
        arr[tuple(s // 2 for s in arr.shape)] = value
        return arr
    return fn


# ---------------------------------------------------------------------------------------------- the catalogue
@dataclass
class BadInput:
    id: str
    expect: tuple[str, ...]  # substrings of the one error line
    data: Callable[[Path, list[str]], None] | None = None  # edits the dataset copy
    args: tuple[str, ...] = ()  # extra inference CLI arguments
    setting: str = "test"


def _shift_affine(a):
    a[0, 3] += 5.0
    return a


DATA_CASES = [
    BadInput("image-label-shape", ("shapes differ", "(64, 64, 23)", ".nii.gz"),
             lambda d, n: rewrite(label_file(d, n[0]), lambda a: a[:, :, :-1])),
    BadInput("image-label-affine", ("affines differ", "max |diff|"),
             lambda d, n: rewrite(label_file(d, n[0]), lambda a: a, _shift_affine)),
    BadInput("label-undeclared", ("label values [9]", "not declared in dataset.json"),
             lambda d, n: rewrite(label_file(d, n[0]), set_value(9))),
    BadInput("label-non-integer", ("non-integer values", "2.5"),
             lambda d, n: rewrite(label_file(d, n[0]), set_value(2.5))),
    BadInput("image-nan", ("1 NaN", "imagesTr", "finite"),
             lambda d, n: rewrite(image_file(d, n[0]), set_value(np.nan))),
    BadInput("image-inf", ("1 Inf", "imagesTr", "finite"),
             lambda d, n: rewrite(image_file(d, n[0]), set_value(np.inf))),
    BadInput("empty-mask-edit", ("no lesion voxels", "'icma'", "use ic"),
             lambda d, n: rewrite(label_file(d, n[0]), lambda a: np.zeros_like(a)), setting="icma"),
    BadInput("image-2d", ("3-D", "2-D"),
             lambda d, n: rewrite(image_file(d, n[0]), lambda a: a[:, :, 0])),
    BadInput("image-4d", ("4-D", "channel"),
             lambda d, n: rewrite(image_file(d, n[0]), lambda a: np.stack([a, a], axis=-1))),
    BadInput("fewer-slices-than-window", ("slices", "window", "--window"), args=("--window", "64")),
    BadInput("constant-image", ("constant", "7 everywhere"),
             lambda d, n: rewrite(image_file(d, n[0]), lambda a: np.full_like(a, 7))),
    BadInput("missing-label", ("label", "not found", "labelsTr"),
             lambda d, n: label_file(d, n[0]).unlink()),
    BadInput("extra-label", ("labelsTr", "stray.nii.gz", "no image"),
             lambda d, n: shutil.copy(label_file(d, n[0]), d / "labelsTr" / "stray.nii.gz")),
    BadInput("dataset-json-malformed", ("dataset.json", "not valid JSON"),
             lambda d, n: (d / "dataset.json").write_text("{labels: ")),
    BadInput("dataset-json-missing", ("no dataset.json",),
             lambda d, n: (d / "dataset.json").unlink()),
    BadInput("nifti-truncated", ("cannot read", "truncated", "imagesTr"),
             lambda d, n: image_file(d, n[0]).write_bytes(image_file(d, n[0]).read_bytes()[:400])),
]


def run_cli(dataset: str, setting: str, argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(dataset, setting, argv)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, expect) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "no error message"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{err}"
    if os.environ.get("GEM3D_CATALOGUE_LOG"):  # docs/reliability.md's table is made from these lines
        with open(os.environ["GEM3D_CATALOGUE_LOG"], "a") as log:
            log.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{lines[0]}\n")
    for part in expect:
        assert part in lines[0], f"{part!r} not in: {lines[0]}"


def no_outputs(out: Path) -> bool:
    return not any(p.name.endswith((".nii.gz", ".nii", ".png")) for p in out.rglob("*"))


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_bad_data_one_line_exit_2_no_output(case, tiny, tmp_path, capsys):
    data, names = dataset_copy(tiny, tmp_path)
    if case.data is not None:
        case.data(data, names)
    model = ["--model", str(tiny["volume_stage"])]
    out = tmp_path / "out"
    code, err = run_cli("demo", case.setting, ["--data", str(data), *model, "--out", str(out), "--steps", "2",
                                               "--no-progress", "--cases", "all", *case.args], capsys)
    assert_one_line_error(code, err, case.expect)
    assert no_outputs(out)


# a constant image and an empty mask are valid nnU-Net data: gem3d refuses them when it prepares a case
@pytest.mark.parametrize("case", [c for c in DATA_CASES if c.data is not None and c.id not in ("empty-mask-edit", "constant-image")],
                         ids=lambda c: c.id)
def test_dataset_checker_reports_the_same_problems(case, tiny, tmp_path, capsys):
    data, names = dataset_copy(tiny, tmp_path)
    case.data(data, names)
    code = check_main([str(data), "--min-slices", "4"])
    out = capsys.readouterr()
    assert code in (1, 2), out.out
    assert "Traceback" not in out.err


# ---------------------------------------------------------------------------------------------- config
def write_inference_config(tmp_path: Path, tiny, **edits) -> Path:
    config = yaml.safe_load((packaged("inference") / "demo.yaml").read_text())
    for key, value in edits.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "demo.yaml").write_text(yaml.safe_dump(config))
    return folder


CONFIG_CASES = [
    ("unknown-key", {"sampler.stepz": 10}, ("stepz", "did you mean", "steps")),
    ("wrong-type", {"sampler.steps": "ten"}, ("steps", "'ten'", "int")),
    ("steps-zero", {"sampler.steps": 0}, ("steps", "0", "positive")),
    ("overlap-ge-window", {"sampler.window": 4, "sampler.overlap": 4}, ("overlap", "window")),
    ("window-lt-2", {"sampler.window": 1, "sampler.overlap": 0}, ("window", ">= 2")),
    ("eta-negative", {"sampler.eta": -0.5}, ("eta", "-0.5", ">= 0")),
    ("samples-per-case-zero", {"samples_per_case": 0}, ("samples_per_case", "0", ">= 1")),
]


@pytest.mark.parametrize("case_id,edits,expect", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_inference_config(case_id, edits, expect, tiny, tmp_path, capsys):
    config_dir = write_inference_config(tmp_path, tiny, **edits)
    out = tmp_path / "out"
    code, err = run_cli("demo", "test", ["--data", str(tiny["data"]), "--model", str(tiny["volume_stage"]),
                                         "--out", str(out), "--no-progress", "--cases", "1",
                                         "--config-dir", str(config_dir)], capsys)
    assert_one_line_error(code, err, expect)
    assert no_outputs(out)


def test_checkpoint_not_fitting_its_config_names_keys_and_shapes(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny["volume_stage"], run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    key = "unet.input_blocks.0.0.weight"
    ckpt["state_dict"][key] = torch.zeros(3, 3, 3, 3)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    code, err = run_cli("demo", "test", ["--data", str(tiny["data"]), "--model", str(run), "--out",
                                         str(tmp_path / "out"), "--no-progress", "--cases", "1"], capsys)
    assert_one_line_error(code, err, ("input_blocks.0.0.weight (3, 3, 3, 3)", "(unet.*)", "do not fit"))


# ---------------------------------------------------------------------------------------------- main.py
def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = main_module.main(argv)
    return code, capsys.readouterr().err


MAIN_CASES = [
    ("base-missing", ["--base", "configs/latent-diffusion/nope.yaml", "-t"], ("--base", "nope.yaml", "no such file")),
    ("unknown-model-key", ["--base", "configs/latent-diffusion/demo_autoencoder.yaml", "-t", "model.params.kl_wieght=1"],
     ("kl_wieght", "did you mean 'kl_weight'")),
    ("placeholder-ckpt", ["--base", "configs/latent-diffusion/demo_stage2.yaml", "-t",
                          "model.params.ckpt_path=path-to-stage1"], ("model.params.ckpt_path", "placeholder")),
    ("missing-ckpt", ["--base", "configs/latent-diffusion/demo_stage2.yaml", "-t",
                      "model.params.ckpt_path=/nonexistent/last.ckpt"], ("model.params.ckpt_path", "no such file")),
    ("glob-unmatched-ckpt", ["--base", "configs/latent-diffusion/demo_stage2.yaml", "-t",
                             "model.params.ckpt_path=/nonexistent/*_demo_stage1"], ("no file or folder matches",)),
    ("resume-not-a-run", ["-r", "/tmp", "-t"], ("--resume", "/tmp", "no checkpoints/last.ckpt")),
]


@pytest.mark.parametrize("case_id,argv,expect", MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_bad_training_input(case_id, argv, expect, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, err = run_main([*argv, "-l", str(tmp_path / "logs"), f"data.params.dataset_dir={tiny['data']}"], capsys)
    assert_one_line_error(code, err, expect)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.ckpt"))


# ---------------------------------------------------------------------------------------------- runtime
def test_output_folder_not_writable(tiny, tmp_path, capsys):
    if os.geteuid() == 0:
        out = tmp_path / "file_not_folder"
        out.write_text("x")  # root ignores permission bits: a file where a folder must be fails for root too
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    code, err = run_cli("demo", "test", ["--data", str(tiny["data"]), "--model", str(tiny["volume_stage"]),
                                         "--out", str(out), "--no-progress", "--cases", "1", "--steps", "2"], capsys)
    assert_one_line_error(code, err, (str(out), "not a writable folder"))


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "previous")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new content")
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temporary file left


def test_two_runs_on_one_output_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "test").mkdir(parents=True)
    args = ["--data", str(tiny["data"]), "--model", str(tiny["volume_stage"]), "--out", str(out), "--no-progress",
            "--cases", "1", "--steps", "2"]
    with output_lock(out / "test"):  # a first run writes there
        code, err = run_cli("demo", "test", args, capsys)
    assert_one_line_error(code, err, ("another gem3d run", f"pid {os.getpid()} on", ".gem3d.lock"))
