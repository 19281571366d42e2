"""``python -m snnet.train.launch [torchrun options] train.py ARGS``: torchrun, as distributed_train.sh starts it, with
these differences:

* a ``-h``/``--help`` among the script's arguments prints the script's help (train.py's, without loading torch)
  instead of launching anything, and a ``--dry-run`` is resolved and printed by this process for the launch's
  world size (nodes x processes per node), no process started;
* the launch's checks run first, in this process (`snnet.train.preflight`, for ``--nproc_per_node`` processes per
  node; ``SNNET_NO_PREFLIGHT=1`` skips them): a refused input ends the launch with its one line and exit 2 before any
  process starts. In this process rather than a separate one, so a launch starts one interpreter less (torch's
  import, about 2.5 s of CPU, paid once);
* a launch whose first failed process exited 2 (an input refused inside a rank) ends with that rank's one line
  `error: ...` and exit 2, not torchrun's ChildFailedError traceback and banner. The ranks write their line to a
  folder of this launch (`say_refusal`) and this process prints the first failed rank's, so the line is there
  whichever rank failed first (printed by rank 0, it was lost when torchrun stopped rank 0 before it printed). Any
  other failure (a crash, a kill) is reported by torchrun as before."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from snnet.utils.distributed import REFUSAL_DIR
from snnet.utils.errors import UsageError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    script = next((i for i, a in enumerate(argv) if a.endswith(".py") and not a.startswith("-")), None)
    if script is not None and {"-h", "--help"} & set(argv[script + 1:]):
        # the script's help, which train.py prints without loading torch: no launch, no checks, no processes
        return subprocess.run([sys.executable, *argv[script:]]).returncode
    if script is not None and not os.environ.get("SNNET_NO_PREFLIGHT"):
        from snnet.train.args import refused_before_torch
        code = refused_before_torch(argv[script + 1:])
        if code:
            return code
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    config = parse_args(argv)
    nproc = int(config.nproc_per_node) if str(config.nproc_per_node).isdigit() else 1  # "gpu", "auto": taken as 1
    if "--dry-run" in config.training_script_args:
        # the run as this launch would resolve it, printed by this process: the ranks would each resolve the same
        nodes = str(config.nnodes).split(":")[-1]  # "MIN:MAX": the most nodes the launch may have
        world_size = (int(nodes) if nodes.isdigit() else 1) * nproc
        os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
        from snnet.train.main import main as train_main
        return train_main(config.training_script_args)
    if not os.environ.get("SNNET_NO_PREFLIGHT"):
        from snnet.train.preflight import main as preflight
        code = preflight([str(nproc), *config.training_script_args])
        if code:
            return code
        from snnet.data.checks import WARNED_ENV
        os.environ[WARNED_ENV] = "1"  # the check warned about the data once; its ranks need not again
    # torchrun's 4-line banner about OMP_NUM_THREADS, on every launch, says it sets 1 thread per process when the
    # variable is unset: set here, the same setting without the banner (a value the user set is kept)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    said = Path(tempfile.mkdtemp(prefix="snnet-launch-"))
    os.environ[REFUSAL_DIR] = str(said)
    if config.log_dir is None and config.redirects == config.tee == "0":
        # torchrun's own log folder would be a new empty /tmp/torchelastic_* left by every launch: this one goes
        # with the launch (a launch that redirects or tees its ranks' output keeps torchrun's, or its --log-dir)
        config.log_dir = str(said / "torchelastic")
    try:
        run(config)
    except SignalException as e:
        if e.sigval != signal.SIGINT:
            raise
        return 128 + signal.SIGINT  # Ctrl-C: the ranks stopped, and rank 0 said how to continue, in one line
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        if first.exitcode == UsageError.exit_code:  # the rank wrote why, in one line
            lines = [p.read_text() for p in [said / f"{rank}.txt", *sorted(said.glob("*.txt"))] if p.is_file()]
            print(lines[0] if lines else "error: a process refused its input (exit 2); see its log above",
                  end="" if lines else "\n", file=sys.stderr)
            return first.exitcode
        raise
    finally:
        shutil.rmtree(said, ignore_errors=True)
        os.environ.pop(REFUSAL_DIR, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
