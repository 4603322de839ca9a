"""The one inference engine: every setting of :mod:`gem3d.inference.settings` runs through :class:`Enhancer`.

Per sample it writes ``OUT/<setting>/<case>_s<k>_image.nii.gz`` and ``..._label.nii.gz`` on the input label's grid,
``<case>_gt.nii.gz`` (``test`` only: the real image is its ground truth), ``previews/<case>_s<k>.png`` and a
``manifest.json`` record (with the volume's share of the run's seconds, :class:`SharedClock`, its peak memory,
:class:`PeakMemory`, and the preprocessing it ran with). A rerun skips finished samples; each sample's seed comes
from ``(seed, case, k)``, so outputs do not depend on sharding.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import sys
import time
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cache, lru_cache, partial
from pathlib import Path
from typing import Any, Generator, Iterator

import numpy as np
import torch
from einops import rearrange
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from gem3d.data.case import Case
from gem3d.data.datasets import split_cases
from gem3d.data.nnunet import PreprocessedDataset, open_dataset
from gem3d.data.preprocess import (
    PreparedCase,
    PreprocessConfig,
    compute_body_mask,
    informed_image,
    prepare_case,
    restore_volume,
)
from gem3d.export.manifest import Manifest, make_record, merge_manifests
from gem3d.export.nifti import save_nifti
from gem3d.export.preview import save_preview
from gem3d.inference import mask_edit
from gem3d.inference.settings import Setting, get_setting
from gem3d.inference.volume import (
    SamplerOptions,
    decode_volume,
    encode_slices,
    informed_start_latents,
    label_region_latent,
    sample_rounds,
    sample_slice_latents,
    volume_propagation,
)
from gem3d.model_dirs import load_model_dir
from gem3d.sampling.propagation import run_lockstep

INFORMED_SELECT_RULES = ("brightest", "darkest")
DONOR_RULES = ("other", "original")  # ic/icma donors: another case (gem3d) or the original's draw (may be the case)
# outside the body: the decoded volume as generated (the paper), or the real case's own voxels there (a skull-stripped
# MRI's exact zeros, which z-score normalisations over the nonzero voxels, nnU-Net's among them, rely on)
BACKGROUNDS = ("generated", "real")
PREPARED_CACHE = 4  # preprocessed cases kept in memory


@dataclass
class InferenceConfig:
    """Everything one run needs (filled by the CLI or ``gem3d/configs/inference/*.yaml``). data: nnU-Net raw dataset
    folder; out: output root (samples go to ``out/<setting>``); cases: ``None``/``"all"``, a count ``"N"``,
    ``"split:val"`` (from ``splits.json``) or ``"a,b,c"``; informed_from: ``CASE[:POS]`` (POS in [0, 1]);
    informed_select: ``brightest``/``darkest`` decile of candidate slices; mask_edit: ``icma_edit`` keyword arguments;
    preprocess: an explicit override of the model's own training preprocessing (keys merged onto it; a value that
    differs from the model's is an error unless ``force_preprocess``); fallback_preprocess: used only for models that
    carry none (original GEM-3D folders); channel: the image channel (index or dataset.json name; None: the model's
    ``data.params.channel``, else 0); part: ``(i, n)``, this process generates the i-th of n shares of the samples
    (SLURM arrays; :func:`merge_rank_manifests` joins them); donor: ``other`` (another case) or ``original`` (the
    original's draw); require_preprocessed: refuse raw datasets (``--as-original``); ema / slice_ema: None = the
    model's default; background: outside the body, the volume as ``generated`` or the ``real`` case's own voxels
    (:func:`real_background`)."""

    setting: str
    data: Path
    out: Path
    model: Path | None = None
    slice_model: Path | None = None
    split: str = "Tr"
    cases: str | None = None
    samples_per_case: int = 1
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    seed: int = 0
    device: str = "cpu"
    ema: bool | None = None
    slice_ema: bool | None = None
    informed_from: str | None = None
    informed_select: str | None = None
    mask_edit: dict = field(default_factory=dict)
    preprocess: dict | None = None
    fallback_preprocess: dict | None = None
    force_preprocess: bool = False
    channel: int | str | None = None
    part: tuple[int, int] | None = None
    donor: str = "other"
    require_preprocessed: bool = False
    previews: bool = True
    progress: bool = True
    trust_checkpoint: bool = False
    background: str = "generated"

    def __post_init__(self):
        self.setting_spec: Setting = get_setting(self.setting)
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background={self.background!r} is not one of {list(BACKGROUNDS)}")
        if self.donor not in DONOR_RULES:
            raise ValueError(f"donor={self.donor!r} is not one of {list(DONOR_RULES)}")
        if self.part is not None:
            index, count = self.part
            if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
                raise ValueError(f"part must be (i, n) with 0 <= i < n, got {self.part!r}")
        if self.cases is not None and not isinstance(self.cases, str):
            self.cases = str(self.cases)  # a count from YAML
        self.data, self.out = Path(self.data), Path(self.out)
        if self.samples_per_case < 1:
            raise ValueError(f"samples_per_case must be >= 1, got {self.samples_per_case}")
        if self.informed_select is not None and self.informed_select not in INFORMED_SELECT_RULES:
            raise ValueError(f"informed_select={self.informed_select!r} is not one of {list(INFORMED_SELECT_RULES)}")
        self.informed_donor = None if self.informed_from is None else parse_informed_from(self.informed_from)
        if (self.informed_from or self.informed_select) and self.setting_spec.informed != "other_case":
            raise ValueError(
                f"--informed-from/--informed-select choose a real informed slice; setting {self.setting!r} takes "
                f"its informed slice from {self.setting_spec.informed!r} (use ic or icma)"
            )
        if self.setting_spec.needs_volume_model and self.model is None:
            raise ValueError(f"setting {self.setting!r} needs a volume model dir (--model)")
        if self.setting_spec.needs_slice_model and self.slice_model is None:
            raise ValueError(f"setting {self.setting!r} needs a slice model dir (--slice-model)")

    @property
    def setting_dir(self) -> Path:
        return self.out / self.setting


@dataclass(frozen=True, eq=False)
class InformedSlice:
    """Where a volume's informed slice comes from. source: ``none`` | ``own_middle`` | ``generated`` | ``other_case``;
    case / index: the donor case and its slice (None when generated); position: relative position in [0, 1];
    target_index: the slice of the generated volume the informed slice stands for (where propagation starts); image: the
    real slice ``(S, S)`` in [-1, 1], if any; rule: the de-enhancement rule that chose the donor, if any."""

    source: str
    case: str | None = None
    index: int | None = None
    position: float | None = None
    target_index: int | None = None
    image: Any = None
    rule: str | None = None

    def record(self) -> dict:
        """The manifest's description: everything but the image (the rule only for donors from other cases)."""
        if self.source == "none":
            return {"source": "none"}
        skip = {"image"} | (set() if self.source == "other_case" else {"rule"})
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def informed_caption(informed: InformedSlice) -> str:
    """The preview's title of the informed slice: where it came from."""
    if informed.source == "generated":
        return f"informed slice: generated at position {informed.position:.2f} (slice {informed.target_index})"
    return f"informed slice: {informed.case} slice {informed.index}"


def sample_seed(seed: int, case: str, sample: int) -> int:
    """A stable per-sample seed from the run seed, the case name and the sample index."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{case}/{sample}".encode())) % (2**63 - 1)


PEAK_RSS_FILE = Path("/proc/self/clear_refs")  # Linux: writing "5" resets the process's peak RSS (VmHWM)
MEBIBYTE = 2**20


class PeakMemory:
    """Peak memory of the volumes a run generates, for their manifest records. ``start()`` before a volume (``reset``:
    each volume alone, ``batch_windows == 1``; else once per run), ``record()`` after it:
    ``{"device", "peak_rss_mb", "peak_rss_scope", ["cuda_peak_allocated_mb", "cuda_peak_scope"]}``.

    - ``peak_rss_mb``: the process's peak resident memory (MiB). Scope ``volume``: since this volume started (Linux
      resets the peak through ``/proc/self/clear_refs``); ``run``: since the run started (volumes generated in
      lockstep share it); ``process``: since the process started, where the peak cannot be reset (``getrusage``).
    - ``cuda_peak_allocated_mb`` (CUDA devices): ``torch.cuda.max_memory_allocated``, reset the same way (scope
      ``volume`` or ``run``)."""

    def __init__(self, device: torch.device, reset_per_volume: bool):
        self.device, self.reset_per_volume = torch.device(device), reset_per_volume
        self.rss_scope = "process"
        self.started = False

    def start(self) -> None:
        if self.started and not self.reset_per_volume:
            return
        scope = "volume" if self.reset_per_volume else "run"
        self.started = True
        try:
            PEAK_RSS_FILE.write_text("5")
            self.rss_scope = scope
        except OSError:  # not Linux, or not allowed: the process's peak so far
            self.rss_scope = "process"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def record(self) -> dict:
        out = {"device": str(self.device), "peak_rss_mb": round(peak_rss_bytes(self.rss_scope) / MEBIBYTE, 1),
               "peak_rss_scope": self.rss_scope}
        if self.device.type == "cuda":
            out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / MEBIBYTE, 1)
            out["cuda_peak_scope"] = "volume" if self.reset_per_volume else "run"
        return out


def peak_rss_bytes(scope: str) -> int:
    """The process's peak resident memory in bytes: ``VmHWM`` of ``/proc/self/status`` (which ``PeakMemory.start``
    resets) unless ``scope`` is ``process``, then ``getrusage``'s ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    if scope != "process":
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # Unix only: imported where it is needed

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def parse_informed_from(text: str) -> tuple[str, float | None]:
    """``CASE`` or ``CASE:POS`` (POS in [0, 1]) -> (case, pos or None)."""
    name, _, pos = text.partition(":")
    if not name:
        raise ValueError(f"--informed-from must be CASE or CASE:POS, got {text!r}")
    if not pos:
        return name, None
    try:
        value = float(pos)
    except ValueError:
        raise ValueError(f"--informed-from position must be a number in [0, 1], got {pos!r} in {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--informed-from position must be in [0, 1], got {value} in {text!r}")
    return name, value


def slice_index(pos: float, num_slices: int) -> int:
    """Relative position in [0, 1] -> slice index in [0, num_slices)."""
    return min(int(pos * num_slices), num_slices - 1)


class Enhancer:
    """Runs one setting over a dataset. ``run(rank, world_size)`` processes the cases ``rank::world_size``,
    ``sampler.batch_windows`` of them in lockstep (their windows in shared UNet calls)."""

    def __init__(self, cfg: InferenceConfig):
        self.cfg = cfg
        self.setting = cfg.setting_spec
        self.device = torch.device(cfg.device)
        self.volume_model = self.slice_model = None  # LoadedModels, where the setting needs them
        if self.setting.needs_volume_model:  # a stage-1 model runs the same windows, every slice independent
            self.volume_model = load_model_dir(cfg.model, ema=cfg.ema, trust=cfg.trust_checkpoint, device=self.device)
            spec = self.volume_model.model.spec
            if spec.use_informed != (self.setting.model == "gem3d") or spec.conditioning != "concat":
                raise ValueError(
                    f"setting {cfg.setting!r} needs a {self.setting.model} model (stage 2, or stage 1 alone); "
                    f"{cfg.model} holds variant {self.volume_model.model.variant!r}"
                )
        if self.setting.needs_slice_model:
            self.slice_model = load_model_dir(cfg.slice_model, ema=cfg.slice_ema, trust=cfg.trust_checkpoint,
                                              device=self.device)
            if self.slice_model.model.variant != "position":
                raise ValueError(f"--slice-model {cfg.slice_model} holds variant "
                                 f"{self.slice_model.model.variant!r}, not 'position'")
        if self.volume_model is not None and self.slice_model is not None:  # a generated latent feeds the volume model
            check_shared_first_stage(self.volume_model.model, self.slice_model.model, cfg.model, cfg.slice_model)
        self.dataset = open_dataset(cfg.data, channel=self._channel())
        if cfg.require_preprocessed and not isinstance(self.dataset, PreprocessedDataset):
            raise ValueError(f"--as-original runs the original's input: an nnU-Net preprocessed folder "
                             f"(nnUNet_preprocessed/<Dataset>), but --data {cfg.data} is a raw dataset")
        self.preprocess = self._preprocess_config()
        self.names = self.dataset.case_names(cfg.split)
        # the preprocessed case; a few recently used ones are kept (donors repeat)
        self.prepared = lru_cache(PREPARED_CACHE)(lambda name: prepare_case(self.load_case(name), self.preprocess))
        self.brightness_profile = cache(self._brightness_profile)
        self.memory = PeakMemory(self.device, reset_per_volume=cfg.sampler.batch_windows == 1)
        if cfg.informed_donor is not None:
            donor = cfg.informed_donor[0]
            if donor not in self.names:
                raise ValueError(
                    f"--informed-from: case {donor!r} is not in {cfg.data} (split {cfg.split}); cases: {self.names}"
                )

    def _channel(self) -> int | str | None:
        """The image channel: ``cfg.channel``, else the one the model was trained on, else None (channel 0)."""
        trained = next((m.channel for m in (self.volume_model, self.slice_model) if m is not None
                        and m.channel is not None), None)
        if self.cfg.channel is not None and trained is not None and str(self.cfg.channel) != str(trained):
            warnings.warn(f"--channel {self.cfg.channel!r} differs from the channel the model was trained on "
                          f"(data.params.channel {trained!r}); reading {self.cfg.channel!r} as asked", UserWarning,
                          stacklevel=3)
        return self.cfg.channel if self.cfg.channel is not None else trained

    def _preprocess_config(self) -> PreprocessConfig:
        """The model's own training preprocessing (the first model that carries one), else ``fallback_preprocess``;
        ``preprocess`` (explicit) keys are merged on top. An explicit value that differs from the model's own is an
        error naming both, unless ``force_preprocess`` (then a warning)."""
        model = next((m for m in (self.volume_model, self.slice_model) if m is not None and m.preprocess is not None),
                     None)
        own = None if model is None else dict(model.preprocess)
        base = own if own is not None else self.cfg.fallback_preprocess
        explicit = dict(self.cfg.preprocess or {})
        if base is None and not explicit:
            raise ValueError(
                "no preprocessing config: the model dir's config has no data.params.preprocess and the inference "
                "config has no fallback_preprocess; pass one (--config FILE with preprocess:, or preprocess.KEY=VALUE)"
            )
        chosen = PreprocessConfig.from_dict({**(base or {}), **explicit})
        if own is not None and explicit:
            trained = PreprocessConfig.from_dict(own)
            differ = {f.name: (getattr(trained, f.name), getattr(chosen, f.name)) for f in dataclasses.fields(chosen)
                      if getattr(trained, f.name) != getattr(chosen, f.name)}
            if differ:
                listed = ", ".join(f"{key}: model {a!r} vs config {b!r}" for key, (a, b) in differ.items())
                message = (f"the explicit preprocessing differs from the one {model.checkpoint} was trained with "
                           f"({listed})")
                if not self.cfg.force_preprocess:
                    raise ValueError(f"{message}; drop the override to use the model's, or pass --force-preprocess "
                                     f"to run with the config's")
                warnings.warn(f"{message}; using the config's (--force-preprocess)", UserWarning, stacklevel=3)
        return chosen

    def select_cases(self) -> list[str]:
        """The cases to enhance, from ``cfg.cases``."""
        spec = self.cfg.cases
        if spec in (None, "", "all"):
            return list(self.names)
        if spec.isdigit():
            return list(self.names[: int(spec)])
        if spec.startswith("split:"):
            return split_cases(self.cfg.data, spec.split(":", 1)[1])  # the dataset's own, else where training wrote it
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"--cases: unknown case(s) {unknown}; the dataset has {self.names}")
        return names

    def load_case(self, name: str):
        return self.dataset.load_case(name, split=self.cfg.split, slice_axis=self.preprocess.slice_axis)

    def _brightness_profile(self, name: str) -> np.ndarray:
        """``(D,)`` mean normalised intensity inside the body of every slice of case ``name`` (computed once)."""
        prepared = self.prepared(name)
        image = np.asarray(prepared.image)
        body = np.asarray(prepared.label) >= 0 if prepared.label is not None else np.ones(image.shape, bool)
        count = body.sum(axis=(1, 2))
        total = np.where(body, image, 0.0).sum(axis=(1, 2))
        return np.where(count > 0, total / np.maximum(count, 1), -1.0)

    def choose_informed(self, case: str, num_slices: int, rng: np.random.Generator) -> InformedSlice:
        """Where the informed slice of a sample of ``case`` (``num_slices`` slices) comes from, as the setting says."""
        kind = self.setting.informed
        if kind == "none":
            return InformedSlice("none")
        if kind == "own_middle":
            s = num_slices // 2
            return InformedSlice("own_middle", case, s, s / num_slices, s, self.informed_pixels(case, s))
        if kind == "generated":
            s = int(rng.integers(num_slices))
            return InformedSlice("generated", position=s / num_slices, target_index=s)
        if self.cfg.donor == "original" and self.cfg.informed_donor is None:
            return self._original_donor(num_slices, rng)
        # other_case: a real slice of another case at the same relative position
        donors = [n for n in self.names if n != case]
        pos = float(rng.uniform(0.0, 1.0))
        if self.cfg.informed_donor is not None:
            donor, fixed = self.cfg.informed_donor
            pos = pos if fixed is None else fixed
        elif not donors:
            raise ValueError(f"setting {self.cfg.setting!r} needs another case to take the informed slice from")
        elif self.cfg.informed_select:
            donor = self._select_donor(donors, pos, rng)
        else:
            donor = donors[int(rng.integers(len(donors)))]
        prepared = self.prepared(donor)
        index = slice_index(pos, prepared.num_slices)
        return InformedSlice("other_case", donor, index, pos, slice_index(pos, num_slices),
                             self.informed_pixels(donor, index), self.cfg.informed_select)

    def informed_pixels(self, case: str, index: int) -> np.ndarray:
        """Slice ``index`` of ``case`` as the model sees an informed slice ``(S, S)`` (its labels hidden when the
        model was trained so: ``preprocess.informed_labels``)."""
        prepared = self.prepared(case)
        label = None if prepared.label is None else prepared.label[index]
        return informed_image(prepared.image[index], label, self.preprocess)

    def _original_donor(self, num_slices: int, rng: np.random.Generator) -> InformedSlice:
        """The original's ``ic`` draw: a donor among the enhanced cases (the case itself included), the target slice
        ``s ~ randint(0, min(n_donor, n))`` and the donor's slice ``int(s / n * n_donor)``."""
        cases = self.select_cases()
        donor = cases[int(rng.integers(len(cases)))]
        prepared = self.prepared(donor)
        target = int(rng.integers(min(prepared.num_slices, num_slices)))
        index = int(target / num_slices * prepared.num_slices)
        return InformedSlice("other_case", donor, index, target / num_slices, target,
                             self.informed_pixels(donor, index), "original")

    def _select_donor(self, donors: list[str], pos: float, rng: np.random.Generator) -> str:
        """De-enhancement: the donor among the brightest / darkest decile of candidate slices at ``pos``
        (mean intensity inside the body)."""
        profiles = [self.brightness_profile(name) for name in donors]
        brightness = [float(profile[slice_index(pos, len(profile))]) for profile in profiles]
        order = np.argsort(brightness, kind="stable")
        if self.cfg.informed_select == "brightest":
            order = order[::-1]
        decile = order[: max(1, len(order) // 10)]
        return donors[int(decile[int(rng.integers(len(decile)))])]

    def output_paths(self, case: str, k: int) -> dict[str, Path]:
        base = self.cfg.setting_dir
        paths = {"image": base / f"{case}_s{k}_image.nii.gz"}
        if self.setting.mask != "none":
            paths["label"] = base / f"{case}_s{k}_label.nii.gz"
        if self.cfg.previews:
            paths["preview"] = base / "previews" / f"{case}_s{k}.png"
        return paths

    def sample(self, case_name: str, k: int) -> Generator:
        """Generate, write and describe sample ``k`` of ``case_name``, as a generator that yields the rounds of its
        windows (:func:`gem3d.sampling.propagation.run_lockstep` samples them) and returns its manifest record (its
        ``seconds`` are written by :meth:`SharedClock.timed`, which drives it in :meth:`run`). The steps draw from one
        ``rng`` and one torch ``generator`` seeded by :func:`sample_seed`, in this order."""
        self.memory.start()
        seed = sample_seed(self.cfg.seed, case_name, k)
        rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(seed)
        case = self._load_labelled_case(case_name)
        label, edits = self._sample_mask(case, rng)
        prepared = prepare_case(dataclasses.replace(case, label=label), self.preprocess)
        informed = self.choose_informed(case_name, prepared.num_slices, rng)
        loaded = self.slice_model if self.setting.model == "slice" else self.volume_model
        latents, informed = yield from self._sample_latents(prepared, informed, generator)
        image = restore_volume(decode_volume(loaded.model, latents).numpy(), prepared)
        if self.cfg.background == "real":
            image = real_background(image, case, label, self.preprocess)
        paths = self._write_outputs(case, k, image, np.maximum(label, 0).astype(np.int16), informed)
        return make_record(
            case_name, self.cfg.setting, k, seed,
            informed=informed.record(),
            mask_edits=None if edits is None else [edits],
            sampler=dataclasses.asdict(self.cfg.sampler),
            steps=self.cfg.sampler.steps,
            checkpoint_sha256=loaded.sha256,
            files={name: str(path.relative_to(self.cfg.setting_dir)) for name, path in paths.items()},
            channel={"index": self.dataset.channel, "name": self.dataset.channel_name},
            memory=self.memory.record(),
            preprocess=dataclasses.asdict(self.preprocess),
            background=self.cfg.background,
        )

    def _load_labelled_case(self, case_name: str) -> Case:
        """The case, refused when it has no label or (volume settings) fewer slices than a window."""
        case = self.load_case(case_name)
        if case.label is None:
            raise ValueError(f"case {case_name!r} has no label: GEM-3D generates a volume from its mask")
        window = self.cfg.sampler.window
        if self.setting.model != "slice" and case.num_slices < window:
            raise ValueError(
                f"case {case_name!r} has {case.num_slices} slices, fewer than a window of {window}; pass "
                f"--window {case.num_slices} (or fewer) for such short volumes"
            )
        return case

    def _sample_mask(self, case: Case, rng: np.random.Generator) -> tuple[np.ndarray, dict | None]:
        """The mask a sample is generated from, ``(D, H, W)`` int16 (-1 outside the body kept, as nnU-Net's
        preprocessed seg has it), and the edit's description: the case's own, or the ``icma`` edit of its lesion
        labels (``mask_edit.lesion_labels``; None: every label > 0)."""
        label = np.asarray(case.label).astype(np.int16)
        if self.setting.mask != "edited":
            return label, None
        lesions = self.cfg.mask_edit.get("lesion_labels")
        if lesions is not None and len(lesions) == 0:
            raise ValueError(
                f"setting {self.cfg.setting!r} edits the lesion labels, but mask_edit.lesion_labels is empty (the "
                f"abdomen config moves no organ); pass --lesion-labels 1,2 (or set mask_edit.lesion_labels)"
            )
        moved = label > 0 if lesions is None else np.isin(label, [int(v) for v in lesions])
        if not moved.any():
            raise ValueError(
                f"case {case.name!r}: its label has no lesion voxels (lesion labels "
                f"{'> 0' if lesions is None else list(lesions)}) for setting {self.cfg.setting!r} to edit; use ic "
                f"(or ig) for this case, or exclude it with --cases"
            )
        body = sample_body(case, label, self.preprocess)
        flip_axis = mask_edit.left_right_axis(self.preprocess.slice_axis)  # the label is canonical (D, H, W)
        edited, edits = mask_edit.icma_edit(label, body, rng, **{"lr_axis": flip_axis, **self.cfg.mask_edit})
        return edited.astype(np.int16), edits

    def _sample_latents(self, prepared: PreparedCase, informed: InformedSlice,
                        generator: torch.Generator) -> Generator:
        """The sample's latents ``(D, C, h, w)`` and its informed slice (with its image once generated), as a
        generator that yields the rounds of its windows: the slice model alone, or the volume model conditioned on
        the grey mask and the informed slice."""
        options = self.cfg.sampler
        num_slices = prepared.num_slices
        if self.setting.model == "slice":
            positions = torch.arange(num_slices, dtype=torch.float32) / num_slices
            latents = sample_slice_latents(self.slice_model.model, positions, self._latent_hw(prepared), options,
                                           generator)
            return latents, informed
        model = self.volume_model.model
        draw = {"sample": options.condition_posterior == "sample", "generator": generator}
        if model.mask_encoding == "label_fractions" and model.max_label != prepared.max_label:
            raise ValueError(f"the volume model encodes masks with max_label={model.max_label}, but the preprocessing "
                             f"has max_label={prepared.max_label}: set preprocess.max_label to the model's")
        mask_latent = model.encode_mask(rearrange(torch.from_numpy(prepared.grey_mask()), "d h w -> d 1 h w"), **draw)
        informed_latent = None
        if informed.source == "generated":  # its image: the generated slice, decoded
            position = torch.tensor([informed.position])
            informed_latent = sample_slice_latents(self.slice_model.model, position, self._latent_hw(prepared),
                                                   options, generator)[0]
            informed = dataclasses.replace(informed, image=decode_volume(model, informed_latent[None])[0].numpy())
        elif informed.image is not None:
            image = torch.as_tensor(np.asarray(informed.image))
            informed_latent = encode_slices(model, image[None], **draw)[0]
        start_latent = label_region = None
        if informed_latent is not None and float(options.informed_start) < 1.0:
            start_latent = informed_start_latents(model, np.asarray(informed.image), np.asarray(prepared.label))
            if options.label_start is not None:
                label_region = label_region_latent(prepared.label, tuple(start_latent.shape[-2:]))
        latents = yield from volume_propagation(model, mask_latent, informed_latent, informed.target_index, options,
                                                generator, start_latent, label_region)
        return latents, informed

    def _latent_hw(self, prepared: PreparedCase) -> tuple[int, int]:
        """The slice model's latent size for the prepared slices (the volume model shares its first stage)."""
        factor = self.slice_model.model.first_stage.downsample_factor
        return prepared.image.shape[1] // factor, prepared.image.shape[2] // factor

    def _write_outputs(self, case: Case, k: int, image: np.ndarray, label: np.ndarray,
                       informed: InformedSlice) -> dict[str, Path]:
        """Write the sample's image ``(source grid)``, its mask (``label``: canonical, >= 0), the ground truth where
        the setting has one, and the preview; returns the paths written."""
        paths = self.output_paths(case.name, k)
        geometry = case.geometry
        save_nifti(image, geometry, paths["image"])
        if "label" in paths:
            save_nifti(geometry.to_source(label), geometry, paths["label"], dtype=np.int16)
        if self.setting.has_ground_truth:
            gt = self.cfg.setting_dir / f"{case.name}_gt.nii.gz"
            if not gt.exists():
                save_nifti(geometry.to_source(np.asarray(case.image, np.float32)), geometry, gt)
            paths["gt"] = gt
        if "preview" in paths:
            title = f"{self.cfg.setting} s{k}"
            save_preview(
                paths["preview"],
                [("real", np.asarray(case.image)), (title, geometry.to_canonical(image))],
                mask=label if self.setting.mask != "none" else None,
                spacing=geometry.spacing,
                max_label=self.preprocess.max_label,
                # an edited mask is not the real image's: outline it on the synthetic volume only
                contours=[title] if self.setting.mask == "edited" else True,
                informed=None if informed.image is None else np.asarray(informed.image),
                informed_title=informed_caption(informed),
                informed_index=informed.target_index,
            )
        return paths

    def is_done(self, manifest: Manifest, case: str, k: int) -> bool:
        key = (case, self.cfg.setting, k)
        return manifest.has(key) and all(p.exists() for p in self.output_paths(case, k).values())

    def run(self, rank: int = 0, world_size: int = 1) -> Path:
        """Generate this rank's share of the samples (``cfg.part`` = (i, n), when set, is the rank and the world
        size: one of n independent processes, e.g. a SLURM array task); returns the manifest it wrote. The progress
        bar advances when a sample is written."""
        if self.cfg.part is not None:
            rank, world_size = self.cfg.part
        prepare_output_dir(self.cfg.setting_dir)
        lock = (output_lock(self.cfg.setting_dir, f".gem3d.part{rank}of{world_size}.lock") if self.cfg.part
                else output_lock(self.cfg.setting_dir) if rank == 0 else nullcontext())
        with lock:
            if world_size == 1:  # nobody else writes here: drop the temporary files of a killed run
                for leftover in self.cfg.setting_dir.rglob(".*.tmp*"):
                    leftover.unlink(missing_ok=True)
            merged = Manifest(self.cfg.setting_dir / "manifest.json")
            own_path = merged.path if world_size == 1 else self.cfg.setting_dir / f"manifest.rank{rank}.json"
            manifest = merged if world_size == 1 else Manifest(own_path)
            jobs = [(c, k) for c in self.select_cases() for k in range(self.cfg.samples_per_case)][rank::world_size]
            todo = [(c, k) for c, k in jobs if not (self.is_done(merged, c, k) or self.is_done(manifest, c, k))]
            name = f"{self.cfg.setting} ({'part' if self.cfg.part else 'rank'} {rank})" if world_size > 1 else None
            with tqdm(total=len(todo), desc=name or self.cfg.setting, disable=not self.cfg.progress) as bar:
                clock = SharedClock()
                samples = (clock.timed(self.sample(case, k)) for case, k in todo)
                model = None if self.volume_model is None else self.volume_model.model
                rounds = clock.shared(partial(sample_rounds, model, self.cfg.sampler))
                for record in run_lockstep(rounds, samples, self.cfg.sampler.batch_windows):
                    manifest.add(record, replace=True)
                    bar.update(1)
            return own_path


class SharedClock:
    """Each volume's share of a run's wall time when volumes are sampled in lockstep (``batch_windows`` > 1): its
    own work (loading, decoding, writing, in its generator) plus, for every sampling round it took part in, that
    round's time divided by the volumes in the round. The shares add up to the run's time; one volume at a time,
    a share is the volume's wall time. :meth:`timed` writes it into the record's ``seconds``."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock  # seconds, monotonic
        self.per_volume = 0.0  # seconds of shared rounds per taking part, summed over the rounds so far

    def shared(self, sample_rounds):
        """``sample_rounds`` (one call per round, a list of each volume's jobs), timed and split among them."""
        def call(rounds):
            t0 = self.clock()
            outputs = sample_rounds(rounds)
            self.per_volume += (self.clock() - t0) / max(1, len(rounds))
            return outputs
        return call

    def timed(self, stepper: Generator) -> Generator:
        """``stepper`` (:meth:`Enhancer.sample`) as seen by ``run_lockstep``, its record's ``seconds`` replaced by
        the volume's share."""
        seconds, t0 = 0.0, self.clock()
        try:
            jobs = next(stepper)
            while True:
                seconds += self.clock() - t0
                mark = self.per_volume
                outputs = yield jobs
                seconds += self.per_volume - mark
                t0 = self.clock()
                jobs = stepper.send(outputs)
        except StopIteration as done:
            record = done.value
            record["seconds"] = round(seconds + self.clock() - t0, 3)
            return record


LOCK_NAME = ".gem3d.lock"


def prepare_output_dir(folder: Path) -> None:
    """Create ``folder``; a path that cannot be a writable folder fails with one line naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output {str(folder)!r} is not a writable folder ({exc.strerror or exc}); "
                         f"choose another --out") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"output {str(folder)!r} is not a writable folder (permission denied); choose another --out")


def first_stage_fingerprint(model) -> tuple[str, float]:
    """``(SHA-256 of the first stage's weights, its scale factor)``: two models share an autoencoder when these
    agree."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.first_stage.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest(), float(model.first_stage.scale_factor)


def sample_body(case: Case, label: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """The body of a sample, canonical ``(D, H, W)`` bool: the real image's (:func:`compute_body_mask`) plus the
    mask's labelled voxels, or, where ``label`` marks the outside with -1 (nnU-Net's seg: -1 outside its crop),
    the rest."""
    if (label < 0).any():
        return label >= 0
    return compute_body_mask(np.asarray(case.image), preprocess) | (label > 0)


def real_background(image: np.ndarray, case: Case, label: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """``image`` (the sample, source grid) with every voxel outside the body replaced by the real case's own voxel
    there (the body: :func:`sample_body` of the sample's canonical ``label``)."""
    outside = case.geometry.to_source(~sample_body(case, label, preprocess))
    return np.where(outside, case.geometry.to_source(np.asarray(case.image, np.float32)), image).astype(np.float32)


def check_shared_first_stage(volume_model, slice_model, volume_path, slice_path) -> None:
    """Refuse a slice model whose autoencoder is not the volume model's (a generated latent feeds the volume model):
    the first stages' weights (hash) and scale factors must agree."""
    volume, sliced = first_stage_fingerprint(volume_model), first_stage_fingerprint(slice_model)
    if volume != sliced:
        raise ValueError(
            f"the slice model {slice_path} and the volume model {volume_path} must share one autoencoder; their "
            f"first stages differ: weights sha256 {sliced[0][:12]} vs {volume[0][:12]}, scale factor {sliced[1]:g} vs "
            f"{volume[1]:g}"
        )


@contextmanager
def output_lock(folder: Path, name: str | None = None) -> Iterator[None]:
    """Hold ``folder/.gem3d.lock`` (or ``folder/name``) while a run writes there (an OS file lock: a killed run's
    lock goes with its process); a second run on the same folder fails naming the first one's process."""
    path = folder / (name or LOCK_NAME)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(
            f"another gem3d run ({path.read_text() or 'pid ?'}) is writing to {folder} (lock file {path}); wait for "
            f"it to finish, or choose another --out"
        ) from None
    path.write_text(f"pid {os.getpid()} on {socket.gethostname()}")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # a user may have removed it
        lock.release()


def merge_rank_manifests(setting_dir: Path, world_size: int) -> Path:
    """Merge ``manifest.rank*.json`` into ``manifest.json`` and delete them. The ranks' records are merged with each
    other (:func:`merge_manifests`: a key in two rank files must hold the same record) and then replace the records of
    an earlier run under the same key (a regenerated sample)."""
    manifest = Manifest(setting_dir / "manifest.json")
    rank_paths = [p for p in (setting_dir / f"manifest.rank{r}.json" for r in range(world_size)) if p.exists()]
    merged_ranks = merge_manifests(rank_paths, setting_dir / "manifest.ranks.json")
    manifest.extend(merged_ranks.records, replace=True)
    for path in [*rank_paths, merged_ranks.path]:
        path.unlink()
    return manifest.path


def run_inference(cfg: InferenceConfig, gpus: list[int] | None = None, num_processes: int = 1) -> Path:
    """Run a setting on one device, or shard the cases over ``gpus`` (CUDA) or ``num_processes`` CPU processes with
    Lightning Fabric's DDP launcher (one process per device); the manifests are merged at the end. Sharded runs must
    start from a script (``scripts/inference_*.py --num-processes N`` / ``--gpus``): Fabric's launcher starts the other
    ranks by re-running ``sys.argv``. Every rank returns the merged manifest's path."""
    devices = len(gpus) if gpus else num_processes
    if devices <= 1:
        if gpus:
            cfg.device = f"cuda:{gpus[0]}"
        return Enhancer(cfg).run()
    from lightning.fabric import Fabric  # here: a one-device run (every demo run) needs no Lightning (4 s to import)

    fabric = Fabric(accelerator="cuda" if gpus else "cpu", devices=gpus or devices, strategy="ddp")
    fabric.launch()
    cfg.device = str(fabric.device)
    Enhancer(cfg).run(rank=fabric.global_rank, world_size=fabric.world_size)
    fabric.barrier()
    out = cfg.setting_dir / "manifest.json"
    if fabric.global_rank == 0:
        merge_rank_manifests(cfg.setting_dir, fabric.world_size)
    fabric.barrier()
    return out
