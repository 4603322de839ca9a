"""Fill a training config's caches ahead of training, so that no rank of the training job waits on the encoding:

    python -m gem3d.training.encode --base configs/latent-diffusion/abdomen_stage1.yaml [--part I/N] [--device cuda] \
        [data.params.dataset_dir=/data/Dataset002_AbdomenCT1K ...]

It reads the same configs and ``key=value`` overrides as ``main.py``, writes the splits, prints the cache's size
estimate, then prepares the cases of share I of N (every N-th case, 1-based: one SLURM array task each) and
encodes them with the config's first stage (``model.params.first_stage_config``) unless ``data.params.latent_cache``
is false. Training then reads the cache (the same preprocessing and first-stage weights find the same folder).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from omegaconf import OmegaConf

from gem3d.config import (
    ALLOW_ANY_TARGET_FLAG, allow_any_target, check_config_targets, error_line, instantiate_from_config,
    load_config_file,
)  # fmt: skip

__all__ = ["parse_part", "encode_from_config", "main"]


def parse_part(value: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(1, 4)``: 0-based share index and share count."""
    try:
        index, count = (int(v) for v in str(value).split("/"))
    except ValueError:
        index, count = 0, 0
    if not 1 <= index <= count:
        raise ValueError(f"--part {value!r}: expected I/N with 1 <= I <= N, e.g. 1/4")
    return index - 1, count


def encode_from_config(config, part: tuple[int, int] = (0, 1), device: str = "cpu") -> dict[str, int]:
    """Prepare and encode share ``part`` of the cases of ``config`` (a merged main.py config); returns
    ``{"prepared", "encoded"}`` (cases done now, not found in the cache)."""
    from gem3d.data.datasets import VARIANT_MARK, LatentCache
    from gem3d.data.module import share_of
    from gem3d.training.ldm import FirstStageLatentEncoder

    data = instantiate_from_config(config.data)
    cache, splits = data.cache_and_splits()
    names = share_of(data.train_names(splits) + splits["val"], part)
    first_stage_cfg = OmegaConf.select(config, "model.params.first_stage_config")
    encoder = None
    if data.latent_cache and first_stage_cfg is not None:
        first_stage = instantiate_from_config(first_stage_cfg)
        first_stage.freeze()
        encoder = FirstStageLatentEncoder(first_stage.to(device))
    data.print_estimate(cache, encoder.latent_channels if encoder else 0, encoder.downsample_factor if encoder else 8)
    cache.prepare_all(sorted({n.split(VARIANT_MARK)[0] for n in names}))
    encoded = 0
    if encoder is not None:
        latents = LatentCache(cache, encoder)
        latents.encode_all(names)
        encoded = latents.encoded_count
    print(f"part {part[0] + 1}/{part[1]}: prepared {cache.prepared_count} and encoded {encoded} cases into "
          f"{cache.cache_dir}", flush=True)
    return {"prepared": cache.prepared_count, "encoded": encoded}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--base", nargs="+", required=True, metavar="config.yaml",
                        help="main.py's config files, merged left to right")
    parser.add_argument("--part", default="1/1", help="share I of N of the cases (1-based), e.g. 2/4")
    parser.add_argument("--device", default="cpu", help="the first stage's device, e.g. cuda")
    parser.add_argument(ALLOW_ANY_TARGET_FLAG, action="store_true", help="let configs name any 'target:'")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    opt, overrides = parser.parse_known_args(argv)
    try:
        bad = [o for o in overrides if "=" not in o or o.startswith("-")]
        if bad:
            raise ValueError(f"unrecognised arguments {bad}; overrides look like 'data.params.dataset_dir=/data/x'")
        part = parse_part(opt.part)
        with allow_any_target(opt.allow_any_target):
            config = OmegaConf.merge(*[load_config_file(p) for p in opt.base], OmegaConf.from_dotlist(overrides))
            check_config_targets(config, where="the config")
            encode_from_config(config, part=part, device=opt.device)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as err:
        if opt.debug:
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
