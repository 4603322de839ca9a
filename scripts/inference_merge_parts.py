#!/usr/bin/env python
"""Join the manifests of ``--part I/N`` inference runs (SLURM array tasks) into ``OUT/<setting>/manifest.json``.

    python scripts/inference_merge_parts.py OUT/<setting> --parts N
"""
from gem3d.inference.cli import merge_parts_main

if __name__ == "__main__":
    raise SystemExit(merge_parts_main())
