#!/usr/bin/env python
"""Convert a model folder into a converted gem3d model folder (see gem3d/convert.py):
python scripts/convert_gem3d_checkpoint.py infer_model/brain infer_model/brain_gem3d [--ema] [--overwrite]"""
import sys

from gem3d.convert import main

if __name__ == "__main__":
    sys.exit(main())
