#!/usr/bin/env python
"""GEM-3D inference on the demo dataset, setting 'icma' (see gem3d/inference/settings.py; --help for flags)."""
from gem3d.inference.cli import main

if __name__ == "__main__":
    raise SystemExit(main(dataset="demo", setting="icma"))
