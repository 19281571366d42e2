#!/usr/bin/env python3
"""Train / evaluate a stitchable neural network (SN-Net) with timm's flags. See docs/training.md and
`train.py --help`."""
import os
import sys

from snnet.train.preempt import STOP

STOP.install()  # first, before torch loads (seconds): under Slurm a warning or preemption signal during start-up is
#                 noted and the run stops at its first step with a recovery checkpoint, instead of dying (docs/slurm.md)

# the flags, their files and the data folder checked before torch and timm load (seconds): --help is printed at once
# and a typo refused at once (a launched rank's launch checked them already)
if __name__ == "__main__" and ({"-h", "--help"} & set(sys.argv[1:]) or not {"RANK", "SLURM_PROCID"} & set(os.environ)):
    from snnet.train.args import refused_before_torch
    if code := refused_before_torch(sys.argv[1:]):
        sys.exit(code)

from snnet.train.main import main  # noqa: E402 (after the signal handlers, on purpose)

if __name__ == "__main__":
    sys.exit(main())
