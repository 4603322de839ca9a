#!/usr/bin/env python
"""The CPU demo, end to end (what `make demo` runs): the demo dataset, its trainings, every setting on the held-out
cases, an enhanced nnU-Net dataset, the evaluation with its reference rows, and the tables.

    python scripts/demo.py [--out demo_out] [--time-scale 4] [--max-steps 2 --sampling-steps 2]

Every option is described by ``--help``; the logic lives in :mod:`gem3d.demo`.
"""
from gem3d.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
