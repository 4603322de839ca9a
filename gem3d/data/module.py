"""LightningDataModule over an nnU-Net dataset: cache, splits, clip or slice datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from .datasets import ClipDataset, EpochSampler, SliceDataset, VolumeCache, VolumeDataset, load_or_create_splits
from .preprocess import PreprocessConfig

KINDS = ("clip", "slice")


class Gem3dDataModule(L.LightningDataModule):
    """train: the train split (random clips/slices, `samples_per_epoch` items, changing every epoch);
    val: the val split (one fixed item per case). `preprocess` is a PreprocessConfig dict."""

    def __init__(self, dataset_dir: str | Path, kind: str = "clip", preprocess: dict[str, Any] | None = None,
                 clip_len: int = 16, batch_size: int = 1, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.2, samples_per_epoch: int | None = None, cache_dir: str | Path | None = None,
                 test_fraction: float = 0.0, splits_path: str | Path | None = None):
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
        self.cache: VolumeCache | None = None
        self.splits: dict[str, list[str]] | None = None
        self.train_set = self.val_set = None

    def prepare_data(self) -> None:
        """Fill the cache and write splits.json once (main process)."""
        cache = VolumeCache(self.dataset_dir, self.preprocess, cache_dir=self.cache_dir)
        cache.prepare_all(progress=False)
        load_or_create_splits(self.dataset_dir, cache.names, seed=self.seed, val_fraction=self.val_fraction,
                              test_fraction=self.test_fraction, path=self.splits_path)

    def _make(self, names: list[str], length: int | None, seed: int):
        if self.kind == "clip":
            return ClipDataset(self.cache, names, clip_len=self.clip_len, seed=seed, length=length)
        return SliceDataset(self.cache, names, seed=seed, length=length)

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.cache = VolumeCache(self.dataset_dir, self.preprocess, cache_dir=self.cache_dir)
            self.splits = load_or_create_splits(self.dataset_dir, self.cache.names, seed=self.seed,
                                                val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                                                path=self.splits_path)
            if not self.splits["train"]:
                raise ValueError(f"the train split of {self.dataset_dir} is empty: {self.splits}")
            self.train_set = self._make(self.splits["train"], self.samples_per_epoch, self.seed)
            self.val_set = self._make(self.splits["val"], None, self.seed + 1) if self.splits["val"] else None

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          sampler=EpochSampler(len(dataset), shuffle=shuffle, seed=self.seed),
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_set is None:
            return []
        # a fixed epoch: validation sees the same clips every time
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False,
                          persistent_workers=self.num_workers > 0)

    def volumes(self, split: str = "val") -> VolumeDataset:
        """Whole prepared volumes of one split (train / val / test)."""
        self.setup()
        if split not in self.splits:
            raise ValueError(f"split must be one of {list(self.splits)}, got {split!r}")
        return VolumeDataset(self.cache, self.splits[split])
