"""``preprocess.informed_labels: hidden``: the informed slice's labelled structures filled with its body tissue's
mean, the same way in training (clip / slice datasets, latent cache) and inference (the engine's informed slices);
``window_informed``: which latent later windows take as their informed slice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gem3d.data import datasets, preprocess
from gem3d.data.datasets import ClipDataset, LatentCache, SliceDataset, VolumeCache
from gem3d.data.preprocess import PreprocessConfig, hide_labels, informed_image
from gem3d.sampling.propagation import propagation
from gem3d.training.ldm import FirstStageLatentEncoder
from test_datasets import write_raw_dataset
from test_diffusion import S, make_model, perturb

HIDDEN = PreprocessConfig(size=S, max_label=3, informed_labels="hidden")


def test_hide_labels_fills_each_slice_with_its_own_tissue_mean():
    image = np.array([[[0.0, 1.0], [0.5, 0.2]], [[0.9, 0.7], [0.3, -1.0]], [[1.0, 1.0], [1.0, 1.0]]], np.float32)
    label = np.array([[[0, 1], [2, -1]], [[0, 3], [0, -1]], [[3, 3], [3, 3]]])
    out = hide_labels(image, label)
    np.testing.assert_allclose(out[0], [[0.0, 0.0], [0.0, 0.2]])  # tissue mean 0.0; outside the body kept
    np.testing.assert_allclose(out[1], [[0.9, 0.6], [0.3, -1.0]])  # tissue mean (0.9 + 0.3) / 2
    np.testing.assert_allclose(out[2], image[2])  # no tissue: the labelled voxels' own mean (here unchanged)
    assert out.dtype == np.float32 and not np.shares_memory(out, image)
    with pytest.raises(ValueError, match=r"image shape \(3, 2, 2\) differs from the label's \(2, 2\)"):
        hide_labels(image, label[0])


def test_informed_image_follows_the_config():
    image, label = np.full((4, 4), 0.5, np.float32), np.zeros((4, 4), int)
    image[1, 1], label[1, 1] = -0.8, 2
    np.testing.assert_array_equal(informed_image(image, label, PreprocessConfig()), image)
    assert informed_image(image, label, PreprocessConfig(informed_labels="hidden"))[1, 1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs the informed slice's labels"):
        informed_image(image, None, PreprocessConfig(informed_labels="hidden"))
    with pytest.raises(ValueError, match=r"informed_labels must be one of \('shown', 'hidden'\), got 'off'"):
        PreprocessConfig(informed_labels="off")


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "Dataset001_Tiny"
    write_raw_dataset(root, n_cases=3)
    return root


def test_training_items_hide_the_informed_slice_but_not_the_target(dataset):
    cache = VolumeCache(dataset, HIDDEN)
    item = ClipDataset(cache, cache.names, clip_len=6, seed=0, length=4)[1]
    prepared = cache.get(item["case"])
    k = item["start"] + item["informed_index"]
    expected = hide_labels(np.asarray(prepared.image[k]), np.asarray(prepared.label[k]))
    np.testing.assert_array_equal(item["informed"][0].numpy(), expected)
    assert (np.asarray(prepared.label[k]) > 0).any() and not np.array_equal(expected, prepared.image[k])
    np.testing.assert_array_equal(item["image"][:, 0].numpy(), prepared.image[item["start"]:item["start"] + 6])
    # the slice model learns slices as informed slices look: hidden too
    for s in (SliceDataset(cache, cache.names, seed=0, length=3)[i] for i in range(3)):
        source = cache.get(s["case"])
        np.testing.assert_array_equal(s["image"][0].numpy(),
                                      hide_labels(source.image[s["index"]], source.label[s["index"]]))


def test_slice_items_hide_their_slice_once(dataset, monkeypatch):
    """A slice item hides its slice's labels once: it once also made a hidden informed slice of the same slice and
    threw it away. The items are those of the one-slice clips they are, value for value."""
    cache = VolumeCache(dataset, HIDDEN)
    clips = ClipDataset(cache, cache.names, clip_len=1, seed=0, length=4, hidden_target=True)
    expected = [clips[i] for i in range(4)]
    calls = []

    def counting_hide_labels(image, label):
        calls.append(np.shape(image))
        return hide_labels(image, label)

    monkeypatch.setattr(datasets, "hide_labels", counting_hide_labels)
    monkeypatch.setattr(preprocess, "hide_labels", counting_hide_labels)  # informed_image's
    _ = clips[0]
    assert sorted(calls) == [(1, S, S), (S, S)]  # a clip: its target and its informed slice
    calls.clear()
    slices = SliceDataset(cache, cache.names, seed=0, length=4)
    items = [slices[i] for i in range(4)]
    assert calls == [(1, S, S)] * 4
    for item, clip in zip(items, expected):
        assert torch.equal(item["image"], clip["image"][0]) and torch.equal(item["mask"], clip["mask"][0])
        assert (item["index"], item["case"]) == (clip["start"], clip["case"])
        assert "informed" in clip and set(item) == {"image", "mask", "pos", "index", "case"}


def test_the_latent_cache_encodes_the_hidden_slices(dataset):
    torch.manual_seed(0)
    model = make_model("slice_stage")
    perturb(model.first_stage, seed=3)
    model.eval()
    volumes = VolumeCache(dataset, HIDDEN)
    assert volumes.cache_dir != VolumeCache(dataset, PreprocessConfig(size=S, max_label=3)).cache_dir
    latents = LatentCache(volumes, FirstStageLatentEncoder(model.first_stage))
    prepared = volumes.get("case_001")
    hidden = torch.from_numpy(hide_labels(prepared.image, prepared.label))[:, None]
    with torch.no_grad():
        expected = model.first_stage.encode(hidden, sample=False)
    torch.testing.assert_close(latents.mean("case_001", "informed_mean", 0, 20), expected, rtol=0, atol=1e-6)
    ds = ClipDataset(volumes, volumes.names, clip_len=6, seed=0, length=2)
    ds.use_latents(latents)
    item = ds[0]
    k = item["start"] + item["informed_index"]
    torch.testing.assert_close(item["informed_latent"], latents.mean(item["case"], "informed_mean", k, k + 1)[0])
    slices = SliceDataset(volumes, volumes.names, seed=0, length=2)
    slices.use_latents(latents)
    s = slices[0]  # drawn around the hidden slice's posterior mean, not the image's
    mean = latents.mean(s["case"], "informed_mean", s["index"], s["index"] + 1)
    image_mean = latents.mean(s["case"], "image_mean", s["index"], s["index"] + 1)
    assert float((s["latent"] - mean).abs().mean()) < float((s["latent"] - image_mean).abs().mean())


@pytest.mark.parametrize("window_informed", ["nearest", "first"])
def test_window_informed_picks_the_latent_of_later_windows(window_informed):
    real = torch.full((1, 2, 2), -5.0)
    steps = propagation(20, 8, real, window=6, overlap=1, window_informed=window_informed)
    jobs, seen = next(steps), []
    try:
        while True:
            seen.extend((job.window.direction, job.informed_latent) for job in jobs)
            # each generated slice's latent is its index, so the nearest generated slice is recognisable
            jobs = steps.send([torch.stack([torch.full((1, 2, 2), float(i)) for i in job.indices]) for job in jobs])
    except StopIteration:
        pass
    later = [(d, x) for d, x in seen if d != "first"]
    assert later and torch.equal(seen[0][1], real)
    if window_informed == "first":
        assert all(torch.equal(x, real) for _, x in later)
    else:
        assert all(float(x.flatten()[0]) >= 0 for _, x in later)
    with pytest.raises(ValueError, match=r"window_informed must be one of \('nearest', 'first'\), got 'x'"):
        next(propagation(20, 8, real, window=6, window_informed="x"))


def test_label_loss_weight_counts_labelled_pixels_more():
    from test_diffusion import make_model as make

    torch.manual_seed(0)
    model = make("slice_stage")
    model.label_loss_weight = 3.0
    grey = torch.full((1, 2, 1, 8, 8), -1.0)  # background everywhere ...
    grey[0, 0, 0, :4, :4] = 1.0  # ... but one labelled quarter of the first slice
    grey[0, 1, 0, :, :] = -1.7  # outside the body: weight 1
    weights = model.label_weights(grey, (2, 2))
    assert weights.shape == (1, 2, 1, 2, 2)
    torch.testing.assert_close(weights[0, 0, 0], torch.tensor([[4.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(weights[0, 1, 0], torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"label_loss_weight must be >= 0 \(0 = off\), got -1"):
        make("slice_stage", label_loss_weight=-1)
    with pytest.raises(ValueError, match="label_loss_weight=2.0 needs a variant with a mask; 'position' has none"):
        make("position", label_loss_weight=2.0)


def test_label_weighted_loss_is_plain_l2_without_labels_and_weighs_labelled_errors():
    from test_diffusion import clip_batch, make_model as make

    torch.manual_seed(0)
    plain, weighted = make("slice_stage"), make("slice_stage", label_loss_weight=5.0)
    weighted.load_state_dict(plain.state_dict())
    batch = clip_batch()
    batch["mask"] = torch.full_like(batch["mask"], -1.0)  # no labelled structure: weights all 1
    same = [m.loss(batch, torch.Generator().manual_seed(3)) for m in (plain, weighted)]
    torch.testing.assert_close(same[0], same[1])
    batch = clip_batch()  # random labels: the weighted loss differs
    losses = [m.loss(batch, torch.Generator().manual_seed(3)) for m in (plain, weighted)]
    assert not torch.allclose(losses[0], losses[1])
