"""gem3d.inference.engine / model_dir: every setting end to end on tiny models and a tiny demo dataset."""
from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
import pytest
import torch

from gem3d.data.nnunet import RawDataset
from gem3d.data.preprocess import PreprocessConfig, compute_body_mask
from gem3d.export.manifest import Manifest, make_record
from gem3d.export.preview import TITLE_HEIGHT
from gem3d.files import file_sha256
from gem3d.inference.engine import Enhancer, InferenceConfig, SharedClock, merge_rank_manifests, run_inference
from gem3d.model_dirs import load_model_dir
from gem3d.inference.settings import SETTINGS, Setting
from gem3d.inference.volume import SamplerOptions, informed_start_latents, label_region_latent, sample_volume_latents
from tests import _tiny_models

EDIT = {"distance": [2, 6], "reference_size": None}
RECORD_FIELDS = {"case", "setting", "sample", "seed", "informed", "mask_edits", "sampler", "steps",
                 "checkpoint_sha256", "seconds", "files"}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return _tiny_models.tiny_setup(tmp_path_factory)


def make_config(tiny, setting: str, out: Path, **overrides) -> InferenceConfig:
    model = tiny["baseline_volume"] if setting == "base" else tiny["volume_stage"]
    kwargs = dict(setting=setting, data=tiny["data"], out=out, model=model, slice_model=tiny["position"],
                  sampler=SamplerOptions(steps=2), progress=False, mask_edit=EDIT)
    kwargs.update(overrides)
    return InferenceConfig(**kwargs)


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def body_mask(tiny, case: str) -> np.ndarray:
    """The body region the engine uses, on the source grid."""
    loaded = RawDataset(tiny["data"]).load_case(case)
    cfg = PreprocessConfig.from_dict(_tiny_models.PREPROCESS)
    return loaded.geometry.to_source(compute_body_mask(loaded.image, cfg) | (loaded.label > 0))


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Every setting on an axis-aligned case and the oblique one: {setting: (setting_dir, manifest records)}."""
    out = tmp_path_factory.mktemp("all_settings")
    cases = f"{tiny['names'][0]},{tiny['oblique']}"
    result = {}
    for setting in SETTINGS:
        path = run_inference(make_config(tiny, setting, out, cases=cases))
        result[setting] = (path.parent, Manifest(path).records)
    return result


def test_every_setting_writes_its_samples_on_the_input_label_grid(tiny, runs):
    for setting, (folder, records) in runs.items():
        assert folder.name == setting
        assert sorted(r["case"] for r in records) == sorted([tiny["names"][0], tiny["oblique"]]), setting
        for record in records:
            case = record["case"]
            label_in, affine_in = load(tiny["data"] / "labelsTr" / f"{case}.nii.gz")
            image_in, _ = load(tiny["data"] / "imagesTr" / f"{case}_0000.nii.gz")
            files = record["files"]
            image, affine = load(folder / files["image"])
            assert image.shape == label_in.shape and np.array_equal(affine, affine_in), (setting, case)
            assert np.isfinite(image).all()
            span = float(image_in.max() - image_in.min())  # intensities restored to the input's range
            assert image.min() >= image_in.min() - 1e-3 * span and image.max() <= image_in.max() + 1e-3 * span
            assert (folder / files["preview"]).is_file()
            with Image.open(folder / files["preview"]) as handle:  # a row for the informed slice when there is one
                rows = round((handle.size[1] - TITLE_HEIGHT) / (TITLE_HEIGHT + handle.size[0] / 3))
            informed = record["informed"]["source"] != "none"
            assert rows == 2 + int(setting != "slice") + int(informed), (setting, rows)
            if setting == "slice":
                assert "label" not in files
                continue
            label, label_affine = load(folder / files["label"])
            assert label.shape == label_in.shape and np.array_equal(label_affine, affine_in), (setting, case)
            if SETTINGS[setting].mask == "own":
                assert np.array_equal(label, label_in), (setting, case)
                assert ("gt" in files) == (setting == "test"), setting  # the real image is only test's ground truth
            if "gt" in files:
                gt, gt_affine = load(folder / files["gt"])
                assert np.array_equal(gt_affine, affine_in) and np.allclose(gt, image_in)
            if SETTINGS[setting].mask != "own":
                # edited: lesions stay inside the body (the demo's nonzero brain, holes filled), labels stay valid
                assert label.min() >= 0 and label.max() <= 3
                assert set(np.unique(label)) <= set(np.unique(label_in))
                assert not np.any((label > 0) & ~body_mask(tiny, case)), (setting, case)
                assert (label > 0).sum() > 0 and not np.array_equal(label, label_in)


def test_oblique_case_is_really_oblique_and_permuted(tiny):
    _, affine = load(tiny["data"] / "labelsTr" / f"{tiny['oblique']}.nii.gz")
    assert nib.aff2axcodes(affine) != ("R", "A", "S")
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    assert np.abs(direction).max(axis=0).min() < 0.99  # not aligned with the world axes


def test_manifest_records_describe_each_sample(tiny, runs):
    sha = file_sha256(tiny["volume_stage"] / "checkpoints" / "last.ckpt")
    for setting, (folder, records) in runs.items():
        on_disk = json.loads((folder / "manifest.json").read_text())["records"]
        assert len(on_disk) == len(records) == 2
        for record in records:
            assert RECORD_FIELDS <= set(record), setting
            assert record["setting"] == setting and record["sample"] == 0
            assert record["sampler"]["sampler"] == "ddim" and record["steps"] == 2
            assert record["seconds"] > 0 and len(record["checkpoint_sha256"]) == 64
            assert all((folder / f).is_file() for f in record["files"].values())
            informed = record["informed"]
            source = SETTINGS[setting].informed
            assert informed["source"] == source
            if source == "other_case":
                assert informed["case"] in tiny["names"] and informed["case"] != record["case"]
                assert 0 <= informed["position"] <= 1 and isinstance(informed["index"], int)
            elif source == "own_middle":
                assert informed["case"] == record["case"] and informed["index"] == 24 // 2
            elif source == "generated":
                assert 0 <= informed["position"] <= 1
            if SETTINGS[setting].mask == "edited":
                assert record["mask_edits"][0]["edit"] == "icma_edit"
                assert [s["edit"] for s in record["mask_edits"][0]["steps"]] == ["rotate", "flip", "move_toward_centre"]
            else:
                assert record["mask_edits"] == []
    assert all(r["checkpoint_sha256"] == sha for r in runs["ic"][1])


def test_rerun_skips_finished_samples_and_regenerates_deleted_ones(tiny, tmp_path, monkeypatch):
    cases = f"{tiny['names'][0]},{tiny['names'][1]}"
    manifest = run_inference(make_config(tiny, "test", tmp_path, cases=cases))
    folder = manifest.parent
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    calls = []
    original = Enhancer.sample

    def counting(self, case, k):
        calls.append((case, k))
        return original(self, case, k)

    monkeypatch.setattr(Enhancer, "sample", counting)
    run_inference(make_config(tiny, "test", tmp_path, cases=cases))
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    deleted = folder / f"{tiny['names'][1]}_s0_image.nii.gz"
    deleted.unlink()
    run_inference(make_config(tiny, "test", tmp_path, cases=cases))
    assert calls == [(tiny["names"][1], 0)]
    assert deleted.is_file()
    untouched = [p for p in files if tiny["names"][0] in p.name]
    assert untouched and all(p.stat().st_mtime_ns == mtimes[p] for p in untouched)
    assert len(Manifest(manifest).records) == 2


def test_same_seed_same_output_other_seed_differs(tiny, tmp_path):
    case = tiny["names"][0]
    images = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        path = run_inference(make_config(tiny, "ic", tmp_path / name, cases=case, seed=seed, previews=False))
        record = Manifest(path).records[0]
        images[name] = (load(path.parent / record["files"]["image"])[0], record["informed"])
    assert np.array_equal(images["a"][0], images["b"][0]) and images["a"][1] == images["b"][1]
    assert not np.array_equal(images["a"][0], images["c"][0])


def test_counterfactual_informed_from_uses_that_case_and_position(tiny, tmp_path):
    case, donor = tiny["names"][0], tiny["names"][2]
    path = run_inference(make_config(tiny, "ic", tmp_path, cases=case, informed_from=f"{donor}:0.5", previews=False))
    informed = Manifest(path).records[0]["informed"]
    assert informed["case"] == donor and informed["position"] == 0.5
    assert informed["index"] == 12 and informed["target_index"] == 12


def test_informed_select_brightest_and_darkest_pick_different_donors(tiny, tmp_path):
    case = tiny["names"][0]
    picked = {}
    for rule in ("brightest", "darkest"):
        path = run_inference(make_config(tiny, "ic", tmp_path / rule, cases=case, informed_select=rule, previews=False))
        informed = Manifest(path).records[0]["informed"]
        assert informed["rule"] == rule
        picked[rule] = informed
    assert picked["brightest"]["position"] == picked["darkest"]["position"]  # same seed: same candidate position
    assert picked["brightest"]["case"] != picked["darkest"]["case"]
    # the choice follows the mean normalised intensity inside the body at that position
    enhancer = Enhancer(make_config(tiny, "ic", tmp_path / "x", cases=case))
    pos = picked["brightest"]["position"]

    def brightness(name):
        prepared = enhancer.prepared(name)
        index = min(int(pos * prepared.num_slices), prepared.num_slices - 1)
        return float(prepared.image[index][prepared.label[index] >= 0].mean())

    donors = [n for n in tiny["names"] if n != case]
    values = {n: brightness(n) for n in donors}
    assert picked["brightest"]["case"] == max(values, key=values.get)
    assert picked["darkest"]["case"] == min(values, key=values.get)


def test_several_samples_per_case_have_their_own_seeds(tiny, tmp_path):
    path = run_inference(make_config(tiny, "base", tmp_path, cases=1, samples_per_case=2, previews=False))
    records = Manifest(path).records
    assert [r["sample"] for r in records] == [0, 1] and records[0]["seed"] != records[1]["seed"]
    a, b = (load(path.parent / r["files"]["image"])[0] for r in records)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "setting,overrides,error,match",
    [
        ("ig", {"informed_from": "x"}, ValueError, "use ic or icma"),
        ("test", {"informed_select": "brightest"}, ValueError, "use ic or icma"),
        ("ic", {"informed_select": "loudest"}, ValueError, "informed_select='loudest'"),
        ("ic", {"informed_from": "a:1.5"}, ValueError, r"position must be in \[0, 1\]"),
        ("ic", {"informed_from": "a:mid"}, ValueError, "must be a number"),
        ("ic", {"model": None}, ValueError, "needs a volume model dir"),
        ("ig", {"slice_model": None}, ValueError, "needs a slice model dir"),
        ("ic", {"samples_per_case": 0}, ValueError, "samples_per_case"),
        ("nope", {}, ValueError, "unknown inference setting 'nope'"),
    ],
)
def test_config_errors_name_the_problem(tiny, tmp_path, setting, overrides, error, match):
    with pytest.raises(error, match=match):
        make_config(tiny, setting, tmp_path, **overrides)


def test_enhancer_errors_name_the_problem(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown case"):
        Enhancer(make_config(tiny, "test", tmp_path, cases="nope")).select_cases()
    with pytest.raises(ValueError, match="not in"):
        Enhancer(make_config(tiny, "ic", tmp_path, informed_from="nope:0.5"))
    with pytest.raises(ValueError, match="needs a baseline model"):
        Enhancer(make_config(tiny, "base", tmp_path, model=tiny["volume_stage"]))
    with pytest.raises(ValueError, match="not 'position'"):
        Enhancer(make_config(tiny, "ig", tmp_path, slice_model=tiny["volume_stage"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Enhancer(make_config(tiny, "test", tmp_path, model=tmp_path / "missing"))


def test_load_model_dir_reads_a_training_run(tiny):
    loaded = load_model_dir(tiny["volume_stage"])
    assert loaded.kind == "run" and loaded.model.variant == "volume_stage" and not loaded.model.training
    assert loaded.preprocess["size"] == 32 and loaded.preprocess["max_label"] == 3
    assert loaded.sha256 == file_sha256(tiny["volume_stage"] / "checkpoints" / "last.ckpt")
    assert load_model_dir(tiny["volume_stage"] / "checkpoints" / "last.ckpt").model.variant == "volume_stage"


def test_stage1_alone_runs_the_gem3d_settings(tiny, tmp_path):
    """The evaluation's "stage 1 alone" row: a stage-1 model (no volumetric layers) through the same engine."""
    stage1 = _tiny_models.build_model_dir(tmp_path / "stage1", "slice_stage", seed=5)
    name = [n for n in tiny["names"] if n != tiny["oblique"]][0]
    manifest = run_inference(make_config(tiny, "test", tmp_path / "out", model=stage1, cases=name))
    (record,) = Manifest(manifest).records
    image, affine = load(tmp_path / "out" / "test" / record["files"]["image"])
    _, label_affine = load(tiny["data"] / "labelsTr" / f"{name}.nii.gz")
    assert np.allclose(affine, label_affine) and np.isfinite(image).all() and image.std() > 0


def test_batch_windows_leaves_the_samples_unchanged(tiny, tmp_path):
    """Cases sampled in lockstep (their windows in shared UNet calls, plans of different lengths) give the same
    volumes as one case at a time."""
    images = {}
    for batch in (1, 3):
        config = make_config(tiny, "ic", tmp_path / f"b{batch}", cases="all", previews=False,
                             sampler=SamplerOptions(steps=2, batch_windows=batch))
        records = Manifest(run_inference(config)).records
        assert len(records) == len(tiny["names"])
        images[batch] = {r["case"]: load(config.setting_dir / r["files"]["image"])[0] for r in records}
    assert images[3].keys() == images[1].keys()
    for case, image in images[1].items():
        np.testing.assert_allclose(images[3][case], image, atol=1e-4)
    with pytest.raises(ValueError, match="batch_windows must be an int >= 1, got 0"):
        SamplerOptions(batch_windows=0)



def test_volumes_in_lockstep_split_the_runs_seconds(tiny, tmp_path):
    """With batch_windows > 1 each record's seconds is the volume's share of the run (its own loading, decoding and
    writing, and its part of each shared sampling round), so the shares add up to the run's wall time instead of
    counting a shared round once per volume."""
    for batch in (1, 3):
        config = make_config(tiny, "ic", tmp_path / f"b{batch}", cases="all", previews=False,
                             sampler=SamplerOptions(steps=2, batch_windows=batch))
        enhancer = Enhancer(config)
        t0 = time.perf_counter()
        records = Manifest(enhancer.run()).records
        wall = time.perf_counter() - t0
        seconds = [r["seconds"] for r in records]
        assert len(seconds) == len(tiny["names"]) >= 3 and min(seconds) > 0
        assert 0.7 * wall < sum(seconds) <= wall


def test_shared_clock_splits_each_round_among_the_volumes_in_it():
    """SharedClock (on a clock the test moves): a round of two volumes costs each half its time; a volume's own steps
    count in full."""
    now = [0.0]
    clock = SharedClock(clock=lambda: now[0])

    def advance(seconds):
        now[0] += seconds

    def one_round(jobs):  # a shared sampling round: 0.2 s, one output per volume
        advance(0.2)
        return [None] * len(jobs)

    rounds = clock.shared(one_round)

    def volume(own_before: float, own_after: float):
        advance(own_before)
        yield ["job"]
        advance(own_after)
        return {"seconds": None}

    a, b = clock.timed(volume(0.1, 0.05)), clock.timed(volume(0.0, 0.0))
    outputs = rounds([next(a), next(b)])
    done = []
    for stepper, out in zip((a, b), outputs):
        with pytest.raises(StopIteration) as stop:
            stepper.send(out)
        done.append(stop.value.value["seconds"])
    assert done == [pytest.approx(0.25), pytest.approx(0.1)]  # 0.1 + 0.2 / 2 + 0.05, and 0.2 / 2
    assert sum(done) == pytest.approx(now[0])  # the shares add up to the time that passed


def test_informed_start_begins_each_slice_from_the_informed_slice_inside_its_body(tiny, tmp_path):
    """SDEdit from the informed slice: a tiny strength keeps the start (the informed slice on each slice's body tissue,
    its mean on labelled structures, background outside); cases sampled together still give the same volumes; 1 is
    off."""
    name = [n for n in tiny["names"] if n != tiny["oblique"]][0]
    images = {}
    for start, batch in ((1.0, 1), (0.5, 1), (0.5, 2)):
        config = make_config(tiny, "test", tmp_path / f"s{start}-{batch}", cases="all", previews=False,
                             sampler=SamplerOptions(steps=4, informed_start=start, batch_windows=batch))
        records = Manifest(run_inference(config)).records
        images[start, batch] = {r["case"]: load(config.setting_dir / r["files"]["image"])[0] for r in records}
    for case, image in images[0.5, 1].items():
        np.testing.assert_allclose(images[0.5, 2][case], image, atol=1e-4)
        assert not np.allclose(images[1.0, 1][case], image, atol=1e-3)
    model = load_model_dir(tiny["volume_stage"]).model
    informed = torch.rand(16, 16) * 1.5 - 0.5  # in the body: > -1
    labels = torch.full((6, 16, 16), -1)
    labels[:, 4:12, 4:12] = 0  # body tissue
    labels[2:4, 6:9, 6:9] = 3  # a structure on two slices
    starts = informed_start_latents(model, informed, labels)
    image = torch.full((6, 16, 16), -1.0)
    image[:, 4:12, 4:12] = informed[4:12, 4:12]
    # the mask says what is there, not the informed slice's pixels: their mean inside the labels' body
    image[2:4, 6:9, 6:9] = informed[4:12, 4:12].mean()
    with torch.no_grad():
        expected = model.first_stage.encode(image[:, None])
    torch.testing.assert_close(starts, expected)
    mask_latent = torch.zeros_like(starts)
    options = SamplerOptions(steps=50, eta=0.0, window=4, informed_start=0.02)  # one step, at t = 21
    near = sample_volume_latents(model, mask_latent, starts[0], 0, options, torch.Generator().manual_seed(0), starts)
    far = sample_volume_latents(model, mask_latent, starts[0], 0, SamplerOptions(steps=50, eta=0.0, window=4),
                                torch.Generator().manual_seed(0), starts)
    assert (near - starts).abs().mean() < 0.2 * (far - starts).abs().mean()
    with pytest.raises(ValueError, match=r"informed_start must lie in \(0, 1\] \(1 = off: from pure noise\), got 0"):
        SamplerOptions(informed_start=0)


def test_label_start_samples_the_labelled_structures_from_an_earlier_level(tiny, tmp_path):
    """label_start: the latent region of the labelled structures (max over each latent pixel's patch) starts earlier;
    the volumes change, cases sampled together still match cases sampled alone; bad values fail with the range."""
    labels = np.full((2, 8, 8), -1)
    labels[:, 1:7, 1:7] = 0
    labels[0, 5, 2] = 2
    region = label_region_latent(labels, (2, 2))
    assert region.shape == (2, 1, 2, 2) and region.sum() == 1 and region[0, 0, 1, 0] == 1
    with pytest.raises(ValueError, match=r"labels of in-plane shape \(8, 8\) do not tile the latent grid \(3, 3\)"):
        label_region_latent(labels, (3, 3))
    with pytest.raises(ValueError, match=r"label_start must be None or lie in \[informed_start, 1\] = \[0.7, 1\], "
                                         r"got 0.5"):
        SamplerOptions(informed_start=0.7, label_start=0.5)
    images = {}
    for label_start, batch in ((None, 1), (1.0, 1), (1.0, 2)):
        config = make_config(tiny, "test", tmp_path / f"l{label_start}-{batch}", cases="all", previews=False,
                             sampler=SamplerOptions(steps=4, informed_start=0.5, label_start=label_start,
                                                    batch_windows=batch))
        records = Manifest(run_inference(config)).records
        images[label_start, batch] = {r["case"]: load(config.setting_dir / r["files"]["image"])[0] for r in records}
    for case, image in images[1.0, 1].items():
        np.testing.assert_allclose(images[1.0, 2][case], image, atol=1e-4)
        assert not np.allclose(images[None, 1][case], image, atol=1e-3)


def test_background_real_keeps_the_real_voxels_outside_the_body_and_the_sample_inside(tiny, tmp_path):
    """background='real': outside the body the written volume is the real case's (its exact zeros), inside it is the
    generated volume of the same seed, voxel for voxel; recorded in the manifest; bad values fail with the choices."""
    name = [n for n in tiny["names"] if n != tiny["oblique"]][0]
    written = {}
    for background in ("generated", "real"):
        config = make_config(tiny, "test", tmp_path / background, cases=name, previews=False, background=background)
        record, = Manifest(run_inference(config)).records
        assert record["background"] == background
        written[background] = load(config.setting_dir / record["files"]["image"])[0]
    real = np.asarray(nib.load(str(RawDataset(tiny["data"]).image_path(name))).dataobj, dtype=np.float32)
    body = body_mask(tiny, name)
    assert (~body).any() and body.any()
    np.testing.assert_array_equal(written["real"][~body], real[~body])
    np.testing.assert_array_equal(written["real"][body], written["generated"][body])
    assert not np.array_equal(written["generated"][~body], real[~body])  # the decoded background differs
    with pytest.raises(ValueError, match=r"background='zeros' is not one of \['generated', 'real'\]"):
        make_config(tiny, "test", tmp_path / "bad", background="zeros")


def test_a_setting_row_names_only_known_sources():
    with pytest.raises(ValueError, match=r"Setting 'odd': mask='painted' is not one of \['own', 'edited', 'none'\]"):
        Setting("odd", informed="none", mask="painted", model="baseline")
    assert Setting("fine", informed="none", mask="own", model="baseline").needs_volume_model


@pytest.mark.parametrize("slice_axis, lr_axis", [(2, 1), (0, 0)])
def test_icma_flips_left_right_whatever_the_slice_axis(tiny, tmp_path, slice_axis, lr_axis):
    preprocess = dict(_tiny_models.PREPROCESS, slice_axis=slice_axis)
    cfg = make_config(tiny, "icma", tmp_path, cases=tiny["names"][0], preprocess=preprocess, previews=False,
                      force_preprocess=True)  # another slice axis than the model was trained with
    records = Manifest(run_inference(cfg)).records
    flip = [step for step in records[0]["mask_edits"][0]["steps"] if step["edit"] == "flip"]
    assert [step["axis"] for step in flip] == [lr_axis]


def test_sharded_ranks_merge_into_one_manifest(tiny, tmp_path):
    cases = ",".join(tiny["names"][:3])
    cfg = make_config(tiny, "test", tmp_path, cases=cases, previews=False)
    stale = dict(make_record(tiny["names"][0], "test", 0, seed=-1), note="from an earlier run")
    Manifest(cfg.setting_dir / "manifest.json").add(stale)
    own = [Enhancer(cfg).run(rank=rank, world_size=2) for rank in range(2)]
    assert [p.name for p in own] == ["manifest.rank0.json", "manifest.rank1.json"]
    assert sorted(len(Manifest(p)) for p in own) == [1, 2]
    merged = merge_rank_manifests(cfg.setting_dir, world_size=2)
    records = Manifest(merged).records
    assert sorted(r["case"] for r in records) == sorted(tiny["names"][:3])
    assert all("note" not in r and r["seed"] >= 0 for r in records)  # the regenerated sample replaced the stale one
    assert sorted(p.name for p in cfg.setting_dir.glob("manifest*.json")) == ["manifest.json"]


def test_a_one_device_inference_script_does_not_import_lightning():
    """Each demo inference run is its own process: Lightning (for sharded runs only) would add seconds to each."""
    import subprocess
    import sys

    code = "import sys, gem3d.inference.cli; print('lightning' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": ""}, cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "False", done.stderr
