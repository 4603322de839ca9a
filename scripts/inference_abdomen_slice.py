#!/usr/bin/env python
"""GEM-3D inference on the abdomen dataset, setting 'slice' (see gem3d/inference/settings.py; --help for flags)."""
from gem3d.inference.cli import main

if __name__ == "__main__":
    raise SystemExit(main(dataset="abdomen", setting="slice"))
