"""Cached preprocessed volumes (and their first-stage latents), deterministic splits, torch datasets.

Caches live outside the dataset, so a read-only dataset works: under ``cache_dir`` when given, else under
``$GEM3D_CACHE`` (or ``$XDG_CACHE_HOME/gem3d``, ``~/.cache/gem3d``) in a folder per dataset (:func:`dataset_cache_dir`).

Index `e * len + i` is item `i` at epoch `e`, drawn from `np.random.default_rng([seed, e, i])` (the same in every
worker), so `EpochSampler` moves epochs without reaching into workers."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from gem3d.files import atomic_path, atomic_write_json

from .geometry import Geometry
from .nnunet import open_dataset
from .preprocess import (
    PreparedCase,
    PreprocessConfig,
    contrast_variant,
    hide_labels,
    informed_image,
    label_to_grey,
    prepare_case,
)

CACHE_VERSION = 1
CACHE_ENV = "GEM3D_CACHE"
SPLIT_KEYS = ("train", "val", "test")
INFORMED_SLICES = ("clip", "volume")  # where a training clip's informed slice is drawn from
VARIANT_MARK = "~"


def variant_name(name: str, invert: bool = False, gamma: float = 1.0) -> str:
    """The name of case ``name`` in another contrast (:func:`contrast_variant`, training only): ``case~inv-g0.7``."""
    return f"{name}{VARIANT_MARK}{'inv-' if invert else ''}g{float(gamma):g}"


def default_cache_root() -> Path:
    """``$GEM3D_CACHE``, else ``$XDG_CACHE_HOME/gem3d``, else ``~/.cache/gem3d``: one place per user (or per
    cluster scratch folder, set by the variable) that every stage and every rank shares."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gem3d"


def dataset_cache_dir(dataset_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The folder of one dataset's caches: ``cache_dir`` when given, else ``<default_cache_root>/<dataset folder
    name>-<8 hex digits of its absolute path>`` (two datasets of the same name do not share a cache)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    digest = hashlib.sha1(str(dataset_dir).encode()).hexdigest()[:8]
    return default_cache_root() / f"{dataset_dir.name}-{digest}"


def default_splits_path(dataset_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the splits are read or written when ``splits_path`` is not given: the dataset's own ``splits.json``
    when it has one (a split written by an earlier gem3d, or by hand), else ``splits.json`` in
    :func:`dataset_cache_dir`."""
    own = Path(dataset_dir) / "splits.json"
    return own if own.is_file() else dataset_cache_dir(dataset_dir, cache_dir) / "splits.json"


def split_cases(dataset_dir: str | Path, which: str, path: str | Path | None = None) -> list[str]:
    """The case names of split ``which`` (``--cases split:<which>``, in inference and evaluation) from ``path``
    (default :func:`default_splits_path`: the dataset's own ``splits.json``, else the one in its cache folder)."""
    path = Path(path) if path is not None else default_splits_path(dataset_dir)
    if not path.is_file():
        raise FileNotFoundError(f"--cases split:{which}: {path} does not exist (it is written by training)")
    splits = read_splits(path)
    if which not in splits:
        raise ValueError(f"--cases split:{which}: splits.json has {sorted(splits)}, not {which!r}")
    return list(splits[which])


class _CaseStore:
    """Per-case cache entries in ``cache_dir``: arrays ``<name>_<field>.npy`` and the meta ``<name>.json`` (with
    the sources' fingerprint), written last so that its presence marks a complete entry. Memmaps stay unpickled."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self._loaded: dict[str, Any] = {}

    def __getstate__(self) -> dict:  # DataLoader workers open their own memmaps
        return {**self.__dict__, "_loaded": {}}

    def _array_path(self, name: str, field: str) -> Path:
        return self.cache_dir / f"{name}_{field}.npy"

    def _read_entry(self, name: str, fields: list[str], fingerprint: list) -> dict | None:
        """The meta of a complete entry made from sources with this fingerprint, else None."""
        meta_path = self.cache_dir / f"{name}.json"
        if not meta_path.is_file() or not all(self._array_path(name, f).is_file() for f in fields):
            return None
        meta = json.loads(meta_path.read_text())
        return meta if meta.get("fingerprint") == fingerprint else None

    def _write_entry(self, name: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        for field, arr in arrays.items():
            with atomic_path(self._array_path(name, field)) as tmp:
                np.save(tmp, np.ascontiguousarray(arr))
        atomic_write_json(self.cache_dir / f"{name}.json", meta)
        self._loaded.pop(name, None)

    def _open(self, name: str, fields: list[str]) -> dict[str, np.ndarray]:
        return {f: np.load(self._array_path(name, f), mmap_mode="r") for f in fields}


class VolumeCache(_CaseStore):
    """Each training case prepared once into `.npy` files + a meta json (geometry, stats, source fingerprint) under
    `<dataset_cache_dir(dataset_dir, cache_dir)>/<hash of cfg>`; a changed source (size or mtime) is prepared again.
    Names made by :func:`variant_name` address a case in another contrast, computed from its cached image."""

    def __init__(self, dataset_dir: str | Path, cfg: PreprocessConfig, cache_dir: str | Path | None = None,
                 channel: int | str | None = None):
        base = dataset_cache_dir(dataset_dir, cache_dir)
        dataset = open_dataset(dataset_dir, channel=channel)
        key = {"cfg": asdict(cfg), "split": "Tr", "version": CACHE_VERSION}
        if dataset.channel != 0:  # channel 0 keeps the key of caches written before channels could be chosen
            key["channel"] = dataset.channel
        payload = json.dumps(key, sort_keys=True)
        super().__init__(base / hashlib.sha1(payload.encode()).hexdigest()[:12])
        self.dataset_dir = Path(dataset_dir)
        self.dataset = dataset
        self.cfg = cfg
        self.names: list[str] = self.dataset.case_names("Tr")
        if not self.names:
            raise FileNotFoundError(f"no Tr cases found in {self.dataset_dir}")
        if (self.dataset.max_label or 0) > cfg.max_label:
            raise ValueError(f"dataset.json labels {self.dataset.labels} exceed preprocess.max_label={cfg.max_label}; "
                             f"set max_label to {self.dataset.max_label}")
        self.prepared_count = 0  # cases prepared (not read from the cache) by this instance
        self._meta: dict[str, dict] = {}

    def _resolve(self, name: str) -> tuple[str, dict | None]:
        """``(case, contrast_variant arguments or None)`` of a case name or a :func:`variant_name`."""
        base, variant = name, None
        if name not in self.names and VARIANT_MARK in name:
            base, tag = name.split(VARIANT_MARK, 1)
            variant = {"invert": tag.startswith("inv-"), "gamma": float(tag.removeprefix("inv-").removeprefix("g"))}
        if base not in self.names:
            shown = self.names[:8] + (["..."] if len(self.names) > 8 else [])
            raise KeyError(f"case {base!r} not in {self.dataset_dir} (Tr); cases: {shown}")
        return base, variant

    def meta(self, name: str) -> dict:
        """The cached meta of one case (prepares the case when needed)."""
        name = self._resolve(name)[0]
        if name not in self._meta:
            label = self.dataset.label_path(name)
            sources = [self.dataset.image_path(name), *([label] if label.is_file() else [])]
            fingerprint = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sources]
            self._meta[name] = self._read_entry(name, ["image"], fingerprint) or self._prepare(name, fingerprint)
        return self._meta[name]

    def _prepare(self, name: str, fingerprint: list) -> dict:
        prepared = prepare_case(self.dataset.load_case(name, slice_axis=self.cfg.slice_axis), self.cfg)
        meta = {
            "name": name,
            "fingerprint": fingerprint,
            "geometry": prepared.geometry.to_dict(),
            "stats": prepared.stats,
            "canonical_hw": list(prepared.canonical_hw),
            "max_label": prepared.max_label,
            "shape": list(prepared.image.shape),
            "has_label": prepared.label is not None,
        }
        arrays = {"image": prepared.image} | ({} if prepared.label is None else {"label": prepared.label})
        self._write_entry(name, arrays, meta)
        self.prepared_count += 1
        return meta

    def num_slices(self, name: str) -> int:
        return int(self.meta(name)["shape"][0])

    def get(self, name: str) -> PreparedCase:
        """PreparedCase with memory-mapped image (D, S, S) and label (D, S, S) (or None)."""
        meta = self.meta(name)
        if name in self._loaded:
            return self._loaded[name]
        base, variant = self._resolve(name)
        if variant is not None:
            prepared = self.get(base)
            if prepared.label is None:
                raise ValueError(f"case {base!r} has no label, so no body to change the contrast of ({name!r})")
            image = contrast_variant(prepared.image, np.asarray(prepared.label) >= 0, **variant)
            self._loaded[name] = replace(prepared, name=name, image=image)
            return self._loaded[name]
        arrays = self._open(name, ["image", "label"] if meta["has_label"] else ["image"])
        self._loaded[name] = PreparedCase(
            name=name,
            image=arrays["image"],
            label=arrays.get("label"),
            stats=meta["stats"],
            geometry=Geometry.from_dict(meta["geometry"]),
            canonical_hw=tuple(meta["canonical_hw"]),
            max_label=int(meta["max_label"]),
        )
        return self._loaded[name]

    def prepare_all(self, names: list[str] | None = None) -> None:
        for name in tqdm(self.names if names is None else names, desc="preparing cases", leave=False):
            self.meta(name)

    def estimate_bytes(self, names: list[str] | None = None, latent_channels: int = 0,
                       downsample_factor: int = 8) -> dict[str, int]:
        """Bytes the cache will hold for ``names`` (default: all), from the image headers (no voxel is read):
        ``{"slices", "volumes", "latents"}``; volumes: image f32 + label i16 per slice of S x S; latents (with
        ``latent_channels``): 3 f32 fields of ``latent_channels x (S / f)^2`` per slice. Cases whose header
        cannot be read count as the mean of the others."""
        names = self.names if names is None else names
        counts = [n for n in (_slices_from_header(self.dataset, name, self.cfg.slice_axis) for name in names) if n]
        slices = int(round(sum(counts) / len(counts) * len(names))) if counts else 0
        side = self.cfg.size or 0
        if not side and counts:  # size None keeps the canonical in-plane shape: take the first case's
            side = int(max(self.get(names[0]).image.shape[1:]))
        volume_bytes = slices * side * side * (4 + 2)
        latent_side = -(-side // max(int(downsample_factor), 1))
        latent_bytes = slices * 3 * int(latent_channels) * latent_side * latent_side * 4
        return {"slices": slices, "volumes": volume_bytes, "latents": latent_bytes}


def _slices_from_header(dataset, name: str, slice_axis: int) -> int | None:
    """The number of slices along the RAS axis ``slice_axis`` of a case's image, from its NIfTI header only."""
    import nibabel as nib

    try:
        image = nib.load(str(dataset.image_path(name)))
    except Exception:  # not a NIfTI file (nnU-Net preprocessed arrays, other formats): unknown
        return None
    axes = nib.io_orientation(image.affine)[:, 0]
    return int(image.shape[int(np.flatnonzero(axes == slice_axis)[0])])


def format_bytes(n: float) -> str:
    """``1.5e9`` -> ``'1.5 GB'`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class LatentEncoder(Protocol):
    """What :class:`LatentCache` needs of a first stage: ``key`` names its weights (another key, another cache);
    ``scale_factor``; ``__call__(images (N, 1, S, S) in [-1, 1])`` -> unscaled posterior mean, std (N, z, h, w)."""

    key: str
    scale_factor: float

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class LatentCache(_CaseStore):
    """Each case of a :class:`VolumeCache` encoded once: unscaled posterior mean and std of the image slices and
    mean of the grey mask slices (and, with ``informed_labels: hidden``, mean and std of the slices with their labels
    hidden), ``(D, z, h, w)`` f32 ``.npy`` under ``<volume cache>/latents-<encoder key>``; a case whose source
    fingerprint changed is encoded again."""

    FIELDS = ["image_mean", "image_std", "mask_mean"]
    HIDDEN_FIELDS = ["informed_mean", "informed_std"]

    def __init__(self, volumes: VolumeCache, encoder: LatentEncoder):
        key = str(getattr(encoder, "key", "") or "")
        if not key or any(c in key for c in "/\\ ."):
            raise ValueError(f"the latent encoder needs a key of letters/digits to name its cache, got {key!r}")
        super().__init__(volumes.cache_dir / f"latents-{key}")
        self.volumes, self.encoder = volumes, encoder
        self.scale_factor = float(encoder.scale_factor)
        self.fields = self.FIELDS + (self.HIDDEN_FIELDS if volumes.cfg.informed_labels == "hidden" else [])
        self.encoded_count = 0  # cases encoded (not read from the cache) by this instance

    def __getstate__(self) -> dict:  # DataLoader workers: no encoder either
        return {**super().__getstate__(), "encoder": None}

    @torch.no_grad()
    def _encode(self, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(D, S, S) in [-1, 1] -> unscaled posterior (mean, std), each (D, z, h, w); the encoder chunks."""
        mean, std = self.encoder(rearrange(torch.from_numpy(np.array(slices, dtype=np.float32)), "n h w -> n 1 h w"))
        return mean.float().cpu().numpy(), std.float().cpu().numpy()

    def get(self, name: str) -> dict[str, np.ndarray]:
        """``{image_mean, image_std, mask_mean}`` (+ ``informed_mean, informed_std``): read-only memmaps
        ``(D, z, h, w)``, unscaled; a case not (or no longer) in the cache is encoded first."""
        if name in self._loaded:
            return self._loaded[name]
        fingerprint = self.volumes.meta(name)["fingerprint"]
        if self._read_entry(name, self.fields, fingerprint) is None:
            if self.encoder is None:
                raise RuntimeError(f"latent cache {self.cache_dir} lacks case {name!r} and has no encoder here "
                                   "(encode every case in the main process: LatentCache.encode_all)")
            prepared = self.volumes.get(name)
            image_mean, image_std = self._encode(prepared.image)
            mask_mean, _ = self._encode(prepared.grey_mask())  # labelled cases only
            arrays = dict(zip(self.FIELDS, (image_mean, image_std, mask_mean)))
            if self.HIDDEN_FIELDS[0] in self.fields:
                hidden = self._encode(hide_labels(prepared.image, prepared.label))
                arrays |= dict(zip(self.HIDDEN_FIELDS, hidden))
            self._write_entry(name, arrays, {"name": name, "fingerprint": fingerprint, "shape": list(image_mean.shape)})
            self.encoded_count += 1
        self._loaded[name] = self._open(name, self.fields)
        return self._loaded[name]

    def encode_all(self, names: list[str] | None = None) -> None:
        for name in tqdm(names if names is not None else self.volumes.names, desc="encoding latents", leave=False):
            self.get(name)

    def sample(self, name: str, start: int, stop: int, rng: np.random.Generator, kind: str = "image") -> torch.Tensor:
        """A posterior sample of slices ``[start, stop)`` (``kind``: ``image``, or ``informed``: labels hidden),
        scaled: ``(mean + std * noise) * scale_factor`` ``(F, z, h, w)`` f32, the noise from ``rng``."""
        latents = self.get(name)
        mean = np.asarray(latents[f"{kind}_mean"][start:stop], dtype=np.float32)
        noise = rng.standard_normal(mean.shape, dtype=np.float32)
        sample = mean + np.asarray(latents[f"{kind}_std"][start:stop], dtype=np.float32) * noise
        return torch.from_numpy(sample * np.float32(self.scale_factor))

    def mean(self, name: str, field: str, start: int, stop: int) -> torch.Tensor:
        """The scaled posterior mean of ``field`` (image_mean | mask_mean | informed_mean) over ``[start, stop)``."""
        arr = np.asarray(self.get(name)[field][start:stop], dtype=np.float32)
        return torch.from_numpy(arr * np.float32(self.scale_factor))


def make_splits(names: list[str], seed: int = 0, val_fraction: float = 0.2,
                test_fraction: float = 0.0) -> dict[str, list[str]]:
    """Deterministic disjoint split of `names` (order-independent): each non-zero fraction gets >= 1 case while
    >= 1 case stays for training. Returns dict(train=[...], val=[...], test=[...]), each sorted."""
    names = sorted(set(names))
    for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{key} must lie in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    n = len(names)
    if n == 0:
        raise ValueError("make_splits needs at least one case name")

    n_val, n_test = (max(1, int(round(frac * n))) if frac > 0 else 0 for frac in (val_fraction, test_fraction))
    while n_val + n_test > n - 1:  # keep one training case
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [names[i] for i in order]
    return {
        "train": sorted(shuffled[n_val + n_test:]),
        "val": sorted(shuffled[:n_val]),
        "test": sorted(shuffled[n_val:n_val + n_test]),
    }


def read_splits(path: str | Path, fold: int = 0) -> dict[str, list[str]]:
    """Read gem3d `splits.json` or nnU-Net `splits_final.json` (a list of folds; `fold` picks one)."""
    path = Path(path)
    obj = json.loads(path.read_text())
    if isinstance(obj, list):
        if not 0 <= fold < len(obj):
            raise ValueError(f"{path} has {len(obj)} folds; fold must be in [0, {len(obj) - 1}], got {fold}")
        obj = obj[fold]
    if not isinstance(obj, dict) or "train" not in obj or "val" not in obj:
        raise ValueError(f"{path} must hold {{'train': [...], 'val': [...], 'test': [...]}}, got {str(obj)[:200]}")
    return {k: list(obj.get(k, [])) for k in SPLIT_KEYS}


def load_or_create_splits(dataset_dir: str | Path, names: list[str] | None = None, seed: int = 0,
                          val_fraction: float = 0.2, test_fraction: float = 0.0,
                          path: str | Path | None = None) -> dict[str, list[str]]:
    """Read the splits at `path` (default: :func:`default_splits_path`), or make and write them there. Cases named
    there must exist."""
    dataset_dir = Path(dataset_dir)
    path = Path(path) if path is not None else default_splits_path(dataset_dir)
    if names is None:
        names = open_dataset(dataset_dir).case_names("Tr")
    if path.is_file():
        splits = read_splits(path)
        listed = [n for k in SPLIT_KEYS for n in splits[k]]
        unknown = sorted(set(listed) - set(names))
        if unknown:
            raise ValueError(f"{path} names cases that are not in the dataset: {unknown[:10]}; delete it to re-split")
        unlisted = sorted(set(names) - set(listed))
        if unlisted:
            warnings.warn(f"{len(unlisted)} cases are in no split of {path}, e.g. {unlisted[:5]}", stacklevel=2)
        return splits
    splits = make_splits(names, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    atomic_write_json(path, {**splits, "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction})
    return splits


class ClipDataset(Dataset):
    """Random clips of `clip_len` consecutive slices of labelled cases, `length` items an epoch (default: one per
    case). Item: image (F, 1, S, S) f32 in [-1, 1]; mask (F, 1, S, S) f32 grey; informed (1, S, S) =
    image[informed_index]; informed_index in [0, F) (inside the clip); start (first slice); case; num_slices. With
    latents (:meth:`use_latents`) also, scaled: latent (F, z, h, w) a posterior sample of the image; mask_latent
    (F, z, h, w) and informed_latent (z, h, w) posterior means. With the preprocessing's ``informed_labels: hidden``
    the informed slice has its labels hidden (:func:`~gem3d.data.preprocess.hide_labels`), and so does the image when
    ``hidden_target`` (the slice model, whose slices become informed slices). ``informed_slices``: ``clip`` (a slice
    of the clip, the paper) or ``volume`` (any slice of the case: ``informed_index`` may then lie outside [0, F))."""

    CARRIES_INFORMED = True  # items hold the informed slice and its latent (the slice model's need neither)

    def __init__(self, cache: VolumeCache, names: list[str], clip_len: int = 16, seed: int = 0,
                 length: int | None = None, hidden_target: bool = False, informed_slices: str = "clip"):
        self.names = list(names)
        if not self.names:
            raise ValueError(f"{type(self).__name__} needs at least one case name")
        if length is not None and length < 1:
            raise ValueError(f"length must be >= 1 or None, got {length}")
        if clip_len < 1:
            raise ValueError(f"clip_len must be >= 1, got {clip_len}")
        self.cache, self.seed, self.clip_len = cache, int(seed), int(clip_len)
        self.hidden = cache.cfg.informed_labels == "hidden"
        self.hidden_target = bool(hidden_target) and self.hidden
        if informed_slices not in INFORMED_SLICES:
            raise ValueError(f"informed_slices must be one of {INFORMED_SLICES}, got {informed_slices!r}")
        self.informed_slices = informed_slices
        self.length = int(length) if length is not None else len(self.names)
        self.latents: LatentCache | None = None
        short = {n: cache.num_slices(n) for n in self.names if cache.num_slices(n) < self.clip_len}
        if short:
            raise ValueError(f"cases with fewer slices than clip_len={self.clip_len}: {short} (name: slices)")

    def use_latents(self, latents: LatentCache | None) -> None:
        """Add cached first-stage latents to every item, or stop (None)."""
        if latents is not None and latents.volumes is not self.cache:
            raise ValueError(f"latent cache {latents.cache_dir} belongs to another volume cache than "
                             f"{self.cache.cache_dir}")
        self.latents = latents

    def __len__(self) -> int:
        return self.length

    def _locate(self, index: int) -> tuple[str, np.random.Generator]:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        epoch, i = divmod(int(index), self.length)
        # cases: consecutive seeded permutations of all names, walked through across items and epochs, so every
        # case comes up equally often whatever `length` is
        cycle, position = divmod(int(index), len(self.names))
        order = np.random.default_rng([self.seed, cycle, 0xCA5E]).permutation(len(self.names))
        return self.names[int(order[position])], np.random.default_rng([self.seed, epoch, i])

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, rng = self._locate(index)
        prepared = self.cache.get(name)
        if prepared.label is None:
            raise ValueError(f"case {name!r} has no label; {type(self).__name__} needs labelled cases")
        d = prepared.num_slices
        start = int(rng.integers(0, d - self.clip_len + 1))
        informed_index = int(rng.integers(0, self.clip_len))  # draws nothing when clip_len is 1
        if self.informed_slices == "volume":
            informed_index = int(rng.integers(0, d)) - start
        stop, k = start + self.clip_len, start + informed_index
        label = np.asarray(prepared.label[start:stop])
        image = torch.from_numpy(np.array(prepared.image[start:stop], dtype=np.float32))
        if self.hidden_target:
            image = torch.from_numpy(hide_labels(image.numpy(), label))
        mask = torch.from_numpy(label_to_grey(label, prepared.max_label))
        item = {"image": rearrange(image, "f h w -> f 1 h w"), "mask": rearrange(mask, "f h w -> f 1 h w")}
        if self.CARRIES_INFORMED:
            informed = torch.from_numpy(informed_image(np.asarray(prepared.image[k], dtype=np.float32),
                                                       np.asarray(prepared.label[k]), self.cache.cfg))
            item["informed"] = rearrange(informed, "h w -> 1 h w")
        item |= {"informed_index": informed_index, "start": start, "case": name, "num_slices": d}
        if self.latents is not None:
            item["latent"] = self.latents.sample(name, start, stop, rng, "informed" if self.hidden_target else "image")
            item["mask_latent"] = self.latents.mean(name, "mask_mean", start, stop)
            if self.CARRIES_INFORMED:
                field = "informed_mean" if self.hidden else "image_mean"
                item["informed_latent"] = self.latents.mean(name, field, k, k + 1)[0]
        return item


class SliceDataset(ClipDataset):
    """Random single slices: clips of one slice. Item: image (1, S, S), mask (1, S, S) grey, pos = index / num_slices
    in [0, 1), index, case. With latents (:meth:`use_latents`) also latent (1, z, h, w), a scaled posterior sample.
    With ``informed_labels: hidden`` the slices have their labels hidden (once: the item's slice is the image, so no
    informed slice is made beside it): they are what informed slices look like."""

    CARRIES_INFORMED = False

    def __init__(self, cache: VolumeCache, names: list[str], seed: int = 0, length: int | None = None):
        super().__init__(cache, names, clip_len=1, seed=seed, length=length, hidden_target=True)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = super().__getitem__(index)
        k = clip["start"]
        item = {"image": clip["image"][0], "mask": clip["mask"][0],
                "pos": torch.tensor(k / clip["num_slices"], dtype=torch.float32), "index": k, "case": clip["case"]}
        if "latent" in clip:
            item["latent"] = clip["latent"]
        return item


class EpochSampler(Sampler[int]):
    """Yields `epoch * len(dataset) + i` for a (seeded, per-epoch) permutation of i, so `ClipDataset` items change
    with the epoch even inside persistent DataLoader workers. Lightning calls `set_epoch` on it."""

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0):
        self.length, self.shuffle, self.seed, self.epoch = int(length), bool(shuffle), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        order = (np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.length) if self.shuffle
                 else np.arange(self.length))
        offset = self.epoch * self.length
        return iter((offset + int(i)) for i in order)
