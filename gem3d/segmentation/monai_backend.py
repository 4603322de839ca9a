"""The MONAI backend: a small 3D ``BasicUNet`` trained with Dice + cross-entropy, the CPU default.

Training and prediction work on the canonical ``(D, H, W)`` array of each NIfTI (:func:`gem3d.data.case.load_case`:
the closest RAS orientation, axial slices first); predictions are written back onto the input image's exact grid
(affine and shape). Intensities are z-scored over the nonzero voxels (the body of a skull-stripped MRI; MONAI
``NormalizeIntensity(nonzero=True)``), zeros stay zero. Volumes that fit the ``patch`` option are trained and
predicted whole (padded at their end to a multiple of 16); larger ones are trained on random patches and predicted
with MONAI's ``sliding_window_inference``.

Options (``SegmenterSettings.options``): ``features`` (six ints, BasicUNet's), ``patch`` (three multiples of 16,
canonical order), ``batch_size``, ``learning_rate`` (Adam), ``checkpoint_every`` (iterations), ``num_labels``
(foreground labels; default the largest label value of the training cases), ``overlap`` (sliding window),
``sw_batch_size`` (sliding windows per forward pass: 4 predicts the same labels as 1, several times faster on the CPU;
BENCHMARKS.md section 11).

Work folder: ``checkpoint.pt`` (weights, optimiser, iteration, torch RNG state; written every ``checkpoint_every``
iterations, removed when training ends) and ``model.pt`` (the finished weights). Every iteration's random choices
(cases, flips, intensity jitter, patches) are drawn from generators seeded by ``(seed, iteration)``, so a resumed
training draws what an uninterrupted one would, and the same seed gives the same weights (on the CPU).

The network and its inputs use the ``channels_last_3d`` memory format: oneDNN's 3D convolutions with few channels
(8-64 here) train faster on the CPU that way (BENCHMARKS.md section 11, ``bench/segmenter_bench.py``); the values
are the same up to float rounding.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import (Compose, NormalizeIntensity, RandFlipd, RandScaleIntensityd, RandShiftIntensityd,
                              RandSpatialCropd)
from monai.utils import convert_to_tensor
from tqdm.auto import tqdm

from gem3d.data.case import load_case
from gem3d.export.nifti import save_nifti
from gem3d.files import atomic_path
from gem3d.optim import make_adam

from .base import Segmenter, SegmenterSettings, TrainingCase, prediction_name

DEFAULTS = {
    "features": [8, 8, 16, 32, 64, 8],
    "patch": [64, 64, 64],
    "batch_size": 2,
    "learning_rate": 1e-3,
    "checkpoint_every": 50,
    "num_labels": None,
    "overlap": 0.25,
    "sw_batch_size": 4,
}
DIVISOR = 16  # BasicUNet halves the volume four times
MIN_SIZE = 2 * DIVISOR  # instance norm needs more than one voxel at the coarsest level
INTENSITY_SCALE = 0.1  # jitter: z-scored intensities times U(0.9, 1.1) plus U(-0.1, 0.1)
CHECKPOINT = "checkpoint.pt"
FINAL = "model.pt"
MEMORY_FORMAT = torch.channels_last_3d


def monai_options(settings: SegmenterSettings) -> dict:
    """``settings.options`` over :data:`DEFAULTS`, checked."""
    unknown = sorted(set(settings.options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"MONAI segmenter options {unknown} are unknown; allowed: {sorted(DEFAULTS)}")
    options = {**DEFAULTS, **settings.options}
    features = options["features"]
    if len(features) != 6 or not all(isinstance(f, int) and f > 0 for f in features):
        raise ValueError(f"MONAI segmenter option features must be six ints > 0, got {features!r}")
    patch = options["patch"]
    if len(patch) != 3 or not all(isinstance(p, int) and p >= MIN_SIZE and p % DIVISOR == 0 for p in patch):
        raise ValueError(f"MONAI segmenter option patch must be three multiples of {DIVISOR} >= {MIN_SIZE} "
                         f"(canonical D, H, W), got {patch!r}")
    for name in ("batch_size", "checkpoint_every", "sw_batch_size"):
        if not isinstance(options[name], int) or options[name] < 1:
            raise ValueError(f"MONAI segmenter option {name} must be an int >= 1, got {options[name]!r}")
    num_labels = options["num_labels"]
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"MONAI segmenter option num_labels must be an int >= 1 or None, got {num_labels!r}")
    return options


def normalise(image: np.ndarray) -> torch.Tensor:
    """``(D, H, W)`` raw intensities -> ``(1, D, H, W)`` float32, z-scored over the nonzero voxels (zeros stay)."""
    tensor = torch.as_tensor(np.asarray(image, np.float32))[None]
    return convert_to_tensor(NormalizeIntensity(nonzero=True)(tensor), track_meta=False)


def padded_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """The smallest shape >= ``shape`` whose sides are multiples of 16 and at least 32."""
    return tuple(max(MIN_SIZE, DIVISOR * math.ceil(s / DIVISOR)) for s in shape)


def pad_end(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad the last three axes of ``volume`` at their end up to ``shape``."""
    pads = [p for size, target in zip(reversed(volume.shape[-3:]), reversed(shape)) for p in (0, target - size)]
    return F.pad(volume, pads)


def iteration_seed(seed: int, iteration: int) -> int:
    """The seed of one iteration's random choices (a uint32 from numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


class MonaiSegmenter(Segmenter):
    """MONAI ``BasicUNet(3, 1, num_labels + 1)`` with ``DiceCELoss`` and Adam (see the module's docstring)."""

    def __init__(self, settings: SegmenterSettings, work_dir: str | Path):
        super().__init__(settings, work_dir)
        self.options = monai_options(settings)
        self._network: BasicUNet | None = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.settings.device)

    def is_trained(self) -> bool:
        return (self.work_dir / FINAL).is_file()

    def _build(self, num_labels: int) -> BasicUNet:
        torch.manual_seed(self.settings.seed)
        network = BasicUNet(3, 1, num_labels + 1, features=tuple(self.options["features"]))
        return network.to(self.device, memory_format=MEMORY_FORMAT)

    def _augment(self, whole: bool) -> Compose:
        keys = ["image", "label"]
        crop = [] if whole else [RandSpatialCropd(keys, roi_size=self.options["patch"], random_size=False)]
        return Compose([*crop, *(RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)),
                        RandScaleIntensityd("image", factors=INTENSITY_SCALE, prob=1.0),
                        RandShiftIntensityd("image", offsets=INTENSITY_SCALE, prob=1.0)])

    def train(self, cases: Sequence[TrainingCase], progress: bool = True) -> None:
        if self.is_trained():
            return
        if not cases:
            raise ValueError("the MONAI segmenter needs at least one training case, got none")
        key = self.settings.key(cases)
        self.save_settings(cases)
        images, labels = [], []
        for case in cases:
            loaded = load_case(case.image, case.label, name=case.name)
            images.append(normalise(loaded.image))
            labels.append(torch.as_tensor(np.clip(loaded.label, 0, None).astype(np.int64))[None])
        num_labels = self.options["num_labels"] or max(1, max(int(label.max()) for label in labels))
        shape = padded_shape(np.max([image.shape[1:] for image in images], axis=0))
        whole = all(s <= p for s, p in zip(shape, self.options["patch"]))
        shape = shape if whole else tuple(max(s, p) for s, p in zip(shape, self.options["patch"]))
        images = torch.stack([pad_end(image, shape) for image in images])
        labels = torch.stack([pad_end(label, shape) for label in labels])
        network = self._build(num_labels)
        optimiser = make_adam("adam", network.parameters(), lr=self.options["learning_rate"])
        loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
        augment = self._augment(whole)
        start = self._resume(network, optimiser, key)
        iterations, every = self.settings.iterations, self.options["checkpoint_every"]
        network.train()
        bar = tqdm(range(start, iterations), initial=start, total=iterations, disable=not progress,
                   desc=f"segmenter ({len(cases)} cases)", unit="it")
        for iteration in bar:
            seed = iteration_seed(self.settings.seed, iteration)
            batch = self._batch(images, labels, augment, seed)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_function(network(batch["image"]), batch["label"])
            loss.backward()
            optimiser.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            done = iteration + 1
            if done % every == 0 and done < iterations:
                self._save(CHECKPOINT, network, meta={"key": key, "num_labels": num_labels}, iteration=done,
                           optimiser=optimiser)
        self._save(FINAL, network, meta={"key": key, "num_labels": num_labels}, iteration=iterations)
        (self.work_dir / CHECKPOINT).unlink(missing_ok=True)

    def _batch(self, images: torch.Tensor, labels: torch.Tensor, augment: Compose, seed: int) -> dict:
        """A batch ``{"image": (B, 1, *patch), "label": (B, 1, *patch)}`` of randomly chosen, augmented cases."""
        rng = np.random.default_rng(seed)
        size = self.options["batch_size"]
        chosen = rng.choice(len(images), size=size, replace=len(images) < size)
        augment.set_random_state(seed=seed)
        items = [augment({"image": images[i], "label": labels[i]}) for i in chosen]
        batch = {k: torch.stack([convert_to_tensor(item[k], track_meta=False) for item in items]).to(self.device)
                 for k in ("image", "label")}
        batch["image"] = batch["image"].contiguous(memory_format=MEMORY_FORMAT)
        return batch

    def _save(self, name: str, network: BasicUNet, meta: dict, iteration: int, optimiser=None) -> None:
        state = {"model": network.state_dict(), "iteration": iteration, "meta": meta,
                 "torch_rng": torch.get_rng_state()}
        if optimiser is not None:
            state["optimiser"] = optimiser.state_dict()
        with atomic_path(self.work_dir / name) as tmp:
            torch.save(state, tmp)

    def _resume(self, network: BasicUNet, optimiser, key: str) -> int:
        """Load ``checkpoint.pt`` when there is one; the iteration to start from."""
        path = self.work_dir / CHECKPOINT
        if not path.is_file():
            return 0
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state["meta"]["key"] != key:
            raise ValueError(f"{path} belongs to another training (key {state['meta']['key']}, these settings and "
                             f"cases have {key}); use another work folder or delete it")
        network.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["iteration"])

    def network(self) -> BasicUNet:
        """The trained network (loaded once from ``model.pt``), in eval mode."""
        if self._network is None:
            path = self.work_dir / FINAL
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: train the segmenter first")
            state = torch.load(path, map_location=self.device, weights_only=True)
            network = BasicUNet(3, 1, int(state["meta"]["num_labels"]) + 1, features=tuple(self.options["features"]))
            network.load_state_dict(state["model"])
            self._network = network.to(self.device, memory_format=MEMORY_FORMAT).eval()
        return self._network

    def predict_array(self, image: np.ndarray) -> np.ndarray:
        """Labels ``(D, H, W)`` int16 of a canonical raw-intensity volume ``(D, H, W)``."""
        network = self.network()
        volume = normalise(image)[None].to(self.device).contiguous(memory_format=MEMORY_FORMAT)
        shape = padded_shape(volume.shape[2:])
        with torch.inference_mode():
            if all(s <= p for s, p in zip(shape, self.options["patch"])):
                logits = network(pad_end(volume, shape))
            else:
                logits = sliding_window_inference(volume, roi_size=self.options["patch"],
                                                  sw_batch_size=self.options["sw_batch_size"],
                                                  predictor=network, overlap=self.options["overlap"], mode="gaussian")
        depth, height, width = image.shape
        return logits[0, :, :depth, :height, :width].argmax(0).cpu().numpy().astype(np.int16)

    def predict(self, images: Sequence[Path], out_dir: str | Path, progress: bool = True) -> list[Path]:
        out_dir = Path(out_dir)
        written = []
        for path in tqdm(images, desc="segmenting", unit="volume", disable=not progress):
            case = load_case(path)
            labels = self.predict_array(case.image)
            written.append(save_nifti(case.geometry.to_source(labels), case.geometry,
                                      out_dir / prediction_name(Path(path)), dtype=np.int16))
        return written

