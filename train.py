#!/usr/bin/env python3
"""Train / evaluate a stitchable neural network (SN-Net) with timm's flags. See docs/training.md and
`train.py --help`."""
import sys

from snnet.train.preempt import STOP

STOP.install()  # first, before torch loads (seconds): under Slurm a warning or preemption signal during start-up is
#                 noted and the run stops at its first step with a recovery checkpoint, instead of dying (docs/slurm.md)

from snnet.train.main import main  # noqa: E402 (after the signal handlers, on purpose)

if __name__ == "__main__":
    sys.exit(main())
