"""A second original-GEM-3D fixture set derived from the first, for testing the equivalence tests themselves.

The original code cannot run here, so the variant only changes what can be changed without it, keeping every
expected output exact:

- **several clips per batch**: every row-wise vector gets a second block of rows after the first (clip-major,
  ``2 * rows`` rows). Volumetric models (pseudo-3D UNet, clips of the original's 16 slices) see the same clip twice,
  each clip being independent; slice-wise models (2D UNet, position model, the autoencoder vectors) see the rows
  again in reverse order, each row being independent. Expected outputs follow the same rule.
- **an unreachable attention rate** in every UNet config (``2 ** len(channel_mult)``): the original never builds
  attention there, so the checkpoint and outputs are unchanged, and a test assuming that every configured rate
  exists fails.

Checkpoints and ``e2e.pt`` are linked, not copied. Run as a script to write a variant folder::

    python tests/_fixture_variants.py /work/shared/fixtures/original-gem3d /tmp/variant
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

ROW_INDEPENDENT_KEYS = ("image", "latent_mean_scaled", "decoded", "pos")  # per row in every folder


def model_folders(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).iterdir() if (p / "checkpoints" / "last.ckpt").is_file())


def _second_block(value: torch.Tensor, per_row: bool) -> torch.Tensor:
    return value.flip(0) if per_row else value


def several_clips(vectors: dict, volumetric: bool) -> dict:
    """``vectors`` with every row-wise tensor doubled as described in the module docstring."""
    rows = vectors["x"].shape[0]
    out = {}
    for key, value in vectors.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows and key != "ddim_timesteps":
            per_row = key in ROW_INDEPENDENT_KEYS or not volumetric
            out[key] = torch.cat([value, _second_block(value, per_row)])
        else:
            out[key] = value
    return out


def with_unreachable_attention(config: dict) -> dict:
    unet = config["model"]["params"]["unet_config"]["params"]
    unreachable = 2 ** len(unet.get("channel_mult", (1, 2, 4, 8)))
    unet["attention_resolutions"] = [*unet["attention_resolutions"], unreachable]
    return config


def write_variant(src: str | Path, dst: str | Path) -> Path:
    """The variant of the fixture folder ``src`` in ``dst`` (see the module docstring)."""
    src, dst = Path(src), Path(dst)
    folders = model_folders(src)
    if not folders:
        raise FileNotFoundError(f"no model folders (checkpoints/last.ckpt) under {src}")
    for folder in folders:
        target = dst / folder.name
        (target / "checkpoints").mkdir(parents=True)
        (target / "configs").mkdir()
        (target / "checkpoints" / "last.ckpt").symlink_to((folder / "checkpoints" / "last.ckpt").resolve())
        volumetric = False
        for config_path in (folder / "configs").glob("*.yaml"):
            config = yaml.safe_load(config_path.read_text())
            volumetric = "pseudo3D" in config["model"]["params"]["unet_config"]["target"]
            (target / "configs" / config_path.name).write_text(yaml.safe_dump(with_unreachable_attention(config)))
        if (folder / "vectors.pt").is_file():
            vectors = torch.load(folder / "vectors.pt", map_location="cpu", weights_only=True)
            torch.save(several_clips(vectors, volumetric), target / "vectors.pt")
        if (folder / "e2e.pt").is_file():
            (target / "e2e.pt").symlink_to((folder / "e2e.pt").resolve())
    return dst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    print(f"variant written to {write_variant(args.src, args.dst)}")
