#!/usr/bin/env python
"""GEM-3D inference on the brain dataset, setting 'ic' (see gem3d/inference/settings.py; --help for flags)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gem3d.inference.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(dataset="brain", setting="ic"))
