#!/usr/bin/env python3
"""Train / evaluate a stitchable neural network (SN-Net) with timm's flags. See docs/training.md and
`train.py --help`."""
import sys

from snnet.train.preempt import STOP

STOP.install()  # first, before torch loads (seconds): under Slurm a warning or preemption signal during start-up is
#                 noted and the run stops at its first step with a recovery checkpoint, instead of dying (docs/slurm.md)

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # the flags alone, without torch and timm
    from snnet.train.args import parse_args
    from snnet.utils.errors import SNNetError, one_line
    try:
        parse_args(sys.argv[1:])  # prints the help, with the values a -c or --stitch_config file sets, and exits
    except SNNetError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)

from snnet.train.main import main  # noqa: E402 (after the signal handlers, on purpose)

if __name__ == "__main__":
    sys.exit(main())
