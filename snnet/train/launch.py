"""``python -m snnet.train.launch [torchrun options] train.py ARGS``: torchrun, as distributed_train.sh starts it, with
one difference: a launch whose first failed process exited 2 (an input refused inside a rank, which printed its one
line `error: ...`) ends with exit 2 and nothing more, not torchrun's ChildFailedError traceback and banner. Any other
failure (a crash, a kill) is reported by torchrun as before."""
from __future__ import annotations

import sys

from snnet.core.errors import UsageError


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode == UsageError.exit_code:  # the rank said why, in one line
            return first.exitcode
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
