#!/usr/bin/env python3
"""Train / evaluate a stitchable neural network (SN-Net) with timm's flags. See docs/training.md and `train.py --help`."""
import sys

from snnet.train.main import main

if __name__ == "__main__":
    sys.exit(main())
