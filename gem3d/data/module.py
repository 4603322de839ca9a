"""LightningDataModule over an nnU-Net dataset: cache, splits, clip or slice datasets. The train loader resumes
mid-epoch: its ``state_dict`` (epoch, batches trained) goes into every checkpoint."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader

from .datasets import (
    ClipDataset,
    EpochSampler,
    LatentCache,
    LatentEncoder,
    SliceDataset,
    VARIANT_MARK,
    VolumeCache,
    default_splits_path,
    format_bytes,
    load_or_create_splits,
    variant_name,
)
from .preprocess import PreprocessConfig

KINDS = ("clip", "slice")


def share_of(names: list[str], part: tuple[int, int]) -> list[str]:
    """The names of share ``part = (index, count)``: every ``count``-th case from ``index`` in sorted order, each
    with its contrast variants (so no two shares prepare the same case)."""
    index, count = part
    if not 0 <= index < count:
        raise ValueError(f"part must be (index, count) with 0 <= index < count, got {part!r}")
    mine = set(sorted({n.split(VARIANT_MARK)[0] for n in names})[index::count])
    return [n for n in names if n.split(VARIANT_MARK)[0] in mine]


class _SkipOnResume:
    """The loader's batch sampler, whose next iteration skips the batches a resumed run already trained (indices
    only: the skipped items are never loaded)."""

    def __init__(self, loader: "ResumableDataLoader", batch_sampler):
        self.loader, self.batch_sampler = loader, batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(self.batch_sampler, self.loader._skipping, None)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning saves and restores with the checkpoint. ``position()``: ``(epoch, batches of it
    trained)``, from the trainer (Lightning fetches one batch ahead). ``load_state_dict`` sets the sampler's epoch
    and makes the next iterator skip those batches, so a resumed run sees the uninterrupted order."""

    def __init__(self, dataset, position: Callable[[], tuple[int, int]] | None = None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.position = position
        self.skip_batches = 0  # set by load_state_dict, used by the next iterator
        self._skipping = 0

    @property
    def _index_sampler(self):  # torch's DataLoader iterators draw their batches of indices from here
        return _SkipOnResume(self, super()._index_sampler)

    def __iter__(self):
        # the iterator may call iter(_index_sampler) more than once while it starts (worker processes)
        self._skipping, self.skip_batches = self.skip_batches, 0
        try:
            return super().__iter__()
        finally:
            self._skipping = 0

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.position() if self.position is not None else (getattr(self.sampler, "epoch", 0), 0)
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(state["epoch"]))
        self.skip_batches = int(state["batches"])


class Gem3dDataModule(L.LightningDataModule):
    """train: random clips/slices of the train split (`samples_per_epoch` items, new every epoch); val: one fixed
    item per val case. `preprocess`: a PreprocessConfig dict. `latent_cache`: once the model hands its first stage
    over (:meth:`attach_first_stage`), items carry cached latents, so no training step runs the encoder.
    `contrast_variants`: ``[{invert, gamma}, ...]``, each train case also in these contrasts (with its informed
    slice: ``preprocess.contrast_variant``), so that the contrast can only be read from the informed slice.
    `informed_slices`: a clip's informed slice is a slice of the ``clip`` (the paper) or of the whole ``volume``.
    `channel`: the image channel of a multi-channel dataset (index or dataset.json name; None: 0).
    `cache_dir`: the folder of the prepared volumes and latents (default: :func:`gem3d.data.datasets.dataset_cache_dir`,
    outside the dataset); `splits_path`: the splits file (default: :func:`gem3d.data.datasets.default_splits_path`).
    Under DDP every rank prepares and encodes its share of the cases (:func:`share_of`), then they wait for each
    other once."""

    def __init__(self, dataset_dir: str | Path, kind: str = "clip", preprocess: dict[str, Any] | None = None,
                 clip_len: int = 16, batch_size: int = 1, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.2, samples_per_epoch: int | None = None, cache_dir: str | Path | None = None,
                 test_fraction: float = 0.0, splits_path: str | Path | None = None, latent_cache: bool = True,
                 contrast_variants: list[dict] | None = None, channel: int | str | None = None,
                 informed_slices: str = "clip"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset_dir = Path(dataset_dir)
        self.kind = kind
        self.preprocess = PreprocessConfig.from_dict(dict(preprocess or {}))
        self.clip_len, self.batch_size, self.num_workers = int(clip_len), int(batch_size), int(num_workers)
        self.seed, self.val_fraction, self.test_fraction = int(seed), float(val_fraction), float(test_fraction)
        self.samples_per_epoch = samples_per_epoch
        self.cache_dir, self.splits_path = cache_dir, splits_path
        self.channel = channel  # image channel: index or dataset.json channel name (None: 0)
        self.latent_cache = bool(latent_cache)
        self.informed_slices = informed_slices
        self.contrast_variants = [dict(v) for v in contrast_variants or []]
        for variant in self.contrast_variants:
            if not set(variant) <= {"invert", "gamma"} or float(variant.get("gamma", 1.0)) <= 0:
                raise ValueError(f"a contrast variant takes invert (bool) and gamma (> 0), got {variant!r}")
        self.cache: VolumeCache | None = None
        self.latents: LatentCache | None = None
        self.splits: dict[str, list[str]] | None = None
        self.train_set = self.val_set = None

    def cache_and_splits(self) -> tuple[VolumeCache, dict[str, list[str]]]:
        """The volume cache and the splits (read, or made and written), without preparing any case."""
        cache = VolumeCache(self.dataset_dir, self.preprocess, cache_dir=self.cache_dir, channel=self.channel)
        path = self.splits_path if self.splits_path is not None else default_splits_path(self.dataset_dir,
                                                                                         self.cache_dir)
        return cache, load_or_create_splits(self.dataset_dir, cache.names, seed=self.seed, path=path,
                                            val_fraction=self.val_fraction, test_fraction=self.test_fraction)

    def prepare_data(self) -> None:
        """Write the splits once (main process) and print the cache's size estimate; the cases are prepared in
        :meth:`setup`, each rank its share."""
        cache, _ = self.cache_and_splits()
        self.print_estimate(cache)

    def print_estimate(self, cache: VolumeCache, latent_channels: int = 0, downsample_factor: int = 8) -> dict:
        """Print how much the cache will hold (from the image headers), before anything is prepared."""
        estimate = cache.estimate_bytes(latent_channels=latent_channels, downsample_factor=downsample_factor)
        latents = f", latents {format_bytes(estimate['latents'])}" if latent_channels else ""
        print(f"cache {cache.cache_dir}: {len(cache.names)} cases, about {estimate['slices']} slices: volumes "
              f"{format_bytes(estimate['volumes'])}{latents} (estimate from the image headers)", flush=True)
        return estimate

    def _rank_share(self) -> tuple[int, int]:
        """``(rank, world size)`` of the attached trainer, ``(0, 1)`` without one."""
        trainer = self.trainer
        return (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)

    def _barrier(self, name: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            self.trainer.strategy.barrier(name)

    def _make(self, names: list[str], length: int | None, seed: int):
        if self.kind == "clip":
            return ClipDataset(self.cache, names, clip_len=self.clip_len, seed=seed, length=length,
                               informed_slices=self.informed_slices)
        return SliceDataset(self.cache, names, seed=seed, length=length)

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.cache, self.splits = self.cache_and_splits()
            rank, world = self._rank_share()
            self.cache.prepare_all(share_of(self.cache.names, (rank, world)))  # each rank its share, then all read
            self._barrier("gem3d_volume_cache")
            if not self.splits["train"]:
                raise ValueError(f"the train split of {self.dataset_dir} is empty: {self.splits}")
            train = self.train_names(self.splits)
            self.train_set = self._make(train, self.samples_per_epoch, self.seed)
            self.val_set = self._make(self.splits["val"], None, self.seed + 1) if self.splits["val"] else None

    def train_names(self, splits: dict[str, list[str]]) -> list[str]:
        """The train cases, each also under the names of its contrast variants."""
        return splits["train"] + [variant_name(n, **v) for n in splits["train"] for v in self.contrast_variants]

    def train_position(self) -> tuple[int, int]:
        """``(epoch, batches of it trained)`` of the attached trainer: where a resumed run goes on."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        epochs = trainer.fit_loop.epoch_progress.current
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if epochs.started <= epochs.processed:  # between two epochs
            return epochs.processed, 0
        if batches >= trainer.num_training_batches:  # the last batch of the epoch is done
            return epochs.processed + 1, 0
        return epochs.processed, batches

    def attach_first_stage(self, encoder: LatentEncoder, part: tuple[int, int] = (0, 1)) -> LatentCache | None:
        """Encode share ``part = (index, count)`` of the train and val cases (:func:`share_of`) with
        ``encoder`` once (reused while the preprocessing, the encoder's key and the source files stay the same) and
        make the datasets return latents, encoding any case still missing when it is first read; None when
        ``latent_cache`` is off."""
        if not self.latent_cache:
            return None
        self.setup()
        names = share_of(self.train_set.names + self.splits["val"], part)
        self.latents = LatentCache(self.cache, encoder)
        if part[0] == 0 and getattr(encoder, "latent_channels", None):
            self.print_estimate(self.cache, int(encoder.latent_channels), int(getattr(encoder, "downsample_factor", 8)))
        self.latents.encode_all(names)
        for dataset in (self.train_set, self.val_set):
            if dataset is not None:
                dataset.use_latents(self.latents)
        return self.latents

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        # own generator: creating an iterator must not draw from the global RNG, which a resumed run restores
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                                   sampler=EpochSampler(len(self.train_set), shuffle=True, seed=self.seed),
                                   persistent_workers=self.num_workers > 0, drop_last=False,
                                   generator=torch.Generator().manual_seed(self.seed), position=self.train_position)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_set is None:
            return []
        # a fixed epoch: validation sees the same clips every time
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed))
