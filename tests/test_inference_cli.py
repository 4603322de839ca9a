"""scripts/inference_<dataset>_<setting>.py and gem3d.inference.cli: the shared command line, errors, sharding."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import child_env
from gem3d.export.manifest import Manifest
from gem3d.inference import cli
from gem3d.inference.engine import InferenceConfig, run_inference
from gem3d.inference.settings import SETTINGS
from gem3d.inference.volume import SamplerOptions
from tests import _tiny_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return _tiny_models.tiny_setup(tmp_path_factory)


def run_script(script: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    env = child_env(PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_dataset_and_setting_has_a_thin_script():
    for dataset in ("brain", "abdomen", "demo"):
        assert (cli.CONFIG_DIR / f"{dataset}.yaml").is_file()
        for setting in SETTINGS:
            script = ROOT / "scripts" / f"inference_{dataset}_{setting}.py"
            text = script.read_text()
            assert f'main(dataset="{dataset}", setting="{setting}")' in text
            assert len(text.splitlines()) <= 10 and "sys.path" not in text


def test_demo_test_script_runs_end_to_end(tiny, tmp_path):
    result = run_script("inference_demo_test.py", "--data", tiny["data"], "--model", tiny["volume_stage"],
                        "--out", tmp_path, "--steps", "2", "--no-progress", "--cases", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test: samples and manifest in" in result.stdout
    records = Manifest(tmp_path / "test" / "manifest.json").records
    assert [r["case"] for r in records] == tiny["names"][:2]
    assert all((tmp_path / "test" / f).is_file() for r in records for f in r["files"].values())


def test_missing_model_dir_exits_2_with_a_clear_message(tiny, tmp_path, capsys):
    code = cli.main("demo", "ic", ["--data", str(tiny["data"]), "--model", str(tmp_path / "no_model"),
                                   "--out", str(tmp_path), "--steps", "2", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model dir") and "no_model" in err and "does not exist" in err


def _main(tiny, setting, *args, dataset="demo"):
    base = ["--data", str(tiny["data"]), "--model", str(tiny["volume_stage"]), "--slice-model", str(tiny["position"]),
            "--steps", "2", "--no-progress", "--no-previews"]
    return cli.main(dataset, setting, base + [str(a) for a in args])


@pytest.mark.parametrize(
    "setting,args,message",
    [
        ("test", ["--cases", "GEM3DDemo_000,nope"], "unknown case(s) ['nope']"),
        ("ig", ["--informed-from", "GEM3DDemo_001"], "use ic or icma"),
        ("ic", ["--informed-from", "nope:0.5"], "'nope' is not in"),
        ("test", ["--steps", "3"], "steps=3"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(tiny, tmp_path, capsys, setting, args, message):
    assert _main(tiny, setting, "--out", tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / setting / "manifest.json").exists() or not Manifest(tmp_path / setting / "manifest.json").records


def test_sampler_option_flags(tiny):
    def sampler(*flags):
        args = cli.build_parser("demo", "icma").parse_args(["--data", str(tiny["data"]), *flags])
        return cli.config_from_args("demo", "icma", args).sampler

    # the demo config starts from the informed slice (measured to help the demo models); the paper configs do not
    assert (sampler().clip_x0, sampler().slice_noise_correlation, sampler().informed_start) == (None, 0.8, 0.7)
    paper = cli.config_from_args("brain", "icma", cli.build_parser("brain", "icma").parse_args(
        ["--data", str(tiny["data"]), "--model", "m"])).sampler
    assert (paper.clip_x0, paper.informed_start) == (None, 1.0)
    options = sampler("--clip-x0", "2.5", "--slice-noise-correlation", "0.3", "--informed-start", "0.4",
                      "--window-informed", "first")
    assert (options.clip_x0, options.slice_noise_correlation, options.informed_start) == (2.5, 0.3, 0.4)
    assert (options.window_informed, sampler().window_informed) == ("first", "nearest")
    with pytest.raises(ValueError, match=r"slice_noise_correlation must be a float in \[0, 1\), got 1.0"):
        sampler("--slice-noise-correlation", "1")


def test_flags_override_the_dataset_config(tiny, tmp_path):
    args = cli.build_parser("demo", "icma").parse_args(
        ["--data", str(tiny["data"]), "--model", "m", "--out", str(tmp_path), "--steps", "4", "--sampler", "dpmpp",
         "--window", "8", "--overlap", "2", "--seed", "5", "--cases", "3", "--samples-per-case", "2", "--no-ema",
         "--informed-select", "darkest", "--informed-guidance", "2.5"])
    cfg = cli.config_from_args("demo", "icma", args)
    assert (cfg.sampler.steps, cfg.sampler.sampler, cfg.sampler.window, cfg.sampler.overlap) == (4, "dpmpp", 8, 2)
    assert cfg.sampler.informed_guidance == 2.5
    assert cfg.sampler.eta == 1.0 and cfg.sampler.known_noise == "timestep"  # from gem3d/configs/inference/demo.yaml
    assert (cfg.seed, cfg.cases, cfg.samples_per_case, cfg.ema, cfg.informed_select) == (5, "3", 2, False, "darkest")
    assert cfg.model == Path("m") and cfg.mask_edit["distance"] == [4, 10] and cfg.device == "cpu"
    assert cfg.slice_ema is None  # --no-ema is the volume model's; the slice model keeps its own default
    ig = cli.config_from_args("demo", "ig", cli.build_parser("demo", "ig").parse_args(
        ["--data", str(tiny["data"]), "--model", "m", "--slice-model", "s", "--no-ema", "--slice-ema"]))
    assert (ig.ema, ig.slice_ema) == (False, True)
    defaults = cli.config_from_args("demo", "base", cli.build_parser("demo", "base").parse_args([]))
    assert defaults.model == Path("demo_out/models/demo_base")


def test_label_start_and_background_come_from_the_config_and_the_flags(tiny):
    def config(dataset, *flags):
        args = cli.build_parser(dataset, "icma").parse_args(["--data", str(tiny["data"]), "--model", "m", *flags])
        return cli.config_from_args(dataset, "icma", args)

    assert (config("demo").background, config("brain").background, config("abdomen").background) == (
        "real", "real", "generated")  # skull-stripped MRI keep their zeros; CT keeps its decoded background
    assert config("demo", "--background", "generated").background == "generated"
    assert config("demo").sampler.label_start is None
    assert config("demo", "--label-start", "1.0").sampler.label_start == 1.0
    with pytest.raises(ValueError, match=r"--as-original runs the original computation; it conflicts with "
                                         r"background='real' \(the original: 'generated'\)"):
        config("brain", "--as-original", "--background", "real")
    assert config("brain", "--as-original").background == "generated"


def test_default_split_cases_fall_back_to_all_cases_without_splits_json(tmp_path, capsys):
    def cases(data, *argv):
        return cli.config_from_args("demo", "ic", cli.build_parser("demo", "ic").parse_args(["--data", str(data), *argv])).cases

    assert cli.load_inference_config("demo")["cases"] == "split:test"  # the reported cases; val is for tuning
    assert cases(tmp_path) == "all"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"{tmp_path} has no splits.json" in out and "all cases" in out
    assert cases(tmp_path, "--cases", "split:val") == "split:val"  # asked for explicitly: the engine says it is missing
    (tmp_path / "splits.json").write_text('{"train": [], "val": [], "test": []}')
    assert cases(tmp_path) == "split:test" and capsys.readouterr().out == ""


def test_refused_checkpoint_exits_2_naming_the_trust_flag(tiny, tmp_path, capsys):
    """A checkpoint holding a non-allowlisted pickled object: exit 2 with the --trust-checkpoint hint, no traceback."""
    import shutil

    import torch

    model_dir = tmp_path / "model"
    shutil.copytree(Path(tiny["volume_stage"]), model_dir)
    ckpt_path = model_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["callbacks"] = {"x": _Unlisted()}
    torch.save(ckpt, ckpt_path)
    code = cli.main("demo", "test", ["--data", str(tiny["data"]), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                                     "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "--trust-checkpoint" in err and "_Unlisted" in err


class _Unlisted:
    pass


def test_sharding_over_two_processes_matches_one_process(tiny, tmp_path):
    cases = "3"
    sampler = SamplerOptions(**{**cli.load_inference_config("demo")["sampler"], "steps": 2})  # what the script uses
    background = cli.load_inference_config("demo")["background"]  # what the script uses
    one = run_inference(InferenceConfig(setting="ic", data=tiny["data"], out=tmp_path / "one", model=tiny["volume_stage"],
                                        cases=cases, sampler=sampler, progress=False, previews=False,
                                        background=background))
    result = run_script("inference_demo_ic.py", "--data", tiny["data"], "--model", tiny["volume_stage"],
                        "--out", tmp_path / "two", "--steps", "2", "--no-progress", "--no-previews", "--cases", cases,
                        "--num-processes", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ic: samples and manifest in") == 1
    folder = tmp_path / "two" / "ic"
    assert sorted(p.name for p in folder.glob("manifest*.json")) == ["manifest.json"]  # no rank files left
    single, sharded = Manifest(one).records, Manifest(folder / "manifest.json").records
    assert [r["case"] for r in sharded] == [r["case"] for r in single] == tiny["names"][:3]
    for a, b in zip(single, sharded):
        assert (a["seed"], a["informed"], a["files"]) == (b["seed"], b["informed"], b["files"])
        image_a = np.asarray(nib.load(str(one.parent / a["files"]["image"])).dataobj)
        image_b = np.asarray(nib.load(str(folder / b["files"]["image"])).dataobj)
        np.testing.assert_allclose(image_a, image_b, rtol=1e-5, atol=1e-4 * float(np.abs(image_a).max()))
