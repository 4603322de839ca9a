"""Cache, splits, clip / slice / volume datasets and the LightningDataModule on tiny nnU-Net datasets."""
import json
from pathlib import Path
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from gem3d.data.datasets import (
    ClipDataset,
    EpochSampler,
    SliceDataset,
    VolumeCache,
    dataset_cache_dir,
    default_cache_root,
    default_splits_path,
    format_bytes,
    load_or_create_splits,
    make_splits,
    read_splits,
)
from gem3d.data.module import Gem3dDataModule
from gem3d.data.nnunet import RawDataset, open_dataset
from gem3d.data.preprocess import PreprocessConfig, contrast_variant, label_to_grey
from tests.test_nnunet_preprocessed import write_preprocessed_dataset

LABELS = {"background": 0, "edema": 1, "core": 2, "enhancing": 3}


def write_raw_dataset(root, n_cases=5, shape=(12, 10, 20), seed=0, labels=LABELS, affine=None):
    """Tiny nnU-Net raw dataset: nonzero 'head' box, a lesion with labels 1..3; (X, Y, Z) RAS, Z = slices."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    if affine is None:
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        affine[:3, 3] = [-10, -12, 5]
    names = []
    for i in range(n_cases):
        name = f"case_{i:03d}"
        image = np.zeros(shape, np.float32)
        image[1:-1, 1:-1, :] = rng.uniform(10, 100, size=(shape[0] - 2, shape[1] - 2, shape[2]))
        label = np.zeros(shape, np.uint8)
        cx, cy = rng.integers(3, shape[0] - 3), rng.integers(3, shape[1] - 3)
        label[cx - 2:cx + 2, cy - 2:cy + 2, 2:-2] = 1
        label[cx - 1:cx + 1, cy - 1:cy + 1, 4:-4] = 3
        label[cx, cy, 6:-6] = 2
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"{name}.nii.gz"))
        names.append(name)
    meta = {"channel_names": {"0": "FLAIR"}, "labels": labels, "numTraining": n_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return names


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "Dataset001_Tiny"
    write_raw_dataset(root)
    return root


CFG = PreprocessConfig(size=16, max_label=3)


def test_raw_dataset_reads_cases(dataset):
    ds = RawDataset(dataset)
    assert ds.case_names() == [f"case_{i:03d}" for i in range(5)] and ds.max_label == 3
    assert ds.case_names("Ts") == []
    case = ds.load_case("case_001")
    assert case.image.shape == (20, 12, 10) and case.geometry.spacing == (3.0, 2.0, 2.0)
    with pytest.raises(FileNotFoundError, match="case_999"):
        ds.load_case("case_999")
    assert isinstance(open_dataset(dataset), RawDataset)


def test_cache_is_reused_and_refreshed(dataset, tmp_path):
    cache = VolumeCache(dataset, CFG)
    prepared = cache.get("case_000")
    assert isinstance(prepared.image, np.memmap) and prepared.image.shape == (20, 16, 16)
    assert prepared.label.dtype == np.int16 and cache.prepared_count == 1
    assert cache.cache_dir.parent == dataset_cache_dir(dataset) and dataset not in cache.cache_dir.parents
    cache.prepare_all()
    assert cache.prepared_count == 5
    again = VolumeCache(dataset, CFG)
    np.testing.assert_array_equal(again.get("case_000").image, prepared.image)
    again.prepare_all()
    assert again.prepared_count == 0 and again.num_slices("case_003") == 20
    # a changed source file is prepared again; another config gets another folder
    src = dataset / "imagesTr" / "case_002_0000.nii.gz"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = VolumeCache(dataset, CFG)
    third.prepare_all()
    assert third.prepared_count == 1
    other = VolumeCache(dataset, PreprocessConfig(size=8), cache_dir=tmp_path / "elsewhere")
    assert other.cache_dir != cache.cache_dir and other.get("case_000").image.shape == (20, 8, 8)
    with pytest.raises(KeyError, match="case_999"):
        cache.get("case_999")
    with pytest.raises(ValueError, match="max_label=2"):
        VolumeCache(dataset, PreprocessConfig(size=16, max_label=2))


def test_clip_dataset_shapes_ranges_determinism(dataset):
    cache = VolumeCache(dataset, CFG)
    names = cache.names
    ds = ClipDataset(cache, names, clip_len=6, seed=3, length=10)
    assert len(ds) == 10
    item = ds[4]
    assert item["image"].shape == (6, 1, 16, 16) and item["mask"].shape == (6, 1, 16, 16)
    assert item["informed"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert 0 <= item["informed_index"] < 6 and 0 <= item["start"] <= 20 - 6
    torch.testing.assert_close(item["informed"], item["image"][item["informed_index"]])
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    levels = torch.from_numpy(label_to_grey(np.arange(-1, 4), 3))
    assert torch.isin(item["mask"], levels).all() and item["case"] in names
    # 10 items over 5 cases: every case twice per epoch; with 3 items per epoch, all cases still come up
    assert sorted(ds[i]["case"] for i in range(10)) == sorted(names * 2)
    few = ClipDataset(cache, names, clip_len=6, seed=3, length=3)
    assert {few[i]["case"] for i in range(15)} == set(names)
    prepared = cache.get(item["case"])
    np.testing.assert_array_equal(item["image"][:, 0].numpy(),
                                  prepared.image[item["start"]:item["start"] + 6])
    # deterministic for (seed, index, epoch); epochs differ; index + len addresses the next epoch
    same = ClipDataset(cache, names, clip_len=6, seed=3, length=10)
    starts = [(ds[i]["start"], ds[i]["informed_index"]) for i in range(10)]
    assert starts == [(same[i]["start"], same[i]["informed_index"]) for i in range(10)]
    ahead = [(ds[i + 10]["start"], ds[i + 10]["informed_index"]) for i in range(10)]
    assert ahead != starts
    other_seed = ClipDataset(cache, names, clip_len=6, seed=4, length=10)
    assert [(other_seed[i]["start"], other_seed[i]["informed_index"]) for i in range(10)] != starts


def test_clip_dataset_refuses_short_cases(dataset):
    cache = VolumeCache(dataset, CFG)
    with pytest.raises(ValueError, match=r"fewer slices than clip_len=21.*'case_000': 20"):
        ClipDataset(cache, cache.names, clip_len=21)


def test_slice_dataset(dataset):
    cache = VolumeCache(dataset, CFG)
    ds = SliceDataset(cache, cache.names[:2], seed=1, length=7)
    items = [ds[i] for i in range(7)]
    for item in items:
        assert item["image"].shape == (1, 16, 16) and item["mask"].shape == (1, 16, 16)
        assert item["pos"].dtype == torch.float32 and 0 <= float(item["pos"]) < 1
        assert float(item["pos"]) == pytest.approx(item["index"] / 20)
        np.testing.assert_array_equal(item["image"][0].numpy(), cache.get(item["case"]).image[item["index"]])
    assert [i["index"] for i in items] == [SliceDataset(cache, cache.names[:2], seed=1, length=7)[k]["index"]
                                            for k in range(7)]


def test_splits_deterministic_disjoint_complete(tmp_path):
    names = [f"c{i:02d}" for i in range(23)]
    a = make_splits(names, seed=5, val_fraction=0.2, test_fraction=0.1)
    assert a == make_splits(list(reversed(names)), seed=5, val_fraction=0.2, test_fraction=0.1)
    assert a != make_splits(names, seed=6, val_fraction=0.2, test_fraction=0.1)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (16, 5, 2)
    assert sorted(a["train"] + a["val"] + a["test"]) == names
    assert not (set(a["train"]) & set(a["val"])) and not (set(a["val"]) & set(a["test"]))
    small = make_splits(["x", "y"], val_fraction=0.2, test_fraction=0.2)
    assert len(small["train"]) == 1 and len(small["val"]) + len(small["test"]) == 1
    with pytest.raises(ValueError, match="val_fraction must lie in"):
        make_splits(names, val_fraction=1.5)
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**a, "seed": 5}))
    assert read_splits(path) == a
    nnunet = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a", "c"], "val": ["b"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(nnunet))
    assert read_splits(tmp_path / "splits_final.json", fold=1) == {"train": ["a", "c"], "val": ["b"], "test": []}


def test_load_or_create_splits_writes_once(dataset):
    splits = load_or_create_splits(dataset, seed=0, val_fraction=0.4)
    written = dataset_cache_dir(dataset) / "splits.json"
    assert written.is_file() and not (dataset / "splits.json").exists() and len(splits["val"]) == 2
    assert default_splits_path(dataset) == written
    # an existing file wins over new arguments (the split is a record, not recomputed)
    assert load_or_create_splits(dataset, seed=9, val_fraction=0.2) == splits
    written.unlink()
    (dataset / "splits.json").write_text(json.dumps({"train": ["ghost"], "val": []}))  # the dataset's own wins
    assert default_splits_path(dataset) == dataset / "splits.json"
    with pytest.raises(ValueError, match=r"not in the dataset: \['ghost'\]"):
        load_or_create_splits(dataset)


def test_epoch_sampler_moves_items_to_the_next_epoch():
    sampler = EpochSampler(4, shuffle=True, seed=0)
    first = list(sampler)
    assert sorted(first) == [0, 1, 2, 3]
    sampler.set_epoch(2)
    assert sorted(list(sampler)) == [8, 9, 10, 11]
    assert list(EpochSampler(4, shuffle=False)) == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["clip", "slice"])
def test_datamodule_uses_train_and_val_splits(dataset, kind):
    dm = Gem3dDataModule(dataset, kind=kind, preprocess={"size": 16, "max_label": 3}, clip_len=4, batch_size=2,
                         seed=0, val_fraction=0.4, samples_per_epoch=6)
    dm.prepare_data()
    dm.setup("fit")
    train_cases, val_cases = set(dm.splits["train"]), set(dm.splits["val"])
    assert len(val_cases) == 2 and not train_cases & val_cases
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    batch = batches[0]
    expected = (2, 4, 1, 16, 16) if kind == "clip" else (2, 1, 16, 16)
    assert batch["image"].shape == expected and batch["mask"].shape == expected
    assert {c for b in batches for c in b["case"]} <= train_cases
    val = list(dm.val_dataloader())
    assert {c for b in val for c in b["case"]} == val_cases
    if kind == "clip":
        assert batch["informed"].shape == (2, 1, 16, 16) and batch["informed_index"].shape == (2,)
    else:
        assert batch["pos"].shape == (2,)
    with pytest.raises(ValueError, match=r"kind must be one of \('clip', 'slice'\)"):
        Gem3dDataModule(dataset, kind="volume")


def test_preprocessed_folder_through_the_cache(tmp_path):
    write_preprocessed_dataset(tmp_path / "Dataset002_Pre", "npz", cases=("p_0", "p_1"))
    cache = VolumeCache(tmp_path / "Dataset002_Pre", PreprocessConfig(size=8, max_label=1, body="none"))
    assert cache.names == ["p_0", "p_1"]
    prepared = cache.get("p_1")
    case = cache.dataset.load_case("p_1")
    assert prepared.image.shape == (4, 8, 8) and prepared.geometry == case.geometry
    assert (case.label[..., 0] == -1).all() and (case.label[..., 1:] != -1).all()  # seg[:, 0] = -1 on the source
    assert (prepared.label[..., 0] == -1).all() and (prepared.label[..., -1] != -1).all()
    item = ClipDataset(cache, cache.names, clip_len=4)[0]
    assert item["mask"].min() == pytest.approx(-3.0)  # -1 - 2/max_label with max_label 1


def test_contrast_variant_inverts_and_bends_inside_the_body_only():
    image = np.array([[[-1.0, -0.6, 0.0, 0.6]]], np.float32)  # (1, 1, 4): background, then u = 0.2, 0.5, 0.8
    body = image > -1
    inverted = contrast_variant(image, body, invert=True)
    np.testing.assert_allclose(inverted, [[[-1.0, 0.6, 0.0, -0.6]]], atol=1e-6)  # the body's range is kept
    bent = contrast_variant(image, body, gamma=2.0)
    np.testing.assert_allclose(bent, [[[-1.0, 2 * 0.04 - 1, 2 * 0.25 - 1, 2 * 0.64 - 1]]], atol=1e-6)
    np.testing.assert_array_equal(contrast_variant(image, body), image)
    with pytest.raises(ValueError, match="gamma must be > 0, got -1"):
        contrast_variant(image, body, gamma=-1)


def test_contrast_variants_are_train_cases_with_their_own_informed_slice(dataset):
    dm = Gem3dDataModule(dataset, kind="clip", preprocess={"size": 16, "max_label": 3}, clip_len=4, seed=0,
                         val_fraction=0.4, samples_per_epoch=40, contrast_variants=[{"invert": True, "gamma": 0.5}])
    dm.setup("fit")
    train = dm.splits["train"]
    assert dm.train_set.names == train + [f"{n}~inv-g0.5" for n in train]
    assert dm.val_set.names == dm.splits["val"]  # validation stays on the real contrast
    original, variant = dm.cache.get(train[0]), dm.cache.get(f"{train[0]}~inv-g0.5")
    body = np.asarray(original.label) >= 0
    np.testing.assert_allclose(variant.image, contrast_variant(original.image, body, invert=True, gamma=0.5))
    np.testing.assert_array_equal(variant.label, original.label)
    assert dm.cache.num_slices(variant.name) == original.num_slices
    items = [dm.train_set[i] for i in range(40)]
    for item in (i for i in items if "~" in i["case"]):
        prepared = dm.cache.get(item["case"])
        np.testing.assert_array_equal(item["informed"][0], prepared.image[item["start"] + item["informed_index"]])
    assert any("~" in i["case"] for i in items) and any("~" not in i["case"] for i in items)
    with pytest.raises(ValueError, match=r"invert \(bool\) and gamma \(> 0\), got \{'gamma': 0\}"):
        Gem3dDataModule(dataset, contrast_variants=[{"gamma": 0}])
    with pytest.raises(KeyError, match="case 'nope' not in"):
        dm.cache.get("nope~g2")


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_read_only_dataset_trains_from_the_cache_outside_it(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("GEM3D_CACHE", str(tmp_path / "cache"))
    before = _tree(dataset)
    modes = {p: p.stat().st_mode for p in [dataset, *dataset.rglob("*")]}
    for path in modes:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        dm = Gem3dDataModule(dataset, kind="clip", preprocess={"size": 16, "max_label": 3}, clip_len=4, seed=0,
                             val_fraction=0.4, samples_per_epoch=2)
        dm.prepare_data()
        dm.setup("fit")
        assert next(iter(dm.train_dataloader()))["image"].shape == (1, 4, 1, 16, 16)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert _tree(dataset) == before  # nothing written into the dataset (root ignores the permission bits)
    home = tmp_path / "cache" / f"{dataset.name}-{dataset_cache_dir(dataset).name.rsplit('-', 1)[1]}"
    assert dataset_cache_dir(dataset) == home and (home / "splits.json").is_file()
    assert dm.cache.cache_dir.parent == home


def test_cache_root_and_explicit_paths(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("GEM3D_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "gem3d"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_root() == Path.home() / ".cache" / "gem3d"
    other = tmp_path / "elsewhere" / dataset.name  # the same folder name, another dataset: another cache
    assert dataset_cache_dir(other).name != dataset_cache_dir(dataset).name
    monkeypatch.setenv("GEM3D_CACHE", str(tmp_path / "unused"))
    dm = Gem3dDataModule(dataset, preprocess={"size": 16, "max_label": 3}, clip_len=4, val_fraction=0.4,
                         cache_dir=tmp_path / "mine", splits_path=tmp_path / "s" / "my_splits.json")
    dm.setup("fit")
    assert dm.cache.cache_dir.parent == tmp_path / "mine" and (tmp_path / "s" / "my_splits.json").is_file()
    assert not (tmp_path / "unused").exists()


def test_size_estimate_from_headers_matches_the_prepared_cache(dataset, capsys):
    cache = VolumeCache(dataset, CFG)
    estimate = cache.estimate_bytes(latent_channels=4, downsample_factor=4)
    assert not any(cache.cache_dir.glob("*.npy"))  # estimated before anything is prepared
    assert estimate["slices"] == 5 * 20  # (12, 10, 20) images, slices along the third (RAS z) axis
    cache.prepare_all()
    written = sum(p.stat().st_size for p in cache.cache_dir.glob("*.npy"))
    assert abs(written - estimate["volumes"]) / estimate["volumes"] < 0.05  # .npy headers only
    assert estimate["latents"] == 5 * 20 * 3 * 4 * 4 * 4 * 4
    assert format_bytes(1_500_000_000) == "1.5 GB" and format_bytes(999) == "999 B"
    dm = Gem3dDataModule(dataset, preprocess={"size": 16, "max_label": 3}, clip_len=4, val_fraction=0.4)
    dm.prepare_data()
    out = capsys.readouterr().out
    assert f"5 cases, about 100 slices: volumes {format_bytes(estimate['volumes'])}" in out


class _CountingEncoder:
    """A latent encoder (mean = 2x2 average pooling, std 1) that counts the slices it encodes."""

    key = "counting0"
    scale_factor = 1.0
    latent_channels = 1
    downsample_factor = 2

    def __init__(self):
        self.slices = 0

    def __call__(self, images):
        self.slices += images.shape[0]
        mean = torch.nn.functional.avg_pool2d(images, 2)
        return mean, torch.ones_like(mean)


def test_ranks_encode_disjoint_shares_that_cover_every_case(dataset):
    shares = []
    for rank in range(2):
        dm = Gem3dDataModule(dataset, preprocess={"size": 16, "max_label": 3}, clip_len=4, val_fraction=0.4)
        latents = dm.attach_first_stage(_CountingEncoder(), part=(rank, 2))
        shares.append(latents.encoded_count)
    assert shares == [3, 2]  # 5 cases: rank 0 encodes 3 (names[0::2]), rank 1 the other 2
    again = Gem3dDataModule(dataset, preprocess={"size": 16, "max_label": 3}, clip_len=4, val_fraction=0.4)
    encoder = _CountingEncoder()
    again.attach_first_stage(encoder)
    assert again.latents.encoded_count == 0 and encoder.slices == 0  # all cached by the two shares
    with pytest.raises(ValueError, match=r"part must be \(index, count\) with 0 <= index < count, got \(2, 2\)"):
        again.attach_first_stage(encoder, part=(2, 2))
