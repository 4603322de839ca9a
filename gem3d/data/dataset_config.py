"""The dataset block of the training configs, written from a dataset's ``dataset.json`` and intensity statistics
(as nnU-Net's planning reads its dataset fingerprint):

    python scripts/new_dataset_config.py /data/nnUNet_raw/Dataset005_MyCT -o configs/datasets/my_ct.yaml
    python main.py --base configs/latent-diffusion/abdomen_stage1.yaml configs/datasets/my_ct.yaml -t ...

The block is ``data.params.{dataset_dir, preprocess}``, every preprocessing key written out, so that it overrides
the stage config's dataset block (``configs/datasets/*.yaml``) completely:
- ``max_label``: the largest label of ``dataset.json`` (region-based label lists included);
- CT (the channel's name in ``dataset.json`` says ``CT``, as nnU-Net's normalisation choice reads it): ``intensity:
  window`` from the 0.5 and 99.5 percentiles of the labelled voxels' intensities over the training cases (nnU-Net's
  CT clipping), ``body: threshold`` at -500 HU;
- any other modality (MRI): ``intensity: minmax`` per volume and ``body: nonzero``, as the paper's brain models.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from .nnunet import RawDataset
from .preprocess import PreprocessConfig

__all__ = ["foreground_intensities", "dataset_block", "write_dataset_block", "main"]

CT_BODY_THRESHOLD_HU = -500.0  # air lies below, soft tissue above
PERCENTILES = (0.5, 99.5)
SAMPLES_PER_CASE = 10_000  # labelled voxels drawn per case, as nnU-Net's fingerprint does


def is_ct(channel_name: str) -> bool:
    """nnU-Net's rule: the channel is CT when ``dataset.json`` names it ``CT`` (any case)."""
    return channel_name.strip().casefold() == "ct"


def foreground_intensities(dataset: RawDataset, names: Sequence[str], channel: int = 0, seed: int = 0,
                           samples_per_case: int = SAMPLES_PER_CASE) -> np.ndarray:
    """Intensities of up to ``samples_per_case`` labelled voxels (label > 0) of each case, drawn without
    replacement with ``seed``; 1-D float64."""
    rng = np.random.default_rng(seed)
    drawn = []
    for name in names:
        case = dataset.load_case(name, channel=channel)
        values = np.asarray(case.image, dtype=np.float64)[np.asarray(case.label) > 0]
        if values.size > samples_per_case:
            values = rng.choice(values, samples_per_case, replace=False)
        drawn.append(values)
    values = np.concatenate(drawn) if drawn else np.zeros(0)
    if values.size == 0:
        raise ValueError(f"{dataset.root}: no labelled voxel (label > 0) in the {len(names)} cases read; the "
                         f"intensity window comes from the labelled voxels")
    return values


def dataset_block(dataset_dir: str | Path, channel: int = 0, size: int | None = 512, slice_axis: int = 2,
                  max_cases: int | None = None, seed: int = 0) -> tuple[dict, list[str]]:
    """``({"data": {"params": {"dataset_dir", "preprocess"}}}, comment lines)`` for the dataset at ``dataset_dir``;
    the intensity statistics read ``max_cases`` training cases (None: all; CT only)."""
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    dataset = RawDataset(dataset_dir)
    if str(channel) not in dataset.channel_names:
        raise ValueError(f"channel {channel} is not in {dataset_dir}/dataset.json channel_names "
                         f"{dataset.channel_names}")
    channel_name = dataset.channel_names[str(channel)]
    names = dataset.case_names("Tr")
    if not names:
        raise FileNotFoundError(f"{dataset_dir}: no training cases (imagesTr/<case>_0000{dataset.file_ending})")
    labels = ", ".join(f"{name} {value}" for name, value in sorted(dataset.labels.items(), key=lambda kv: kv[1]))
    comments = [f"dataset block written by scripts/new_dataset_config.py from {dataset_dir}",
                f"labels: {labels}"]
    if is_ct(channel_name):
        read = names if max_cases is None else names[:max_cases]
        low, high = np.percentile(foreground_intensities(dataset, read, channel, seed), PERCENTILES)
        cfg = PreprocessConfig(size=size, slice_axis=slice_axis, intensity="window",
                               window=(round(float(low), 1), round(float(high), 1)), max_label=dataset.max_label,
                               body="threshold", body_threshold=CT_BODY_THRESHOLD_HU)
        comments.append(f"channel {channel} {channel_name!r}: CT, window = the {PERCENTILES[0]} and {PERCENTILES[1]} "
                        f"percentiles of the labelled voxels of {len(read)} training cases; body above "
                        f"{CT_BODY_THRESHOLD_HU:g} HU")
    else:
        cfg = PreprocessConfig(size=size, slice_axis=slice_axis, intensity="minmax", max_label=dataset.max_label,
                               body="nonzero")
        comments.append(f"channel {channel} {channel_name!r}: not CT, so min-max per volume and the nonzero body")
    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    return {"data": {"params": {"dataset_dir": str(dataset_dir), "preprocess": preprocess}}}, comments


def write_dataset_block(path: str | Path, block: dict, comments: Sequence[str]) -> Path:
    """The block as YAML with its comments on top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in comments) + yaml.safe_dump(block, sort_keys=False)
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_dir", help="an nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("-o", "--out", required=True, help="the YAML file to write")
    parser.add_argument("--channel", type=int, default=0, help="the image channel the models use (default 0)")
    parser.add_argument("--size", type=int, default=512, help="in-plane side in pixels (default 512, the paper's)")
    parser.add_argument("--slice-axis", type=int, default=2, help="RAS axis of the slices (default 2, axial)")
    parser.add_argument("--max-cases", type=int, default=None, help="read at most this many cases for the statistics")
    opt = parser.parse_args(argv)
    try:
        block, comments = dataset_block(opt.dataset_dir, channel=opt.channel, size=opt.size,
                                        slice_axis=opt.slice_axis, max_cases=opt.max_cases)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_dataset_block(opt.out, block, comments)
    print("".join(f"# {line}\n" for line in comments) + yaml.safe_dump(block, sort_keys=False), end="")
    print(f"wrote {opt.out}")
    return 0
