#!/usr/bin/env python
"""Evaluate synthetic volumes against the real dataset: metrics.csv, summary.md, plots and report.html, with the
reference rows and the label fidelity of a segmenter trained on the real training cases.

    python scripts/evaluate.py --real DATASET --synthetic gem3d=OUT/test --synthetic base=OUT/base --out REPORT_DIR

Every option is described by ``--help``; the logic lives in :mod:`gem3d.metrics.evaluation`.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gem3d.metrics.evaluation import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
