"""Your own data through inference with no silently wrong result: the model's preprocessing, the image channel,
config files and overrides, lesion-only mask edits, --as-original, --part sharding and the rough edges of the engine
(ground truth only for ``test``, one shared autoencoder, the progress bar)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from gem3d.data import check
from gem3d.data.datasets import VolumeCache
from gem3d.data.nnunet import RawDataset, resolve_channel
from gem3d.data.preprocess import PreprocessConfig
from gem3d.export.manifest import Manifest
from gem3d.inference import cli, engine
from gem3d.inference.engine import Enhancer, first_stage_fingerprint, run_inference
from gem3d.inference.volume import SamplerOptions
from tests import _tiny_models
from tests.test_inference_engine import load, make_config, tiny  # noqa: F401 (the tiny models fixture)


def cli_config(tiny, setting, *argv, dataset="demo"):
    """``config_from_args`` for ``argv`` (flags and KEY=VALUE overrides), as the scripts parse them."""
    base = ["--data", str(tiny["data"]), "--model", str(tiny["volume_stage"]), "--slice-model", str(tiny["position"]),
            "--device", "cpu"]
    return cli.config_from_args(dataset, setting, cli.parse_args(dataset, setting, [*base, *map(str, argv)]))


# ---------------------------------------------------------------------------------------------- preprocessing
def test_the_models_own_preprocessing_wins_over_the_packaged_fallback(tiny):
    """brain.yaml's fallback (512 px, the paper's) once replaced a model's own 32 px preprocessing without a word."""
    cfg = cli_config(tiny, "test", dataset="brain")
    assert cfg.preprocess is None and cfg.fallback_preprocess["size"] == 512
    assert Enhancer(cfg).preprocess == PreprocessConfig.from_dict(_tiny_models.PREPROCESS)


def test_the_fallback_serves_models_that_carry_no_preprocessing(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny["volume_stage"], model)
    project = model / "configs" / "tiny-project.yaml"
    config = yaml.safe_load(project.read_text())
    del config["data"]["params"]["preprocess"]
    project.write_text(yaml.safe_dump(config))
    fallback = dict(_tiny_models.PREPROCESS, size=16)
    cfg = make_config(tiny, "test", tmp_path, model=model, fallback_preprocess=fallback)
    assert Enhancer(cfg).preprocess.size == 16
    with pytest.raises(ValueError, match="no preprocessing config: the model dir's config has no "
                                         "data.params.preprocess and the inference config has no fallback_preprocess"):
        Enhancer(make_config(tiny, "test", tmp_path, model=model))


def test_an_explicit_preprocessing_that_differs_from_the_models_is_refused_unless_forced(tiny, tmp_path):
    cfg = cli_config(tiny, "test", "preprocess.max_label=4")
    assert cfg.preprocess == {"max_label": 4}
    with pytest.raises(ValueError, match=r"the explicit preprocessing differs from the one .*last.ckpt was trained "
                                         r"with \(max_label: model 3 vs config 4\); .* --force-preprocess"):
        Enhancer(cfg)
    with pytest.warns(UserWarning, match=r"max_label: model 3 vs config 4\); using the config's"):
        forced = Enhancer(cli_config(tiny, "test", "--force-preprocess", "preprocess.max_label=4"))
    assert forced.preprocess.max_label == 4 and forced.preprocess.size == 32  # merged onto the model's own
    file = tmp_path / "mine.yaml"
    file.write_text("preprocess: {size: 32, max_label: 3, intensity: minmax, body: nonzero, slice_axis: 2}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = Enhancer(cli_config(tiny, "test", "--config", file))  # agrees with the model: no error, no warning
    assert same.preprocess == PreprocessConfig.from_dict(_tiny_models.PREPROCESS)


def test_config_files_and_dotlist_overrides_merge_in_order(tiny, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("seed: 9\nsampler: {steps: 10}\n")
    second.write_text("sampler: {steps: 5}\n")
    cfg = cli_config(tiny, "ic", "--config", first, "--config", second, "sampler.eta=0.5", "samples_per_case=2")
    assert (cfg.seed, cfg.sampler.steps, cfg.sampler.eta, cfg.samples_per_case) == (9, 5, 0.5, 2)
    assert cli_config(tiny, "ic", "--config", first, "--steps", "4").sampler.steps == 4  # flags come last
    with pytest.raises(ValueError, match=r"unknown key 'stepz' in sampler of .*demo.yaml \+ overrides; did you mean "
                                         r"'steps'"):
        cli_config(tiny, "ic", "sampler.stepz=3")
    with pytest.raises(FileNotFoundError, match=r"--config '.*nope.yaml': no such file"):
        cli_config(tiny, "ic", "--config", tmp_path / "nope.yaml")
    with pytest.raises(SystemExit):
        cli.parse_args("demo", "ic", ["--data", "x", "stray"])


# ---------------------------------------------------------------------------------------------- channels
@pytest.fixture()
def two_channels(tiny, tmp_path):
    """The tiny dataset with a second channel 'T2' (the image negated, plus 1000) and a case lacking it."""
    root = tmp_path / "two_channels"
    shutil.copytree(tiny["data"], root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(meta))
    for case in tiny["names"][:-1]:
        img = nib.load(str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        second = 1000.0 - np.asarray(img.dataobj, dtype=np.float32)
        nib.save(nib.Nifti1Image(second, img.affine, img.header), str(root / "imagesTr" / f"{case}_0001.nii.gz"))
    return root


def test_a_channel_is_chosen_by_index_or_name_and_checked(two_channels, tiny):
    names = {"0": "T1", "1": "T2"}
    assert [resolve_channel(names, c) for c in (None, 1, "1", "T2", "t2")] == [0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"channel 'FLAIR' is not in dataset.json channel_names; allowed \(index or "
                                         r"name\): 0 \('T1'\), 1 \('T2'\)$"):
        resolve_channel(names, "FLAIR")
    with pytest.warns(UserWarning, match=r"has 2 channels .*reading channel 0 \('T1'\) as none was chosen"):
        RawDataset(two_channels)
    dataset = RawDataset(two_channels, channel="T2")
    case = tiny["names"][0]
    first, second = RawDataset(two_channels, channel=0).load_case(case), dataset.load_case(case)
    np.testing.assert_allclose(second.image, 1000.0 - first.image)
    lacking = tiny["names"][-1]  # listed by its channel-0 file, so it fails loudly instead of vanishing
    assert lacking in dataset.case_names()
    with pytest.raises(FileNotFoundError, match=f"image of case '{lacking}' for channel 1 \\('T2'\\) not found"):
        dataset.load_case(lacking)


def test_inference_reads_the_chosen_channel_and_records_it(two_channels, tiny, tmp_path):
    case = tiny["names"][0]
    cfg = make_config(tiny, "test", tmp_path, data=two_channels, cases=case, channel="T2", previews=False)
    record = Manifest(run_inference(cfg)).records[0]
    assert record["channel"] == {"index": 1, "name": "T2"}
    gt = load(cfg.setting_dir / record["files"]["gt"])[0]
    real = nib.load(str(two_channels / "imagesTr" / f"{case}_0001.nii.gz")).get_fdata()
    np.testing.assert_allclose(gt, real, atol=1e-3)  # the ground truth (and the informed slice) are channel 1


def test_training_and_the_checker_read_the_chosen_channel(two_channels, tmp_path, capsys):
    cfg = PreprocessConfig(size=16, max_label=3)
    with pytest.warns(UserWarning, match="2 channels"):
        first = VolumeCache(two_channels, cfg, cache_dir=tmp_path / "cache")
    second = VolumeCache(two_channels, cfg, cache_dir=tmp_path / "cache", channel="T2")
    assert (first.dataset.channel, second.dataset.channel) == (0, 1)
    assert first.cache_dir != second.cache_dir  # one channel's cache is never read for another's
    summary = {}
    check.check_dataset(two_channels, min_slices=4, summary=summary, channel="t2")
    assert summary["channel"] == (1, "T2")
    assert check.main([str(two_channels), "--min-slices", "4", "--channel", "MRI"]) == 2
    assert "channel 'MRI' is not in" in capsys.readouterr().err
    assert check.channel_line(summary, "t2") == ("channel: gem3d will read channel 1 ('T2'), files <case>_0001 (of 2: "
                                                 "{'0': 'T1', '1': 'T2'}; as chosen)")


# ---------------------------------------------------------------------------------------------- mask edits
def test_icma_moves_only_the_configured_lesion_labels(tiny, tmp_path):
    case = tiny["names"][0]
    label_in = load(tiny["data"] / "labelsTr" / f"{case}.nii.gz")[0]
    assert {1, 3} <= set(np.unique(label_in))
    kept = (label_in > 0) & (label_in != 3)
    unchanged = {}
    for lesions in ([3], None):  # None: every label > 0 moves
        edit = {"distance": [2, 6], "reference_size": None, "lesion_labels": lesions, "flip_probability": 1.0}
        cfg = make_config(tiny, "icma", tmp_path / str(lesions), cases=case, mask_edit=edit, previews=False)
        record = Manifest(run_inference(cfg)).records[0]
        label = load(cfg.setting_dir / record["files"]["label"])[0]
        unchanged[str(lesions)] = float((label[kept] == label_in[kept]).mean())
        if lesions == [3]:  # labels 1, 2 never move: they stay, or lose voxels to the moved lesion (and its hole)
            assert set(np.unique(label[kept & (label != label_in)])) <= {0, 3}
            assert not np.any(np.isin(label, [1, 2]) & ~np.isin(label_in, [1, 2]))
            assert not np.array_equal(label == 3, label_in == 3)
    assert unchanged["[3]"] > 0.8 and unchanged["None"] < unchanged["[3]"] - 0.2, unchanged


def test_organ_datasets_move_nothing_until_lesion_labels_are_named(tiny, tmp_path):
    cfg = cli_config(tiny, "icma", "--out", tmp_path, "--no-previews", "--no-progress", "--steps", "2",
                     "--cases", tiny["names"][0], "--window", "8", dataset="abdomen")
    assert cfg.mask_edit["lesion_labels"] == [] and cfg.mask_edit["flip_probability"] == 0.0
    with pytest.raises(ValueError, match=r"mask_edit.lesion_labels is empty .* pass --lesion-labels 1,2"):
        run_inference(cfg)
    flags = cli_config(tiny, "icma", "--lesion-labels", "2,3", "--flip-probability", "0.25", "--max-degrees", "4",
                       "--shift-distance", "1,3", dataset="abdomen")
    assert {k: flags.mask_edit[k] for k in ("lesion_labels", "flip_probability", "max_degrees", "distance")} == {
        "lesion_labels": [2, 3], "flip_probability": 0.25, "max_degrees": 4.0, "distance": [1.0, 3.0]}
    with pytest.raises(ValueError, match="--shift-distance must be LO,HI"):
        cli_config(tiny, "icma", "--shift-distance", "5")


# ---------------------------------------------------------------------------------------------- --as-original
def test_as_original_sets_every_option_of_the_original_computation(tiny):
    args = cli.parse_args("brain", "ic", ["--data", str(tiny["data"]), "--model", "m", "--as-original"])
    cfg = cli.config_from_args("brain", "ic", args)
    sampler = cfg.sampler
    assert (sampler.sampler, sampler.steps, sampler.eta, sampler.window, sampler.overlap) == ("ddim", 200, 1.0, 16, 1)
    assert (sampler.known_noise, sampler.condition_posterior) == ("original", "sample")
    assert (sampler.clip_x0, sampler.slice_noise_correlation, sampler.informed_guidance, sampler.informed_start) == (
        None, 0.0, 1.0, 1.0)
    assert args.precision == "fp32" and (cfg.ema, cfg.slice_ema) == (False, False)
    assert cfg.donor == "original" and cfg.require_preprocessed
    demo = cli.config_from_args("demo", "ic", cli.parse_args("demo", "ic", ["--data", "x", "--as-original"]))
    assert demo.sampler.informed_start == 1.0  # the demo config's 0.5 gives way to the preset
    with pytest.raises(ValueError, match=r"conflicts with steps=50 \(the original: 200\), precision='bf16'"):
        cli.config_from_args("brain", "ic", cli.parse_args("brain", "ic", [
            "--data", "x", "--model", "m", "--as-original", "--steps", "50", "--precision", "bf16"]))


def test_as_original_refuses_a_raw_dataset(tiny, tmp_path):
    cfg = make_config(tiny, "ic", tmp_path, require_preprocessed=True)
    with pytest.raises(ValueError, match=r"--as-original runs the original's input: an nnU-Net preprocessed folder"):
        Enhancer(cfg)


def test_the_original_donor_draw(tiny, tmp_path):
    """The original's ic donor: any enhanced case (itself included), target s ~ randint(min(n_donor, n)), donor slice
    int(s / n * n_donor)."""
    enhancer = Enhancer(make_config(tiny, "ic", tmp_path, donor="original", cases="all"))
    rng = np.random.default_rng(0)
    donors = set()
    for _ in range(40):
        informed = enhancer.choose_informed(tiny["names"][0], 24, rng)
        n_donor = enhancer.prepared(informed.case).num_slices
        assert informed.index == int(informed.target_index / 24 * n_donor) and informed.rule == "original"
        assert informed.target_index < min(24, n_donor)
        donors.add(informed.case)
    assert tiny["names"][0] in donors and donors <= set(tiny["names"])
    with pytest.raises(ValueError, match=r"donor='nearest' is not one of \['other', 'original'\]"):
        make_config(tiny, "ic", tmp_path, donor="nearest")


# ---------------------------------------------------------------------------------------------- --part i/n
def test_parts_merge_into_the_manifest_of_one_run(tiny, tmp_path, capsys):
    cases = ",".join(tiny["names"][:3])
    whole = run_inference(make_config(tiny, "test", tmp_path / "one", cases=cases, previews=False))
    paths = [run_inference(make_config(tiny, "test", tmp_path / "parts", cases=cases, previews=False, part=(i, 2)))
             for i in (1, 0)]
    assert [p.name for p in paths] == ["manifest.rank1.json", "manifest.rank0.json"]
    setting_dir = tmp_path / "parts" / "test"
    assert cli.merge_parts_main([str(setting_dir), "--parts", "2"]) == 0
    merged = {r["case"]: r for r in Manifest(setting_dir / "manifest.json").records}
    assert sorted(merged) == sorted(tiny["names"][:3]) and not list(setting_dir.glob("manifest.rank*"))
    for record in Manifest(whole).records:
        a = load(whole.parent / record["files"]["image"])[0]
        b = load(setting_dir / merged[record["case"]]["files"]["image"])[0]
        assert np.array_equal(a, b) and merged[record["case"]]["seed"] == record["seed"]
    assert cli.merge_parts_main([str(setting_dir), "--parts", "3"]) == 1
    assert "parts [0, 1, 2] have no manifest" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--part must be I/N with 0 <= I < N \(e.g. 0/4 ... 3/4\), got '4/4'"):
        cli.parse_part("4/4")
    assert cli.main("demo", "test", ["--data", str(tiny["data"]), "--part", "0/2", "--gpus", "0,1"]) == 2
    assert "--part 0/2 runs one process" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- engine behaviour
def test_ground_truth_is_written_only_for_the_reconstruction_setting(tiny, tmp_path):
    case = tiny["names"][0]
    for setting, expected in (("test", True), ("ic", False), ("base", False)):
        cfg = make_config(tiny, setting, tmp_path, cases=case, previews=False)
        record = Manifest(run_inference(cfg)).records[0]
        assert ("gt" in record["files"]) == expected, setting
        assert (cfg.setting_dir / f"{case}_gt.nii.gz").exists() == expected, setting


def test_a_slice_model_with_another_autoencoder_is_refused(tiny, tmp_path):
    other = _tiny_models.build_model_dir(tmp_path / "other", "position", seed=7)  # its own random first stage
    with pytest.raises(ValueError, match=r"must share one autoencoder; their first stages differ: weights sha256 "):
        Enhancer(make_config(tiny, "ig", tmp_path, slice_model=other))
    scaled = tmp_path / "scaled"
    shutil.copytree(tiny["position"], scaled)
    ckpt = torch.load(scaled / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["first_stage_scale_factor"] = 0.5  # same weights, another latent scale
    torch.save(ckpt, scaled / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"scale factor 0.5 vs 0.18"):
        Enhancer(make_config(tiny, "ig", tmp_path, slice_model=scaled))
    shared = Enhancer(make_config(tiny, "ig", tmp_path))
    assert first_stage_fingerprint(shared.volume_model.model) == first_stage_fingerprint(shared.slice_model.model)


def test_original_known_noise_with_an_informed_start_is_refused():
    with pytest.raises(ValueError, match=r"known_noise='original' with informed_start=0.5: .*use known_noise="
                                         r"'timestep' or informed_start=1"):
        SamplerOptions(known_noise="original", informed_start=0.5)
    assert SamplerOptions(known_noise="original", informed_start=1.0).known_noise == "original"


def test_the_progress_bar_advances_when_a_sample_is_written(tiny, tmp_path, monkeypatch):
    cfg = make_config(tiny, "test", tmp_path, cases=",".join(tiny["names"][:2]), previews=False)
    seen = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            seen.append(len(Manifest(cfg.setting_dir / "manifest.json").records))

    monkeypatch.setattr(engine, "tqdm", Bar)
    run_inference(cfg)
    assert seen == [1, 2]  # each step after its sample is in the manifest


def test_the_packaged_configs_override_no_models_preprocessing():
    """Only a user's file or override is explicit: the packaged configs carry the fallback alone."""
    for dataset in ("brain", "abdomen", "demo"):
        config, explicit = cli.read_inference_config(dataset)
        assert explicit is None and "preprocess" not in config, dataset
    assert cli.read_inference_config("brain")[0]["fallback_preprocess"]["max_label"] == 3
    assert cli.read_inference_config("abdomen")[0]["fallback_preprocess"]["max_label"] == 4
